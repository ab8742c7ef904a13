//! # troupe_postgres: a journal shared by every node
//!
//! [`PgJournal`] keeps Troupe's journal in PostgreSQL, so that an entity
//! whose node dies can be recovered on another node from the same events.
//! It passes the same conformance suite ([`troupe_journal::tck`]) as the
//! RocksDB backend.
//!
//! ## When to use which backend
//!
//! | backend | use it when |
//! |---|---|
//! | `RocksJournal` | one node, or nodes that own their entities for good: fastest, embedded |
//! | `PgJournal` | entities must move between nodes (a cluster), or operations already run PostgreSQL |
//!
//! ## How it stores events
//!
//! Tables live in one schema ([`PgConfig::schema`], created if missing):
//! `ids` (highest and deleted-to sequence per id), `events` (envelopes by
//! id and sequence), `snapshots`, `tags` (tag, offset -> id, seq) and
//! `meta` (the next tag offset). An append is one transaction: the id's
//! row is advanced only if it still holds the expected sequence (a stale
//! writer gets [`JournalError::SeqConflict`], whichever node it runs on),
//! the envelopes are inserted in one statement, and tagged events take
//! their offsets from the `meta` row, whose lock orders them by commit.
//! Acknowledged means committed, with PostgreSQL's own durability
//! (`synchronous_commit`).
//!
//! A replay reads pages of [`PgConfig::replay_batch_size`] events inside
//! one read-only repeatable-read transaction, so it sees one consistent
//! state however long it runs.
//!
//! ## Live tag subscriptions
//!
//! Live events come from this process's appends; appends made by other
//! processes reach a subscriber when it next reads from the table (after
//! it falls behind). A cluster that needs them at once should subscribe on
//! the node that writes them.

#![warn(missing_docs)]

use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::broadcast;
use tokio_postgres::NoTls;
use troupe_journal::backend::{check_append, check_delete, check_snapshot};
use troupe_journal::subscription::{self, LIVE_FEED_CAPACITY};
use troupe_journal::{
    AppendOutcome, Journal, JournalError, NewEvent, NewSnapshot, PersistedEvent, PersistenceId,
    Replay, Result, Snapshot, Tag, TagSubscription, TaggedEvent, TypeNameCache,
};

/// Settings of a [`PgJournal`].
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// Connection string, e.g. `postgres://troupe@127.0.0.1:5432/troupe`
    /// or `host=127.0.0.1 port=5432 user=troupe dbname=troupe`.
    pub url: String,
    /// Schema holding the tables (letters, digits and `_`, at most 63).
    pub schema: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Events per replay page.
    pub replay_batch_size: usize,
    /// Longest wait for a pooled connection (or a new one) before an
    /// operation fails; a replay holds its connection until it is drained
    /// or dropped.
    pub pool_wait: std::time::Duration,
}

/// The schema a journal uses unless told otherwise.
pub const DEFAULT_SCHEMA: &str = "troupe";

impl PgConfig {
    /// Defaults for a connection string: schema `troupe`, 8 connections,
    /// pages of 1,024 events, 30 s waits for a connection.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: DEFAULT_SCHEMA.into(),
            pool_size: 8,
            replay_batch_size: troupe_journal::DEFAULT_REPLAY_BATCH,
            pool_wait: std::time::Duration::from_secs(30),
        }
    }

    /// Sets the schema.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }
}

fn pg_err(context: &'static str) -> impl Fn(tokio_postgres::Error) -> JournalError {
    move |e| JournalError::Storage {
        context,
        message: match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        },
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> JournalError {
    JournalError::Storage {
        context: "taking a PostgreSQL connection",
        message: e.to_string(),
    }
}

struct Inner {
    pool: Pool,
    schema: String,
    batch: usize,
    live: broadcast::Sender<TaggedEvent>,
    /// Held by a tagged append from its offset allocation to its live
    /// publication, so that this process publishes in commit order.
    publish: tokio::sync::Mutex<()>,
}

/// The PostgreSQL journal. See the [crate docs](crate).
#[derive(Clone)]
pub struct PgJournal {
    inner: Arc<Inner>,
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl PgJournal {
    /// Connects, and creates the schema and tables if they are missing.
    pub async fn open(config: PgConfig) -> Result<Self> {
        let bad = |message: String| JournalError::Storage {
            context: "opening the PostgreSQL journal",
            message,
        };
        let schema = &config.schema;
        let valid = !schema.is_empty()
            && schema.len() <= 63
            && schema
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !schema.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(bad(format!(
                "schema `{schema}`: use letters, digits and `_` (at most 63, not starting with a digit)"
            )));
        }
        let mut pg: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e| bad(format!("connection string: {e}")))?;
        pg.options(format!("-c search_path={schema}"));
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(config.pool_wait))
            .create_timeout(Some(config.pool_wait))
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let mut client = pool.get().await.map_err(pool_err)?;
        let tx = client
            .transaction()
            .await
            .map_err(pg_err("creating the journal tables"))?;
        // Concurrent opens of a fresh schema would race on CREATE.
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[schema])
            .await
            .map_err(pg_err("creating the journal tables"))?;
        tx.batch_execute(&format!(
            r#"
            CREATE SCHEMA IF NOT EXISTS {schema};
            CREATE TABLE IF NOT EXISTS {schema}.ids (
                id TEXT COLLATE "C" PRIMARY KEY,
                highest BIGINT NOT NULL,
                deleted_to BIGINT NOT NULL DEFAULT 0);
            CREATE TABLE IF NOT EXISTS {schema}.events (
                id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                envelope BYTEA NOT NULL,
                PRIMARY KEY (id, seq));
            CREATE TABLE IF NOT EXISTS {schema}.snapshots (
                id TEXT COLLATE "C" PRIMARY KEY,
                seq BIGINT NOT NULL,
                envelope BYTEA NOT NULL);
            CREATE TABLE IF NOT EXISTS {schema}.tags (
                tag TEXT COLLATE "C" NOT NULL,
                tag_offset BIGINT NOT NULL,
                id TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                PRIMARY KEY (tag, tag_offset));
            CREATE TABLE IF NOT EXISTS {schema}.meta (
                key TEXT PRIMARY KEY,
                value BIGINT NOT NULL);
            INSERT INTO {schema}.meta VALUES ('next_offset', 1) ON CONFLICT DO NOTHING;
            "#
        ))
        .await
        .map_err(pg_err("creating the journal tables"))?;
        tx.commit()
            .await
            .map_err(pg_err("creating the journal tables"))?;
        tracing::info!(schema = %schema, "PostgreSQL journal opened");
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                schema: schema.clone(),
                batch: config.replay_batch_size.max(1),
                live: broadcast::channel(LIVE_FEED_CAPACITY).0,
                publish: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.inner.pool.get().await.map_err(pool_err)
    }

    /// Overwrites the stored bytes of one event, bypassing every check.
    /// For corruption tests and repair tools only.
    pub async fn overwrite_raw(&self, id: &PersistenceId, seq: u64, bytes: &[u8]) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE events SET envelope = $3 WHERE id = $1 AND seq = $2",
                &[&id.as_str(), &i64_of(seq), &bytes],
            )
            .await
            .map_err(pg_err("overwriting an event"))?;
        Ok(())
    }

    /// Drops the schema and everything in it (throwaway test schemas).
    pub async fn drop_schema(&self) -> Result<()> {
        let client = self.client().await?;
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                self.inner.schema
            ))
            .await
            .map_err(pg_err("dropping the schema"))
    }
}

async fn highest_of(
    client: &impl deadpool_postgres::GenericClient,
    id: &PersistenceId,
) -> Result<u64> {
    let row = client
        .query_opt("SELECT highest FROM ids WHERE id = $1", &[&id.as_str()])
        .await
        .map_err(pg_err("reading the highest sequence"))?;
    Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
}

#[async_trait::async_trait]
impl Journal for PgJournal {
    async fn append(
        &self,
        id: &PersistenceId,
        expected_seq: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome> {
        check_append(id, &events)?;
        let n = events.len() as u64;
        let first = expected_seq + 1;
        let last = expected_seq + n;
        let mut seqs = Vec::with_capacity(events.len());
        let mut envelopes = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let mut buf = Vec::new();
            e.encode_envelope(&mut buf);
            envelopes.push(buf);
            seqs.push(i64_of(first + i as u64));
        }
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(pg_err("starting an append"))?;
        let advanced = if expected_seq == 0 {
            tx.execute(
                "INSERT INTO ids (id, highest) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                &[&id.as_str(), &i64_of(last)],
            )
            .await
        } else {
            tx.execute(
                "UPDATE ids SET highest = $3 WHERE id = $1 AND highest = $2",
                &[&id.as_str(), &i64_of(expected_seq), &i64_of(last)],
            )
            .await
        }
        .map_err(pg_err("advancing the sequence"))?;
        if advanced == 0 {
            let actual = highest_of(&tx, id).await?;
            return Err(JournalError::SeqConflict {
                id: id.clone(),
                expected: expected_seq,
                actual,
            });
        }
        tx.execute(
            "INSERT INTO events (id, seq, envelope) SELECT $1, s, e FROM UNNEST($2::bigint[], $3::bytea[]) AS t(s, e)",
            &[&id.as_str(), &seqs, &envelopes],
        )
        .await
        .map_err(pg_err("inserting events"))?;
        let tagged: usize = events.iter().map(|e| e.tags.len().min(1)).sum();
        let mut live = Vec::new();
        let mut publish = None;
        if tagged > 0 {
            publish = Some(self.inner.publish.lock().await);
            // The meta row's lock orders tag offsets by commit.
            let row = tx
                .query_one(
                    "UPDATE meta SET value = value + $1 WHERE key = 'next_offset' RETURNING value - $1",
                    &[&(tagged as i64)],
                )
                .await
                .map_err(pg_err("allocating tag offsets"))?;
            let mut offset = row.get::<_, i64>(0) as u64;
            let (mut tags, mut offsets, mut tseqs) = (Vec::new(), Vec::new(), Vec::new());
            for (i, e) in events.into_iter().enumerate() {
                if e.tags.is_empty() {
                    continue;
                }
                let seq = first + i as u64;
                let mut seen = std::collections::HashSet::new();
                for t in e.tags.iter().filter(|t| seen.insert(t.as_str())) {
                    tags.push(t.as_str().to_owned());
                    offsets.push(i64_of(offset));
                    tseqs.push(i64_of(seq));
                }
                let event = PersistedEvent {
                    id: id.clone(),
                    seq,
                    event_type: Arc::from(&*e.event_type),
                    schema_version: e.schema_version,
                    timestamp_ms: e.timestamp_ms,
                    tags: e.tags,
                    payload: e.payload,
                };
                live.push(TaggedEvent { offset, event });
                offset += 1;
            }
            tx.execute(
                "INSERT INTO tags (tag, tag_offset, id, seq) SELECT t, o, $1, s FROM UNNEST($2::text[], $3::bigint[], $4::bigint[]) AS x(t, o, s)",
                &[&id.as_str(), &tags, &offsets, &tseqs],
            )
            .await
            .map_err(pg_err("indexing tags"))?;
        }
        tx.commit().await.map_err(pg_err("committing an append"))?;
        metrics::counter!("troupe_journal_events_appended_total").increment(n);
        for ev in live {
            let _ = self.inner.live.send(ev);
        }
        drop(publish);
        Ok(AppendOutcome {
            first_seq: first,
            last_seq: last,
        })
    }

    fn replay(&self, id: &PersistenceId, from_seq: u64, to_seq: u64) -> Replay {
        let me = self.clone();
        let id = id.clone();
        let from = from_seq.max(1);
        Replay::from_stream(async_stream::try_stream! {
            if from <= to_seq {
                // One query per page, each on a connection taken from the
                // pool and given back before the page is yielded: a
                // consumer that stops reading holds no connection and no
                // transaction. Events of an id are appended in sequence and
                // never rewritten, so pages read apart still join up.
                let mut next = from;
                let mut prev: Option<u64> = None;
                let mut types = TypeNameCache::default();
                loop {
                    let rows = {
                        let client = me.client().await?;
                        client
                            .query(
                                "SELECT seq, envelope FROM events WHERE id = $1 AND seq >= $2 AND seq <= $3 ORDER BY seq LIMIT $4",
                                &[&id.as_str(), &i64_of(next), &i64_of(to_seq), &(me.inner.batch as i64)],
                            )
                            .await
                            .map_err(pg_err("replaying events"))?
                    };
                    let full = rows.len() == me.inner.batch;
                    let mut batch = Vec::with_capacity(rows.len());
                    for row in rows {
                        let seq = row.get::<_, i64>(0) as u64;
                        if let Some(p) = prev && seq != p + 1 {
                            Err(JournalError::Gap { id: id.clone(), expected: p + 1, found: seq })?;
                        }
                        prev = Some(seq);
                        let bytes: &[u8] = row.get(1);
                        match PersistedEvent::from_envelope(&id, seq, bytes, &mut types) {
                            Ok(ev) => batch.push(ev),
                            Err(e) => {
                                if !batch.is_empty() {
                                    yield std::mem::take(&mut batch);
                                }
                                Err(e)?;
                            }
                        }
                    }
                    if let Some(last) = batch.last() {
                        next = last.seq + 1;
                    }
                    if !batch.is_empty() {
                        yield batch;
                    }
                    if !full || next > to_seq {
                        break;
                    }
                }
            }
        })
    }

    async fn highest_seq(&self, id: &PersistenceId) -> Result<u64> {
        let client = self.client().await?;
        highest_of(&client, id).await
    }

    async fn save_snapshot(&self, id: &PersistenceId, snapshot: NewSnapshot) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(pg_err("saving a snapshot"))?;
        let highest = highest_of(&tx, id).await?;
        check_snapshot(id, snapshot.seq, highest)?;
        let mut bytes = Vec::new();
        snapshot.encode_envelope(&mut bytes);
        tx.execute(
            "INSERT INTO snapshots (id, seq, envelope) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, envelope = EXCLUDED.envelope
             WHERE snapshots.seq <= EXCLUDED.seq",
            &[&id.as_str(), &i64_of(snapshot.seq), &bytes],
        )
        .await
        .map_err(pg_err("saving a snapshot"))?;
        tx.commit().await.map_err(pg_err("saving a snapshot"))
    }

    async fn load_snapshot(&self, id: &PersistenceId) -> Result<Option<Snapshot>> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT envelope FROM snapshots WHERE id = $1",
                &[&id.as_str()],
            )
            .await
            .map_err(pg_err("loading a snapshot"))?;
        row.map(|r| Snapshot::from_envelope(id, r.get::<_, &[u8]>(0)))
            .transpose()
    }

    async fn delete_events_to(&self, id: &PersistenceId, to_seq: u64) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client
            .transaction()
            .await
            .map_err(pg_err("deleting events"))?;
        let highest = highest_of(&tx, id).await?;
        check_delete(id, to_seq, highest)?;
        if to_seq > 0 {
            tx.execute(
                "DELETE FROM events WHERE id = $1 AND seq <= $2",
                &[&id.as_str(), &i64_of(to_seq)],
            )
            .await
            .map_err(pg_err("deleting events"))?;
            tx.execute(
                "UPDATE ids SET deleted_to = GREATEST(deleted_to, $2) WHERE id = $1",
                &[&id.as_str(), &i64_of(to_seq)],
            )
            .await
            .map_err(pg_err("deleting events"))?;
        }
        tx.commit().await.map_err(pg_err("deleting events"))
    }

    async fn persistence_ids(
        &self,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>> {
        let client = self.client().await?;
        let after = after.map(|a| a.as_str().to_owned());
        let rows = client
            .query(
                "SELECT id FROM ids WHERE ($1::text IS NULL OR id > $1) ORDER BY id LIMIT $2",
                &[&after, &(limit.min(i64::MAX as usize) as i64)],
            )
            .await
            .map_err(pg_err("listing persistence ids"))?;
        rows.iter()
            .map(|r| PersistenceId::parse(r.get::<_, &str>(0)))
            .collect()
    }

    async fn events_by_tag(
        &self,
        tag: &Tag,
        from_offset: u64,
        limit: usize,
    ) -> Result<Vec<TaggedEvent>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT t.tag_offset, t.id, t.seq, e.envelope FROM tags t
                 JOIN events e ON e.id = t.id AND e.seq = t.seq
                 WHERE t.tag = $1 AND t.tag_offset >= $2
                 ORDER BY t.tag_offset LIMIT $3",
                &[
                    &tag.as_str(),
                    &i64_of(from_offset),
                    &(limit.min(i64::MAX as usize) as i64),
                ],
            )
            .await
            .map_err(pg_err("reading a tag"))?;
        let mut types = TypeNameCache::default();
        rows.iter()
            .map(|r| {
                let id = PersistenceId::parse(r.get::<_, &str>(1))?;
                let seq = r.get::<_, i64>(2) as u64;
                let event =
                    PersistedEvent::from_envelope(&id, seq, r.get::<_, &[u8]>(3), &mut types)?;
                Ok(TaggedEvent {
                    offset: r.get::<_, i64>(0) as u64,
                    event,
                })
            })
            .collect()
    }

    fn subscribe_tag(&self, tag: &Tag, from_offset: u64) -> TagSubscription {
        let live = self.inner.live.subscribe();
        subscription::spawn(self.clone(), live, tag.clone(), from_offset)
    }

    async fn flush(&self) -> Result<()> {
        // Committed is durable (PostgreSQL's synchronous_commit).
        Ok(())
    }
}

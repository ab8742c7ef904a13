//! The group-commit writer thread.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use lru::LruCache;
use rocksdb::{DB, WriteBatch, WriteOptions};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::keys::*;
use super::{RocksConfig, WriterStats, cf, stored_highest};
use crate::error::{JournalError, Result};
use crate::event::{AppendOutcome, NewEvent, Snapshot, TaggedEvent};
use crate::id::PersistenceId;
use crate::memory::{check_delete, check_snapshot};

pub(crate) enum Command {
    Append {
        id: PersistenceId,
        expected: u64,
        events: Vec<NewEvent>,
        envelopes: Vec<Vec<u8>>,
        reply: oneshot::Sender<Result<AppendOutcome>>,
    },
    Snapshot {
        id: PersistenceId,
        seq: u64,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<()>>,
    },
    Delete {
        id: PersistenceId,
        to_seq: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    Flush {
        reply: oneshot::Sender<Result<()>>,
    },
}

impl Command {
    fn weight(&self) -> (usize, usize) {
        match self {
            Command::Append { envelopes, .. } => {
                (envelopes.len(), envelopes.iter().map(Vec::len).sum())
            }
            Command::Snapshot { bytes, .. } => (1, bytes.len()),
            _ => (1, 0),
        }
    }
}

/// A reply held back until the batch it belongs to is durable.
enum Pending {
    Append(
        oneshot::Sender<Result<AppendOutcome>>,
        Result<AppendOutcome>,
    ),
    Unit(oneshot::Sender<Result<()>>, Result<()>),
}

pub(crate) struct Writer {
    db: Arc<DB>,
    write_opts: WriteOptions,
    max_batch_events: usize,
    max_batch_bytes: usize,
    highest: LruCache<PersistenceId, u64>,
    next_offset: u64,
    live: broadcast::Sender<TaggedEvent>,
    stats: Arc<WriterStats>,
}

impl Writer {
    pub(crate) fn new(
        db: Arc<DB>,
        config: &RocksConfig,
        write_opts: WriteOptions,
        next_offset: u64,
        live: broadcast::Sender<TaggedEvent>,
        stats: Arc<WriterStats>,
    ) -> Self {
        // Every id touched by one batch must stay cached until the batch is
        // committed, or a later append in the batch would re-read a stale
        // sequence from disk: the cache holds at least one batch of ids.
        let cap = config
            .seq_cache_capacity
            .max(config.max_batch_events)
            .max(1);
        let cap = NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN);
        Self {
            db,
            write_opts,
            max_batch_events: config.max_batch_events.max(1),
            max_batch_bytes: config.max_batch_bytes.max(1),
            highest: LruCache::new(cap),
            next_offset,
            live,
            stats,
        }
    }

    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut pending = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let (mut events, mut bytes) = first.weight();
            pending.push(first);
            while events < self.max_batch_events && bytes < self.max_batch_bytes {
                match rx.try_recv() {
                    Ok(cmd) => {
                        let (e, b) = cmd.weight();
                        events += e;
                        bytes += b;
                        pending.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            self.commit(&mut pending);
        }
        // Queue closed: everything is committed; make it durable.
        if let Err(e) = self.db.flush_wal(true) {
            tracing::error!(error = %e, "syncing the write-ahead log on close failed");
        }
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "flushing memtables on close failed (the log still has them)");
        }
    }

    fn highest(&mut self, id: &PersistenceId) -> Result<u64> {
        if let Some(h) = self.highest.get(id) {
            return Ok(*h);
        }
        let h = stored_highest(&self.db, id)?;
        self.highest.put(id.clone(), h);
        Ok(h)
    }

    fn commit(&mut self, commands: &mut Vec<Command>) {
        let started = Instant::now();
        let db = self.db.clone();
        let (events_cf, tags_cf, meta_cf, snapshots_cf) = match (
            cf(&db, CF_EVENTS),
            cf(&db, CF_TAGS),
            cf(&db, CF_META),
            cf(&db, CF_SNAPSHOTS),
        ) {
            (Ok(a), Ok(b), Ok(c), Ok(d)) => (a, b, c, d),
            _ => {
                for cmd in commands.drain(..) {
                    fail(cmd, || JournalError::Closed);
                }
                return;
            }
        };
        let mut batch = WriteBatch::default();
        let mut replies = Vec::with_capacity(commands.len());
        let mut touched = Vec::new();
        let mut live = Vec::new();
        let publish = self.live.receiver_count() > 0;
        let mut offset = self.next_offset;
        let mut flush = false;
        let mut key = Vec::new();
        let mut value = Vec::new();
        let mut appended = 0u64;
        for cmd in commands.drain(..) {
            match cmd {
                Command::Append {
                    id,
                    expected,
                    events,
                    envelopes,
                    reply,
                } => {
                    let current = match self.highest(&id) {
                        Ok(h) => h,
                        Err(e) => {
                            replies.push(Pending::Append(reply, Err(e)));
                            continue;
                        }
                    };
                    if current != expected {
                        let err = JournalError::SeqConflict {
                            id,
                            expected,
                            actual: current,
                        };
                        replies.push(Pending::Append(reply, Err(err)));
                        continue;
                    }
                    if current == 0 {
                        batch.put_cf(meta_cf, meta_id_key(&id), 0u64.to_be_bytes());
                    }
                    let first = current + 1;
                    let count = events.len() as u64;
                    for (i, (ev, env)) in events.into_iter().zip(envelopes).enumerate() {
                        let seq = first + i as u64;
                        seq_key(&mut key, id.as_str(), seq);
                        batch.put_cf(events_cf, &key, &env);
                        if !ev.tags.is_empty() {
                            tag_value(&mut value, &id, seq);
                            for tag in &ev.tags {
                                seq_key(&mut key, tag.as_str(), offset);
                                batch.put_cf(tags_cf, &key, &value);
                            }
                            if publish {
                                live.push(TaggedEvent {
                                    offset,
                                    event: ev.into_persisted(id.clone(), seq),
                                });
                            }
                            offset += 1;
                        }
                        appended += 1;
                    }
                    let last_seq = current + count;
                    self.highest.put(id.clone(), last_seq);
                    touched.push(id);
                    replies.push(Pending::Append(
                        reply,
                        Ok(AppendOutcome {
                            first_seq: first,
                            last_seq,
                        }),
                    ));
                }
                Command::Snapshot {
                    id,
                    seq,
                    bytes,
                    reply,
                } => {
                    let result = self.highest(&id).and_then(|highest| {
                        let probe = crate::event::NewSnapshot {
                            seq,
                            state_type: "".into(),
                            schema_version: 0,
                            payload: Vec::new(),
                        };
                        check_snapshot(&id, &probe, highest)?;
                        let existing = db
                            .get_pinned_cf(snapshots_cf, id.as_str())
                            .map_err(|e| JournalError::storage("reading a snapshot", e))?;
                        // A corrupt existing snapshot is replaced, not kept.
                        let newer = existing
                            .and_then(|b| Snapshot::from_envelope(&id, &b).ok())
                            .is_some_and(|s| s.seq > seq);
                        if !newer {
                            batch.put_cf(snapshots_cf, id.as_str(), &bytes);
                        }
                        Ok(())
                    });
                    replies.push(Pending::Unit(reply, result));
                }
                Command::Delete { id, to_seq, reply } => {
                    let result = self.highest(&id).and_then(|highest| {
                        check_delete(&id, to_seq, highest)?;
                        if to_seq > 0 {
                            batch.delete_range_cf(
                                events_cf,
                                event_key(&id, 0),
                                event_key(&id, to_seq + 1),
                            );
                            let meta_key = meta_id_key(&id);
                            let old = db
                                .get_pinned_cf(meta_cf, &meta_key)
                                .map_err(|e| JournalError::storage("reading id metadata", e))?
                                .and_then(|v| be_u64(&v))
                                .unwrap_or(0);
                            batch.put_cf(meta_cf, meta_key, old.max(to_seq).to_be_bytes());
                        }
                        Ok(())
                    });
                    replies.push(Pending::Unit(reply, result));
                }
                Command::Flush { reply } => {
                    flush = true;
                    replies.push(Pending::Unit(reply, Ok(())));
                }
            }
        }
        if offset != self.next_offset {
            batch.put_cf(meta_cf, META_NEXT_OFFSET, offset.to_be_bytes());
        }
        let batch_len = batch.len();
        let mut result = if batch_len == 0 {
            Ok(())
        } else {
            db.write_opt(batch, &self.write_opts)
                .map_err(|e| e.to_string())
        };
        if flush && result.is_ok() {
            result = db.flush_wal(true).map_err(|e| e.to_string());
        }
        match result {
            Ok(()) => {
                self.next_offset = offset;
                self.stats.record(appended);
                metrics::histogram!("troupe_journal_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("troupe_journal_batch_events").record(appended as f64);
                metrics::counter!("troupe_journal_events_appended_total").increment(appended);
                for r in replies {
                    match r {
                        Pending::Append(tx, res) => {
                            let _ = tx.send(res);
                        }
                        Pending::Unit(tx, res) => {
                            let _ = tx.send(res);
                        }
                    }
                }
                for ev in live {
                    let _ = self.live.send(ev);
                }
            }
            Err(message) => {
                tracing::error!(error = %message, writes = batch_len, "group commit failed");
                metrics::counter!("troupe_journal_commit_failures_total").increment(1);
                // Nothing of this batch may be assumed written: forget the
                // cached sequences it advanced and fail every write in it.
                for id in touched {
                    self.highest.pop(&id);
                }
                let err = || JournalError::Storage {
                    context: "committing a batch",
                    message: message.clone(),
                };
                for r in replies {
                    match r {
                        Pending::Append(tx, Ok(_)) => {
                            let _ = tx.send(Err(err()));
                        }
                        Pending::Append(tx, Err(e)) => {
                            let _ = tx.send(Err(e));
                        }
                        Pending::Unit(tx, _) => {
                            let _ = tx.send(Err(err()));
                        }
                    }
                }
            }
        }
    }
}

fn fail(cmd: Command, err: impl Fn() -> JournalError) {
    match cmd {
        Command::Append { reply, .. } => {
            let _ = reply.send(Err(err()));
        }
        Command::Snapshot { reply, .. }
        | Command::Delete { reply, .. }
        | Command::Flush { reply } => {
            let _ = reply.send(Err(err()));
        }
    }
}

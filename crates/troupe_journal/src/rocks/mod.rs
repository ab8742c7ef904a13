//! The RocksDB backend, with group commit.
//!
//! One writer thread owns the write path. It takes every command waiting in
//! its bounded queue (up to [`RocksConfig::max_batch_events`] events),
//! checks each append's expected sequence, writes the whole lot as one
//! `WriteBatch`, syncs once if the durability is [`Durability::Fsync`], and
//! only then answers each caller. Under load, one fsync serves hundreds of
//! appends; with a single writer, an append costs one fsync, as with plain
//! RocksDB.
//!
//! Reads (replay, snapshots, tags) go straight to RocksDB from Tokio's
//! blocking pool; replay streams bounded batches through a channel of two,
//! so memory stays flat however long the stream.
//!
//! See [`keys`](self::keys) for the column families and key layout.

pub mod keys;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, Options, ReadOptions,
    WriteOptions,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::error::{JournalError, Result};
use crate::event::{
    AppendOutcome, NewEvent, NewSnapshot, PersistedEvent, Snapshot, TaggedEvent, TypeNameCache,
};
use crate::id::{PersistenceId, Tag};
use crate::journal::{DEFAULT_REPLAY_BATCH, Durability, Journal, Replay, TagSubscription};
use crate::memory::check_append;
use crate::subscription::{self, LIVE_FEED_CAPACITY};
use keys::*;
use writer::{Command, Writer};

/// Committed batches waiting for the acker task before the writer answers
/// them itself.
const ACKER_QUEUE: usize = 64;

/// Settings of a [`RocksJournal`]. Every bound has a default that suits a
/// 2-core machine; all are explicit.
#[derive(Debug, Clone)]
pub struct RocksConfig {
    /// Data directory (created if missing).
    pub path: PathBuf,
    /// `Fsync` or `Buffered` (`InMemory` is refused: use [`crate::InMemoryJournal`]).
    pub durability: Durability,
    /// Events per replay batch.
    pub replay_batch_size: usize,
    /// Commands waiting for the writer before `append` waits for room.
    pub writer_queue: usize,
    /// Most events in one group commit.
    pub max_batch_events: usize,
    /// Most envelope bytes in one group commit.
    pub max_batch_bytes: usize,
    /// Persistence ids whose highest sequence the writer keeps in memory.
    pub seq_cache_capacity: usize,
    /// Shared block cache, in bytes.
    pub block_cache_bytes: usize,
    /// Compression per LSM level.
    pub compression: WarmCompression,
}

/// A block compression algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Stored as is.
    None,
    /// LZ4: about 2x on chat text, compresses and decompresses at GB/s.
    Lz4,
    /// zstd: noticeably smaller than LZ4 on text, several times slower to
    /// compress (decompression stays fast).
    Zstd,
}

impl Compression {
    fn rocks(self) -> DBCompressionType {
        match self {
            Compression::None => DBCompressionType::None,
            Compression::Lz4 => DBCompressionType::Lz4,
            Compression::Zstd => DBCompressionType::Zstd,
        }
    }
}

/// Compression of the warm tier, chosen per level.
///
/// New events land in the upper levels (L0, L1, ...), are rewritten by
/// every compaction on the way down, and are what resumes and recoveries
/// read: they get a fast algorithm. Most bytes end in the bottommost level,
/// written once per full compaction and read rarely: it gets zstd. The
/// defaults trade about 10-20 % more CPU in compaction for a bottom level
/// about a third smaller than LZ4 (see `troupe bench tiers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WarmCompression {
    /// Levels above the bottommost.
    pub upper: Compression,
    /// The bottommost level.
    pub bottommost: Compression,
    /// zstd level where zstd is used (1..=19).
    pub zstd_level: i32,
}

impl Default for WarmCompression {
    /// LZ4 above, zstd level 6 at the bottom.
    fn default() -> Self {
        Self {
            upper: Compression::Lz4,
            bottommost: Compression::Zstd,
            zstd_level: 6,
        }
    }
}

impl RocksConfig {
    /// Defaults for a data directory: fsync durability, batches of 1,024 on
    /// replay, a writer queue of 16,384 commands, group commits of at most
    /// 8,192 events or 32 MiB, 100,000 cached sequences, a 64 MiB block cache.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::Fsync,
            replay_batch_size: DEFAULT_REPLAY_BATCH,
            writer_queue: 16_384,
            max_batch_events: 8_192,
            max_batch_bytes: 32 << 20,
            seq_cache_capacity: 100_000,
            block_cache_bytes: 64 << 20,
            compression: WarmCompression::default(),
        }
    }

    /// Sets the durability.
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// Sets the replay batch size.
    pub fn replay_batch_size(mut self, n: usize) -> Self {
        self.replay_batch_size = n;
        self
    }

    /// The RocksDB options and column families the journal opens with
    /// (for tools and for baselines that must match the journal's setup).
    pub fn db_options(&self) -> (Options, Vec<ColumnFamilyDescriptor>) {
        let mut db = Options::default();
        db.create_if_missing(true);
        db.create_missing_column_families(true);
        db.set_max_background_jobs(2);
        let cache = Cache::new_lru_cache(self.block_cache_bytes);
        let cf = |name: &str| {
            let mut table = BlockBasedOptions::default();
            table.set_block_cache(&cache);
            let mut o = Options::default();
            o.set_block_based_table_factory(&table);
            let c = self.compression;
            o.set_compression_per_level(&[c.upper.rocks(); 7]);
            o.set_compression_type(c.upper.rocks());
            o.set_bottommost_compression_type(c.bottommost.rocks());
            o.set_compression_options(-14, c.zstd_level, 0, 0);
            o.set_bottommost_compression_options(-14, c.zstd_level, 0, 0, true);
            ColumnFamilyDescriptor::new(name, o)
        };
        let cfs = [CF_EVENTS, CF_SNAPSHOTS, CF_TAGS, CF_META]
            .into_iter()
            .map(cf)
            .collect();
        (db, cfs)
    }
}

/// Counters of the group-commit writer since the journal was opened.
#[derive(Debug, Default)]
pub struct WriterStats {
    commits: AtomicU64,
    events: AtomicU64,
    busy_ns: AtomicU64,
    storage_ns: AtomicU64,
}

impl WriterStats {
    pub(crate) fn record(&self, events: u64, busy: Duration, storage: Duration) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(events, Ordering::Relaxed);
        self.busy_ns
            .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
        self.storage_ns
            .fetch_add(storage.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Time the writer spent committing (building batches, writing,
    /// syncing, answering), as opposed to waiting for appends.
    pub fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }

    /// Time spent inside RocksDB's write (and sync) calls.
    pub fn storage(&self) -> Duration {
        Duration::from_nanos(self.storage_ns.load(Ordering::Relaxed))
    }

    /// Group commits (write batches) written.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Events written.
    pub fn events(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    /// Average events per group commit.
    pub fn mean_batch(&self) -> f64 {
        self.events() as f64 / self.commits().max(1) as f64
    }
}

/// Told by the writer thread, in commit order and before the callers are
/// answered, what each committed batch changed (the tiered journal's hot
/// tier hangs here).
pub(crate) trait CommitHook: Send + Sync + 'static {
    /// Whether appends to `id` should carry their events to the hook.
    fn wants(&self, id: &PersistenceId) -> bool;
    /// Events `expected + 1 ..` were committed to `id`.
    fn appended(&self, id: &PersistenceId, expected: u64, events: Vec<PersistedEvent>);
    /// Events up to `to_seq` of `id` were deleted by the application.
    fn deleted(&self, id: &PersistenceId, to_seq: u64);
}

pub(crate) struct Inner {
    hook: Arc<std::sync::OnceLock<Arc<dyn CommitHook>>>,
    pub(crate) db: Arc<DB>,
    stats: Arc<WriterStats>,
    path: PathBuf,
    config: RocksConfig,
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    live: broadcast::Sender<TaggedEvent>,
    read_only: bool,
}

impl Inner {
    fn stop_writer(&self) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(tx);
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_writer();
    }
}

/// The RocksDB journal. See the [module docs](self).
#[derive(Clone)]
pub struct RocksJournal {
    inner: Arc<Inner>,
}

fn cf<'a>(db: &'a DB, name: &'static str) -> Result<&'a rocksdb::ColumnFamily> {
    db.cf_handle(name).ok_or_else(|| JournalError::Storage {
        context: "opening a column family",
        message: format!("column family `{name}` is missing"),
    })
}

/// Highest sequence of `id` as stored: the last event key, or the
/// deleted-to mark when every event was deleted.
pub(crate) fn stored_highest(db: &DB, id: &PersistenceId) -> Result<u64> {
    let snapshot = db.snapshot();
    let meta_key = meta_id_key(id);
    let deleted_to = match snapshot
        .get_cf(cf(db, CF_META)?, &meta_key)
        .map_err(|e| JournalError::storage("reading id metadata", e))?
    {
        None => return Ok(0),
        Some(v) => be_u64(&v).ok_or_else(|| JournalError::CorruptMetadata {
            key: String::from_utf8_lossy(&meta_key).into_owned(),
            reason: format!("expected 8 bytes, found {}", v.len()),
        })?,
    };
    let mut ro = ReadOptions::default();
    ro.set_iterate_lower_bound(event_key(id, 0));
    let mut it = snapshot.raw_iterator_cf_opt(cf(db, CF_EVENTS)?, ro);
    it.seek_for_prev(event_key(id, u64::MAX));
    let last = match it.key() {
        Some(k) => split_seq_key(k).map_or(0, |(_, seq)| seq),
        None => {
            it.status()
                .map_err(|e| JournalError::storage("finding the highest sequence", e))?;
            0
        }
    };
    Ok(last.max(deleted_to))
}

impl RocksJournal {
    /// Opens (or creates) the journal at `config.path` and starts its writer.
    pub fn open(config: RocksConfig) -> Result<Self> {
        if config.durability == Durability::InMemory {
            return Err(JournalError::Storage {
                context: "opening the RocksDB journal",
                message: "durability `in_memory` is served by InMemoryJournal, not RocksDB".into(),
            });
        }
        std::fs::create_dir_all(&config.path)
            .map_err(|e| JournalError::storage("creating the data directory", e))?;
        let (opts, cfs) = config.db_options();
        let db = DB::open_cf_descriptors(&opts, &config.path, cfs)
            .map_err(|e| JournalError::storage("opening RocksDB", e))?;
        let db = Arc::new(db);
        let next_offset = match db
            .get_cf(cf(&db, CF_META)?, META_NEXT_OFFSET)
            .map_err(|e| JournalError::storage("reading the tag offset", e))?
        {
            None => 1,
            Some(v) => be_u64(&v).ok_or_else(|| JournalError::CorruptMetadata {
                key: "next_offset".into(),
                reason: format!("expected 8 bytes, found {}", v.len()),
            })?,
        };
        let (live, _) = broadcast::channel(LIVE_FEED_CAPACITY);
        let (tx, rx) = mpsc::channel(config.writer_queue.max(1));
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(config.durability == Durability::Fsync);
        let stats = Arc::new(WriterStats::default());
        // Only a multi-thread runtime runs the acker on its own; a
        // current-thread runtime runs tasks only inside its `block_on`, and
        // a journal used from elsewhere would wait on it forever.
        let acker = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|rt| rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
            .map(|rt| {
                let (tx, rx) = mpsc::channel(ACKER_QUEUE);
                rt.spawn(writer::acker(rx));
                tx
            });
        let hook: Arc<std::sync::OnceLock<Arc<dyn CommitHook>>> = Arc::default();
        let writer = Writer::new(
            db.clone(),
            &config,
            write_opts,
            next_offset,
            writer::Outputs {
                live: live.clone(),
                stats: stats.clone(),
                acker,
                hook: hook.clone(),
            },
        );
        let handle = std::thread::Builder::new()
            .name("troupe-journal-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| JournalError::storage("starting the writer thread", e))?;
        tracing::info!(path = %config.path.display(), durability = ?config.durability, "journal opened");
        Ok(Self {
            inner: Arc::new(Inner {
                hook,
                db,
                stats,
                path: config.path.clone(),
                config,
                tx: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
                live,
                read_only: false,
            }),
        })
    }

    /// Opens an existing journal read-only (tools; works beside a running
    /// writer). Appends, snapshots and deletes fail with
    /// [`JournalError::ReadOnly`].
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        let config = RocksConfig::new(path.as_ref());
        if !path.as_ref().join("CURRENT").exists() {
            return Err(JournalError::Storage {
                context: "opening the journal read-only",
                message: format!("no journal at {}", path.as_ref().display()),
            });
        }
        let (opts, cfs) = config.db_options();
        let db = DB::open_cf_descriptors_read_only(&opts, &config.path, cfs, false)
            .map_err(|e| JournalError::storage("opening RocksDB read-only", e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                hook: Arc::default(),
                db: Arc::new(db),
                stats: Arc::default(),
                path: config.path.clone(),
                config,
                tx: Mutex::new(None),
                writer: Mutex::new(None),
                live: broadcast::channel(1).0,
                read_only: true,
            }),
        })
    }

    /// Group-commit counters (commits, events, mean batch size).
    pub fn writer_stats(&self) -> &WriterStats {
        &self.inner.stats
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Stops the writer after it has committed everything queued, syncs
    /// the write-ahead log and flushes memtables (so the next open has no
    /// log to replay). Later writes fail with [`JournalError::Closed`];
    /// reads keep working while handles exist.
    pub async fn close(&self) {
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || inner.stop_writer()).await;
    }

    async fn send(&self, make: impl FnOnce() -> Command) -> Result<()> {
        if self.inner.read_only {
            return Err(JournalError::ReadOnly {
                path: self.inner.path.display().to_string(),
                operation: "writing",
            });
        }
        let tx = self
            .inner
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(JournalError::Closed)?;
        tx.send(make()).await.map_err(|_| JournalError::Closed)
    }

    /// Runs a blocking read on Tokio's blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DB) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| JournalError::storage("running a blocking read", e))?
    }

    /// Overwrites the stored bytes of one event, bypassing every check.
    /// For corruption tests and repair tools only.
    pub fn overwrite_raw(&self, id: &PersistenceId, seq: u64, bytes: &[u8]) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(cf(&self.inner.db, CF_EVENTS)?, event_key(id, seq), bytes);
        self.inner
            .db
            .write_opt(batch, &wo)
            .map_err(|e| JournalError::storage("overwriting an event", e))
    }

    /// Estimated number of stored events (for progress bars).
    pub fn estimate_event_count(&self) -> u64 {
        let db = &self.inner.db;
        cf(db, CF_EVENTS)
            .ok()
            .and_then(|h| {
                db.property_int_value_cf(h, rocksdb::properties::ESTIMATE_NUM_KEYS)
                    .ok()
                    .flatten()
            })
            .unwrap_or(0)
    }

    /// Decodes every stored envelope, calling `progress` with the number of
    /// entries checked so far every 4,096 entries. Lists each bad entry (up
    /// to [`MAX_REPORTED_BAD`]) by id and sequence.
    pub fn verify(&self, mut progress: impl FnMut(u64)) -> Result<VerifyReport> {
        let db = &self.inner.db;
        let mut report = VerifyReport::default();
        let mut it = db.raw_iterator_cf_opt(cf(db, CF_EVENTS)?, replay_read_options());
        it.seek_to_first();
        let mut prev: Option<(Vec<u8>, u64)> = None;
        while let Some((k, v)) = it.item() {
            report.events_checked += 1;
            match split_seq_key(k) {
                None => report.push_bad(
                    String::from_utf8_lossy(k).into_owned(),
                    None,
                    "malformed key".into(),
                ),
                Some((id_bytes, seq)) => {
                    let id_text = String::from_utf8_lossy(id_bytes).into_owned();
                    if let Err(e) = crate::envelope::decode_event(v) {
                        report.push_bad(id_text.clone(), Some(seq), e.to_string());
                    }
                    if let Some((pid, pseq)) = &prev
                        && pid.as_slice() == id_bytes
                        && seq != pseq + 1
                    {
                        report.push_bad(
                            id_text,
                            Some(seq),
                            format!("gap: expected sequence {} first", pseq + 1),
                        );
                    }
                    prev = Some((id_bytes.to_vec(), seq));
                }
            }
            if report.events_checked % 4096 == 0 {
                progress(report.events_checked);
            }
            it.next();
        }
        it.status()
            .map_err(|e| JournalError::storage("scanning events", e))?;
        let mut it = db.raw_iterator_cf_opt(cf(db, CF_SNAPSHOTS)?, ReadOptions::default());
        it.seek_to_first();
        while let Some((k, v)) = it.item() {
            report.snapshots_checked += 1;
            if let Err(e) = crate::envelope::decode_snapshot(v) {
                report.push_bad(
                    String::from_utf8_lossy(k).into_owned(),
                    None,
                    format!("snapshot: {e}"),
                );
            }
            it.next();
        }
        it.status()
            .map_err(|e| JournalError::storage("scanning snapshots", e))?;
        progress(report.events_checked);
        Ok(report)
    }
}

/// Most bad entries listed in a [`VerifyReport`] (the count goes on).
pub const MAX_REPORTED_BAD: usize = 10_000;

/// One entry `verify` could not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntry {
    /// Persistence id (lossy UTF-8 of the stored key).
    pub id: String,
    /// Sequence number, for events.
    pub seq: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// What [`RocksJournal::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Event entries decoded.
    pub events_checked: u64,
    /// Snapshot entries decoded.
    pub snapshots_checked: u64,
    /// Bad entries found (may exceed `bad.len()`).
    pub bad_count: u64,
    /// The first [`MAX_REPORTED_BAD`] bad entries, in key order.
    pub bad: Vec<BadEntry>,
}

impl VerifyReport {
    fn push_bad(&mut self, id: String, seq: Option<u64>, reason: String) {
        self.bad_count += 1;
        if self.bad.len() < MAX_REPORTED_BAD {
            self.bad.push(BadEntry { id, seq, reason });
        }
    }

    /// True when nothing bad was found.
    pub fn is_clean(&self) -> bool {
        self.bad_count == 0
    }
}

/// Read options for replays and full scans: blocks are read once, in
/// order, so they bypass the block cache (replay memory stays flat) and are
/// read ahead.
pub fn replay_read_options() -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.fill_cache(false);
    ro.set_readahead_size(256 << 10);
    ro
}

/// One page of a replay: up to `batch_size` events from `from_seq`, read
/// with an iterator of its own that is dropped before the page is handed
/// on, so a consumer that stalls holds no iterator (and no pinned
/// memtable or SST files) and no blocking-pool thread.
struct Page {
    events: Vec<PersistedEvent>,
    /// A failure after `events` (a gap, a corrupt entry, storage).
    error: Option<JournalError>,
    /// The page was full: there may be more.
    full: bool,
}

fn read_page(
    db: &DB,
    id: &PersistenceId,
    from_seq: u64,
    to_seq: u64,
    batch_size: usize,
    mut prev: Option<u64>,
) -> Result<Page> {
    let mut ro = replay_read_options();
    let upper = match to_seq.checked_add(1) {
        Some(end) => event_key(id, end),
        None => upper_bound(id.as_str()),
    };
    ro.set_iterate_upper_bound(upper);
    let mut it = db.raw_iterator_cf_opt(cf(db, CF_EVENTS)?, ro);
    it.seek(event_key(id, from_seq));
    let mut types = TypeNameCache::default();
    let mut events = Vec::with_capacity(batch_size.min(1_024));
    let mut error = None;
    while events.len() < batch_size {
        let Some((k, v)) = it.item() else { break };
        let seq = split_seq_key(k).map_or(0, |(_, s)| s);
        if let Some(p) = prev
            && seq != p + 1
        {
            error = Some(JournalError::Gap {
                id: id.clone(),
                expected: p + 1,
                found: seq,
            });
            break;
        }
        prev = Some(seq);
        match PersistedEvent::from_envelope(id, seq, v, &mut types) {
            Ok(ev) => events.push(ev),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
        it.next();
    }
    if error.is_none()
        && let Err(e) = it.status()
    {
        error = Some(JournalError::storage("replaying events", e));
    }
    Ok(Page {
        full: events.len() == batch_size && error.is_none(),
        events,
        error,
    })
}

#[async_trait::async_trait]
impl Journal for RocksJournal {
    async fn append(
        &self,
        id: &PersistenceId,
        expected_seq: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome> {
        check_append(id, &events)?;
        let refs: Vec<(usize, [u8; 32])> = events
            .iter()
            .enumerate()
            .flat_map(|(i, e)| e.blobs.iter().map(move |b| (i, b.hash.0)))
            .collect();
        let envelopes = events
            .iter()
            .map(|e| {
                let mut buf = Vec::new();
                e.encode_envelope(&mut buf);
                buf
            })
            .collect();
        // Untagged events are only needed as envelopes (unless the commit
        // hook wants them): free them here, not on the writer thread every
        // append goes through.
        let hot = self.inner.hook.get().is_some_and(|h| h.wants(id));
        let events = if hot || events.iter().any(|e| !e.tags.is_empty()) {
            events
        } else {
            drop(events);
            Vec::new()
        };
        let (reply, rx) = oneshot::channel();
        self.send(|| Command::Append {
            id: id.clone(),
            expected: expected_seq,
            events,
            envelopes,
            refs,
            hot,
            reply,
        })
        .await?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    fn replay(&self, id: &PersistenceId, from_seq: u64, to_seq: u64) -> Replay {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return Replay::failed(JournalError::NoRuntime("replay"));
        };
        let db = self.inner.db.clone();
        let id = id.clone();
        let batch_size = self.inner.config.replay_batch_size.max(1);
        let from_seq = from_seq.max(1);
        // Page by page, each read with its own iterator; the next page is
        // read while the consumer applies the current one. A consumer that
        // stops reading parks nothing but this stream.
        let read = move |from: u64, prev: Option<u64>| {
            let (db, id) = (db.clone(), id.clone());
            handle.spawn_blocking(move || read_page(&db, &id, from, to_seq, batch_size, prev))
        };
        Replay::from_stream(async_stream::try_stream! {
            let mut next = (from_seq <= to_seq).then(|| read(from_seq, None));
            while let Some(job) = next.take() {
                let page = job
                    .await
                    .map_err(|e| JournalError::storage("replaying events", e))??;
                let last = page.events.last().map(|e| e.seq);
                if page.full
                    && let Some(last) = last
                    && last < to_seq
                {
                    next = Some(read(last + 1, Some(last)));
                }
                if !page.events.is_empty() {
                    yield page.events;
                }
                if let Some(e) = page.error {
                    Err(e)?;
                }
            }
        })
    }

    async fn highest_seq(&self, id: &PersistenceId) -> Result<u64> {
        let id = id.clone();
        self.blocking(move |db| stored_highest(db, &id)).await
    }

    async fn save_snapshot(&self, id: &PersistenceId, snapshot: NewSnapshot) -> Result<()> {
        let mut bytes = Vec::new();
        snapshot.encode_envelope(&mut bytes);
        let (reply, rx) = oneshot::channel();
        self.send(|| Command::Snapshot {
            id: id.clone(),
            seq: snapshot.seq,
            bytes,
            reply,
        })
        .await?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    async fn load_snapshot(&self, id: &PersistenceId) -> Result<Option<Snapshot>> {
        let id = id.clone();
        self.blocking(move |db| {
            let bytes = db
                .get_pinned_cf(cf(db, CF_SNAPSHOTS)?, id.as_str())
                .map_err(|e| JournalError::storage("loading a snapshot", e))?;
            bytes.map(|b| Snapshot::from_envelope(&id, &b)).transpose()
        })
        .await
    }

    async fn delete_events_to(&self, id: &PersistenceId, to_seq: u64) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(|| Command::Delete {
            id: id.clone(),
            to_seq,
            manifest: None,
            trim: true,
            reply,
        })
        .await?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    async fn persistence_ids(
        &self,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>> {
        let after = after.cloned();
        self.blocking(move |db| {
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(vec![META_ID_PREFIX + 1]);
            let mut it = db.raw_iterator_cf_opt(cf(db, CF_META)?, ro);
            match &after {
                Some(a) => it.seek(meta_id_key(a)),
                None => it.seek([META_ID_PREFIX]),
            }
            let mut out = Vec::new();
            while let Some(k) = it.key() {
                if out.len() >= limit {
                    break;
                }
                let text =
                    std::str::from_utf8(&k[1..]).map_err(|_| JournalError::CorruptMetadata {
                        key: String::from_utf8_lossy(k).into_owned(),
                        reason: "persistence id is not UTF-8".into(),
                    })?;
                let id = PersistenceId::parse(text)?;
                if after.as_ref() != Some(&id) {
                    out.push(id);
                }
                it.next();
            }
            it.status()
                .map_err(|e| JournalError::storage("listing persistence ids", e))?;
            Ok(out)
        })
        .await
    }

    async fn events_by_tag(
        &self,
        tag: &Tag,
        from_offset: u64,
        limit: usize,
    ) -> Result<Vec<TaggedEvent>> {
        let tag = tag.clone();
        self.blocking(move |db| {
            let mut types = TypeNameCache::default();
            let mut out = Vec::new();
            // Entries whose events were deleted have no envelope: skipped.
            for (offset, id, seq, bytes) in tag_entries(db, &tag, from_offset, limit)? {
                if let Some(bytes) = bytes {
                    let event = PersistedEvent::from_envelope(&id, seq, &bytes, &mut types)?;
                    out.push(TaggedEvent { offset, event });
                }
            }
            Ok(out)
        })
        .await
    }

    fn subscribe_tag(&self, tag: &Tag, from_offset: u64) -> TagSubscription {
        let live = self.inner.live.subscribe();
        subscription::spawn(self.clone(), live, tag.clone(), from_offset)
    }

    async fn flush(&self) -> Result<()> {
        if self.inner.read_only {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.send(|| Command::Flush { reply }).await?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    async fn close(&self) {
        RocksJournal::close(self).await
    }
}

/// Helpers for the tiered layer ([`crate::TieredJournal`]), which owns a
/// `RocksJournal` as its warm tier.
impl RocksJournal {
    pub(crate) fn db(&self) -> &Arc<DB> {
        &self.inner.db
    }

    /// Installs the commit hook (once; later calls are ignored).
    pub(crate) fn set_commit_hook(&self, hook: Arc<dyn CommitHook>) {
        let _ = self.inner.hook.set(hook);
    }

    pub(crate) fn live_feed(&self) -> broadcast::Receiver<TaggedEvent> {
        self.inner.live.subscribe()
    }

    pub(crate) fn replay_batch_size(&self) -> usize {
        self.inner.config.replay_batch_size.max(1)
    }

    /// Deletes the events of `id` up to `to_seq` and writes its cold
    /// manifest in the same atomic batch.
    /// `trim`: the events leave the stream (an application delete), not
    /// just the warm tier (archiving).
    pub(crate) async fn delete_with_manifest(
        &self,
        id: &PersistenceId,
        to_seq: u64,
        manifest: Vec<u8>,
        trim: bool,
    ) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.send(|| Command::Delete {
            id: id.clone(),
            to_seq,
            manifest: Some(manifest),
            trim,
            reply,
        })
        .await?;
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// Runs a blocking closure against the database on Tokio's blocking pool.
    pub(crate) async fn with_db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DB) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.blocking(f).await
    }
}

/// The stored cold manifest bytes of `id`, if any.
pub(crate) fn read_cold_manifest(db: &DB, id: &PersistenceId) -> Result<Option<Vec<u8>>> {
    db.get_cf(cf(db, CF_META)?, cold_manifest_key(id))
        .map_err(|e| JournalError::storage("reading a cold manifest", e))
}

/// Metadata key of the journal's identity (claims a cold store).
const META_JOURNAL_ID: &[u8] = b"\x01journal_id";

/// The journal's identity, created on first use.
pub(crate) fn journal_id(db: &DB) -> Result<String> {
    let meta = cf(db, CF_META)?;
    if let Some(v) = db
        .get_cf(meta, META_JOURNAL_ID)
        .map_err(|e| JournalError::storage("reading the journal id", e))?
    {
        return Ok(String::from_utf8_lossy(&v).into_owned());
    }
    let id = format!("{:032x}", rand::random::<u128>());
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.put_cf_opt(meta, META_JOURNAL_ID, id.as_bytes(), &wo)
        .map_err(|e| JournalError::storage("writing the journal id", e))?;
    Ok(id)
}

/// True when any id has a cold manifest.
pub(crate) fn any_cold_manifest(db: &DB) -> Result<bool> {
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(vec![META_COLD_PREFIX + 1]);
    let mut it = db.raw_iterator_cf_opt(cf(db, CF_META)?, ro);
    it.seek([META_COLD_PREFIX]);
    let found = it.valid();
    it.status()
        .map_err(|e| JournalError::storage("looking for cold manifests", e))?;
    Ok(found)
}

/// Every cold manifest, as (id, bytes), in id order.
pub(crate) fn all_cold_manifests(db: &DB) -> Result<Vec<(PersistenceId, Vec<u8>)>> {
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(vec![META_COLD_PREFIX + 1]);
    let mut it = db.raw_iterator_cf_opt(cf(db, CF_META)?, ro);
    it.seek([META_COLD_PREFIX]);
    let mut out = Vec::new();
    while let Some((k, v)) = it.item() {
        let text = std::str::from_utf8(&k[1..]).map_err(|_| JournalError::CorruptMetadata {
            key: String::from_utf8_lossy(k).into_owned(),
            reason: "persistence id is not UTF-8".into(),
        })?;
        out.push((PersistenceId::parse(text)?, v.to_vec()));
        it.next();
    }
    it.status()
        .map_err(|e| JournalError::storage("listing cold manifests", e))?;
    Ok(out)
}

/// The deleted-to mark of `id` (0 when nothing was deleted or archived).
pub(crate) fn deleted_to_mark(db: &DB, id: &PersistenceId) -> Result<u64> {
    let key = meta_id_key(id);
    match db
        .get_pinned_cf(cf(db, CF_META)?, &key)
        .map_err(|e| JournalError::storage("reading id metadata", e))?
    {
        None => Ok(0),
        Some(v) => be_u64(&v).ok_or_else(|| JournalError::CorruptMetadata {
            key: String::from_utf8_lossy(&key).into_owned(),
            reason: format!("expected 8 bytes, found {}", v.len()),
        }),
    }
}

/// Up to `max_events` stored envelopes of `id` from `from_seq` on (and at
/// most `max_bytes` of them, but always at least one), with their sequences.
pub(crate) fn read_raw(
    db: &DB,
    id: &PersistenceId,
    from_seq: u64,
    max_events: usize,
    max_bytes: usize,
) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut ro = replay_read_options();
    ro.set_iterate_upper_bound(upper_bound(id.as_str()));
    let mut it = db.raw_iterator_cf_opt(cf(db, CF_EVENTS)?, ro);
    it.seek(event_key(id, from_seq));
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some((k, v)) = it.item() {
        if out.len() >= max_events || (!out.is_empty() && bytes + v.len() > max_bytes) {
            break;
        }
        let seq = split_seq_key(k).map_or(0, |(_, s)| s);
        bytes += v.len();
        out.push((seq, v.to_vec()));
        it.next();
    }
    it.status()
        .map_err(|e| JournalError::storage("reading events to archive", e))?;
    Ok(out)
}

/// Every (id, seq) recorded as referring to blob `hash`.
pub(crate) fn blob_refs(db: &DB, hash: &[u8; 32]) -> Result<Vec<(PersistenceId, u64)>> {
    let prefix = blob_ref_prefix(hash);
    let mut upper = prefix.clone();
    // The hash is followed by at least one id byte; bump the last prefix
    // byte (with carry) for an exclusive upper bound.
    let mut i = upper.len();
    loop {
        i -= 1;
        if upper[i] == 0xff {
            upper[i] = 0;
            if i == 0 {
                upper.clear();
                break;
            }
        } else {
            upper[i] += 1;
            break;
        }
    }
    let mut ro = ReadOptions::default();
    if !upper.is_empty() {
        ro.set_iterate_upper_bound(upper);
    }
    let mut it = db.raw_iterator_cf_opt(cf(db, CF_META)?, ro);
    it.seek(&prefix);
    let mut out = Vec::new();
    while let Some(k) = it.key() {
        if !k.starts_with(&prefix) {
            break;
        }
        let rest = &k[prefix.len()..];
        let bad = || JournalError::CorruptMetadata {
            key: String::from_utf8_lossy(k).into_owned(),
            reason: "malformed blob reference".into(),
        };
        let (id_bytes, seq) = split_seq_key(rest).ok_or_else(bad)?;
        let id = std::str::from_utf8(id_bytes)
            .map_err(|_| bad())
            .and_then(PersistenceId::parse)?;
        out.push((id, seq));
        it.next();
    }
    it.status()
        .map_err(|e| JournalError::storage("reading blob references", e))?;
    Ok(out)
}

/// Removes blob references (stale ones, found by the blob collector).
pub(crate) fn remove_blob_refs(
    db: &DB,
    hash: &[u8; 32],
    refs: &[(PersistenceId, u64)],
) -> Result<()> {
    if refs.is_empty() {
        return Ok(());
    }
    let meta = cf(db, CF_META)?;
    let mut batch = rocksdb::WriteBatch::default();
    let mut key = Vec::new();
    for (id, seq) in refs {
        blob_ref_key(&mut key, hash, id, *seq);
        batch.delete_cf(meta, &key);
    }
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(batch, &wo)
        .map_err(|e| JournalError::storage("removing stale blob references", e))
}

/// Tag index entries of `tag` from `from_offset`: (offset, id, seq, the
/// stored envelope if the event is still in RocksDB).
#[allow(clippy::type_complexity)]
pub(crate) fn tag_entries(
    db: &DB,
    tag: &Tag,
    from_offset: u64,
    limit: usize,
) -> Result<Vec<(u64, PersistenceId, u64, Option<Vec<u8>>)>> {
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(upper_bound(tag.as_str()));
    let mut it = db.raw_iterator_cf_opt(cf(db, CF_TAGS)?, ro);
    let mut key = Vec::new();
    seq_key(&mut key, tag.as_str(), from_offset);
    it.seek(&key);
    let mut refs = Vec::new();
    while let Some((k, v)) = it.item() {
        if refs.len() >= limit {
            break;
        }
        let bad = |reason: &str| JournalError::CorruptMetadata {
            key: String::from_utf8_lossy(k).into_owned(),
            reason: reason.to_owned(),
        };
        let (_, offset) = split_seq_key(k).ok_or_else(|| bad("malformed tag key"))?;
        let (seq, id_bytes) = split_tag_value(v).ok_or_else(|| bad("malformed tag entry"))?;
        let id = std::str::from_utf8(id_bytes)
            .map_err(|_| bad("id is not UTF-8"))
            .and_then(PersistenceId::parse)?;
        refs.push((offset, id, seq));
        it.next();
    }
    it.status()
        .map_err(|e| JournalError::storage("reading a tag", e))?;
    let keys: Vec<_> = refs
        .iter()
        .map(|(_, id, seq)| event_key(id, *seq))
        .collect();
    let values = db.batched_multi_get_cf(cf(db, CF_EVENTS)?, &keys, false);
    refs.into_iter()
        .zip(values)
        .map(|((offset, id, seq), v)| {
            let v = v.map_err(|e| JournalError::storage("reading tagged events", e))?;
            Ok((offset, id, seq, v.map(|b| b.to_vec())))
        })
        .collect()
}

/// Approximate on-disk bytes of the events of one kind (`kind/` keys).
pub(crate) fn approximate_kind_bytes(db: &DB, kind: &str) -> Result<u64> {
    let start = format!("{kind}/").into_bytes();
    let mut end = format!("{kind}/").into_bytes();
    if let Some(last) = end.last_mut() {
        *last += 1; // '/' + 1 = '0'
    }
    let events = cf(db, CF_EVENTS)?;
    let sizes = db.get_approximate_sizes_cf(events, &[rocksdb::Range::new(&start, &end)]);
    Ok(sizes.first().copied().unwrap_or(0))
}

/// Calls `f(kind, envelope length)` for every stored event, and `progress`
/// every 4,096 events.
pub(crate) fn scan_event_sizes(
    db: &DB,
    mut f: impl FnMut(&str, usize),
    mut progress: impl FnMut(u64),
) -> Result<()> {
    let mut it = db.raw_iterator_cf_opt(cf(db, CF_EVENTS)?, replay_read_options());
    it.seek_to_first();
    let mut n = 0u64;
    while let Some((k, v)) = it.item() {
        if let Some((id, _)) = split_seq_key(k) {
            let id = String::from_utf8_lossy(id);
            let kind = id.split_once('/').map_or(&*id, |(k, _)| k);
            f(kind, v.len());
        }
        n += 1;
        if n.is_multiple_of(4096) {
            progress(n);
        }
        it.next();
    }
    it.status()
        .map_err(|e| JournalError::storage("scanning events", e))?;
    progress(n);
    Ok(())
}

/// Flushes memtables and compacts the events column family to its
/// bottommost level (benchmarks and tools measuring stored size).
pub fn compact_events(journal: &RocksJournal) -> Result<()> {
    let db = &journal.inner.db;
    let events = cf(db, CF_EVENTS)?;
    db.flush_cf(events)
        .map_err(|e| JournalError::storage("flushing events", e))?;
    let mut opts = rocksdb::CompactOptions::default();
    opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
    db.compact_range_cf_opt(events, None::<&[u8]>, None::<&[u8]>, &opts);
    Ok(())
}

/// Bytes of the SST files of the events column family.
pub fn events_sst_bytes(journal: &RocksJournal) -> Result<u64> {
    let db = &journal.inner.db;
    let events = cf(db, CF_EVENTS)?;
    Ok(db
        .property_int_value_cf(events, rocksdb::properties::TOTAL_SST_FILES_SIZE)
        .map_err(|e| JournalError::storage("reading the SST size", e))?
        .unwrap_or(0))
}

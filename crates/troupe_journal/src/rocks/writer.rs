//! The group-commit writer thread.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use lru::LruCache;
use rocksdb::{DB, WriteBatch, WriteOptions};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::keys::*;
use super::{CommitHook, RocksConfig, WriterStats, cf, stored_highest};
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
        /// Blob references: (index of the event in this append, blob hash).
        refs: Vec<(usize, [u8; 32])>,
        /// `events` holds every event (not only tagged ones) for the commit
        /// hook.
        hot: bool,
        reply: oneshot::Sender<Result<AppendOutcome>>,
    },
    Snapshot {
        id: PersistenceId,
        seq: u64,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Deletes events up to `to_seq` and, atomically with that, writes
    /// the id's cold manifest when one is given (archiving, tiered delete).
    Delete {
        id: PersistenceId,
        to_seq: u64,
        manifest: Option<Vec<u8>>,
        /// The events leave the stream (an application delete), as opposed
        /// to moving to the cold tier: the commit hook is told.
        trim: bool,
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
pub(crate) enum Pending {
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
    key_arena: Vec<u8>,
    puts: Vec<(std::ops::Range<usize>, Vec<u8>)>,
    acker: Option<mpsc::Sender<Acked>>,
    hook: Arc<std::sync::OnceLock<Arc<dyn CommitHook>>>,
}

/// Where a committed batch is reported: the live feed of tagged events,
/// the counters, the acker task and the commit hook.
pub(crate) struct Outputs {
    pub(crate) live: broadcast::Sender<TaggedEvent>,
    pub(crate) stats: Arc<WriterStats>,
    pub(crate) acker: Option<mpsc::Sender<Acked>>,
    pub(crate) hook: Arc<std::sync::OnceLock<Arc<dyn CommitHook>>>,
}

/// What the commit hook is told, in commit order.
enum HookOp {
    Appended(PersistenceId, u64, Vec<crate::event::PersistedEvent>),
    Deleted(PersistenceId, u64),
}

/// A committed batch's replies, and buffers to free off the writer thread.
pub(crate) type Acked = (Vec<Pending>, Vec<Vec<u8>>);

/// Answers a committed batch's callers.
pub(crate) fn answer(replies: Vec<Pending>) {
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
}

/// Runs on the Tokio runtime that opened the journal: waking hundreds of
/// callers from inside the runtime schedules them on local run queues,
/// where the same wakes from the writer thread would each cost a
/// cross-thread unpark. It also takes that work off the writer's path.
pub(crate) async fn acker(mut rx: mpsc::Receiver<Acked>) {
    while let Some((replies, garbage)) = rx.recv().await {
        answer(replies);
        drop(garbage);
    }
}

impl Writer {
    /// Hands replies to the acker task, or answers them here when there is
    /// none (no runtime at open, or it is gone or behind).
    fn deliver(&mut self, replies: Vec<Pending>, garbage: Vec<Vec<u8>>) {
        let Some(tx) = &self.acker else {
            return answer(replies);
        };
        match tx.try_send((replies, garbage)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full((replies, _))) => answer(replies),
            Err(mpsc::error::TrySendError::Closed((replies, _))) => {
                self.acker = None;
                answer(replies);
            }
        }
    }

    pub(crate) fn new(
        db: Arc<DB>,
        config: &RocksConfig,
        write_opts: WriteOptions,
        next_offset: u64,
        outputs: Outputs,
    ) -> Self {
        let Outputs {
            live,
            stats,
            acker,
            hook,
        } = outputs;
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
            key_arena: Vec::new(),
            puts: Vec::new(),
            acker,
            hook,
        }
    }

    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        raise_priority();
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
        let mut hook_ops = Vec::new();
        // Delete marks set earlier in this batch (not yet on disk).
        let mut marks: std::collections::HashMap<PersistenceId, u64> = Default::default();
        // Event puts are sorted by key before they go into the batch: the
        // memtable's skip list inserts ascending keys far faster than
        // scattered ones, and the order within one atomic batch is free.
        let mut key_arena = std::mem::take(&mut self.key_arena);
        let mut puts = std::mem::take(&mut self.puts);
        key_arena.clear();
        puts.clear();
        for cmd in commands.drain(..) {
            match cmd {
                Command::Append {
                    id,
                    expected,
                    events,
                    envelopes,
                    refs,
                    hot,
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
                    let count = envelopes.len() as u64;
                    // `events` is empty unless some event carries tags or
                    // the commit hook wants them.
                    let mut events = events.into_iter();
                    let mut for_hook = Vec::new();
                    for (i, env) in envelopes.into_iter().enumerate() {
                        let ev = events.next();
                        let seq = first + i as u64;
                        let ev = match ev {
                            Some(ev) if hot => {
                                let p = ev.into_persisted(id.clone(), seq);
                                for_hook.push(p.clone());
                                Some(p)
                            }
                            Some(ev) => Some(ev.into_persisted(id.clone(), seq)),
                            None => None,
                        };
                        let start = key_arena.len();
                        key_arena.extend_from_slice(id.as_str().as_bytes());
                        key_arena.push(0);
                        key_arena.extend_from_slice(&seq.to_be_bytes());
                        puts.push((start..key_arena.len(), env));
                        if let Some(ev) = ev
                            && !ev.tags.is_empty()
                        {
                            tag_value(&mut value, &id, seq);
                            for tag in &ev.tags {
                                seq_key(&mut key, tag.as_str(), offset);
                                batch.put_cf(tags_cf, &key, &value);
                            }
                            if publish {
                                live.push(TaggedEvent { offset, event: ev });
                            }
                            offset += 1;
                        }
                        appended += 1;
                    }
                    for (i, hash) in refs {
                        blob_ref_key(&mut key, &hash, &id, first + i as u64);
                        batch.put_cf(meta_cf, &key, []);
                    }
                    let last_seq = current + count;
                    if hot {
                        hook_ops.push(HookOp::Appended(id.clone(), current, for_hook));
                    }
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
                        check_snapshot(&id, seq, highest)?;
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
                Command::Delete {
                    id,
                    to_seq,
                    manifest,
                    trim,
                    reply,
                } => {
                    let result = self.highest(&id).and_then(|highest| {
                        check_delete(&id, to_seq, highest)?;
                        if let Some(m) = &manifest {
                            batch.put_cf(meta_cf, cold_manifest_key(&id), m);
                        }
                        if to_seq > 0 {
                            batch.delete_range_cf(
                                events_cf,
                                event_key(&id, 0),
                                event_key(&id, to_seq + 1),
                            );
                            let meta_key = meta_id_key(&id);
                            // A mark set earlier in this batch is not on disk yet.
                            let old = match marks.get(&id) {
                                Some(m) => *m,
                                None => db
                                    .get_pinned_cf(meta_cf, &meta_key)
                                    .map_err(|e| JournalError::storage("reading id metadata", e))?
                                    .and_then(|v| be_u64(&v))
                                    .unwrap_or(0),
                            };
                            let mark = old.max(to_seq);
                            marks.insert(id.clone(), mark);
                            batch.put_cf(meta_cf, meta_key, mark.to_be_bytes());
                        }
                        Ok(())
                    });
                    if result.is_ok() && trim {
                        hook_ops.push(HookOp::Deleted(id, to_seq));
                    }
                    replies.push(Pending::Unit(reply, result));
                }
                Command::Flush { reply } => {
                    flush = true;
                    replies.push(Pending::Unit(reply, Ok(())));
                }
            }
        }
        puts.sort_unstable_by(|a, b| key_arena[a.0.clone()].cmp(&key_arena[b.0.clone()]));
        // The envelopes are copied into the batch; their buffers are freed
        // by the acker, off this thread.
        let mut garbage = Vec::with_capacity(puts.len());
        for (k, env) in puts.drain(..) {
            batch.put_cf(events_cf, &key_arena[k], &env);
            garbage.push(env);
        }
        self.key_arena = key_arena;
        self.puts = puts;
        if offset != self.next_offset {
            batch.put_cf(meta_cf, META_NEXT_OFFSET, offset.to_be_bytes());
        }
        let batch_len = batch.len();
        let storage_started = Instant::now();
        let mut result = if batch_len == 0 {
            Ok(())
        } else {
            db.write_opt(batch, &self.write_opts)
                .map_err(|e| e.to_string())
        };
        if flush && result.is_ok() {
            result = db.flush_wal(true).map_err(|e| e.to_string());
        }
        let storage = storage_started.elapsed();
        match result {
            Ok(()) => {
                self.next_offset = offset;
                // In commit order, before anyone is answered: the hook's view
                // is never behind an acknowledged write.
                if let Some(hook) = self.hook.get() {
                    for op in hook_ops {
                        match op {
                            HookOp::Appended(id, expected, events) => {
                                hook.appended(&id, expected, events)
                            }
                            HookOp::Deleted(id, to_seq) => hook.deleted(&id, to_seq),
                        }
                    }
                }
                metrics::histogram!("troupe_journal_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!("troupe_journal_batch_events").record(appended as f64);
                metrics::counter!("troupe_journal_events_appended_total").increment(appended);
                self.deliver(replies, garbage);
                for ev in live {
                    let _ = self.live.send(ev);
                }
                self.stats.record(appended, started.elapsed(), storage);
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

/// Every durable write in the process funnels through this thread, so it
/// asks the scheduler for a larger share of the CPU than the actor threads
/// that feed it (nice -5 on Linux). Without the privilege to do so it runs
/// at normal priority, which only costs throughput on a saturated machine.
fn raise_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread; no memory is shared.
        let rc = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, -5)
        };
        if rc != 0 {
            tracing::debug!(
                "could not raise the journal writer's priority; running at normal priority"
            );
        }
    }
}

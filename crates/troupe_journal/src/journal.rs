//! The [`Journal`] trait every backend implements, and the streams it returns.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::error::{JournalError, Result};
use crate::event::{AppendOutcome, NewEvent, NewSnapshot, PersistedEvent, Snapshot, TaggedEvent};
use crate::id::{PersistenceId, Tag};

/// Events per replay batch unless a backend is configured otherwise.
pub const DEFAULT_REPLAY_BATCH: usize = 1024;

/// What "acknowledged" means for an append.
///
/// | mode | acknowledged when | survives | cost per group commit |
/// |---|---|---|---|
/// | `Fsync` (default) | the write-ahead log is fsynced | process crash and power loss | one fsync |
/// | `Buffered` | the write is in the OS page cache | process crash, not power loss | none |
/// | `InMemory` | the write is in this process's memory | nothing | none |
///
/// `InMemory` selects [`crate::InMemoryJournal`]; the other two select
/// [`crate::RocksJournal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Fsync the write-ahead log before acknowledging.
    #[default]
    Fsync,
    /// Write the write-ahead log without fsync.
    Buffered,
    /// Keep events in process memory only (tests, examples).
    InMemory,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fsync" => Ok(Self::Fsync),
            "buffered" => Ok(Self::Buffered),
            "in_memory" | "in-memory" | "memory" => Ok(Self::InMemory),
            other => Err(format!(
                "unknown durability `{other}` (expected fsync, buffered or in_memory)"
            )),
        }
    }
}

/// An append-only store of events per persistence id.
///
/// All methods take `&self` and are safe to call concurrently; backends are
/// cheap to clone handles. Every backend passes the conformance suite in
/// [`crate::tck`].
#[async_trait::async_trait]
pub trait Journal: Send + Sync + 'static {
    /// Appends `events` to `id`, provided its highest sequence is still
    /// `expected_seq` (0 for a new id). Otherwise nothing is written and the
    /// call fails with [`JournalError::SeqConflict`]. Returns once the events
    /// are as durable as the journal's [`Durability`] promises.
    async fn append(
        &self,
        id: &PersistenceId,
        expected_seq: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome>;

    /// Streams the events of `id` with `from_seq <= seq <= to_seq` in order,
    /// in batches of at most the backend's replay batch size. Memory stays
    /// bounded however long the stream. A corrupt entry ends the stream with
    /// an error naming its sequence.
    fn replay(&self, id: &PersistenceId, from_seq: u64, to_seq: u64) -> Replay;

    /// Highest sequence ever written to `id` (0 if none); unaffected by
    /// deleting events.
    async fn highest_seq(&self, id: &PersistenceId) -> Result<u64>;

    /// Stores a snapshot. The journal keeps the one with the highest
    /// sequence; a snapshot past the highest event is refused.
    async fn save_snapshot(&self, id: &PersistenceId, snapshot: NewSnapshot) -> Result<()>;

    /// The latest snapshot of `id`, if any.
    async fn load_snapshot(&self, id: &PersistenceId) -> Result<Option<Snapshot>>;

    /// Deletes the events of `id` up to and including `to_seq` (at most its
    /// highest sequence). The highest sequence stays.
    async fn delete_events_to(&self, id: &PersistenceId, to_seq: u64) -> Result<()>;

    /// Up to `limit` persistence ids in order, starting after `after`.
    async fn persistence_ids(
        &self,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>>;

    /// Up to `limit` events carrying `tag` with offset `>= from_offset`, in
    /// offset order. Tag entries whose events were deleted are skipped.
    async fn events_by_tag(
        &self,
        tag: &Tag,
        from_offset: u64,
        limit: usize,
    ) -> Result<Vec<TaggedEvent>>;

    /// Every event carrying `tag` from `from_offset` on: first those already
    /// stored, then live ones as they are appended, with no gap and no
    /// duplicate between the two.
    fn subscribe_tag(&self, tag: &Tag, from_offset: u64) -> TagSubscription;

    /// Makes every acknowledged write durable on disk, whatever the
    /// durability mode (used on shutdown).
    async fn flush(&self) -> Result<()>;

    /// Stops taking writes once everything queued is committed and
    /// releases what the backend holds (a RocksDB directory's lock), so the
    /// same storage can be opened again in this process. Later writes fail
    /// with [`JournalError::Closed`](crate::JournalError::Closed). Nothing to do by default.
    async fn close(&self) {}
}

#[async_trait::async_trait]
impl<J: Journal + ?Sized> Journal for Arc<J> {
    async fn append(
        &self,
        id: &PersistenceId,
        expected_seq: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome> {
        (**self).append(id, expected_seq, events).await
    }
    fn replay(&self, id: &PersistenceId, from_seq: u64, to_seq: u64) -> Replay {
        (**self).replay(id, from_seq, to_seq)
    }
    async fn highest_seq(&self, id: &PersistenceId) -> Result<u64> {
        (**self).highest_seq(id).await
    }
    async fn save_snapshot(&self, id: &PersistenceId, snapshot: NewSnapshot) -> Result<()> {
        (**self).save_snapshot(id, snapshot).await
    }
    async fn load_snapshot(&self, id: &PersistenceId) -> Result<Option<Snapshot>> {
        (**self).load_snapshot(id).await
    }
    async fn delete_events_to(&self, id: &PersistenceId, to_seq: u64) -> Result<()> {
        (**self).delete_events_to(id, to_seq).await
    }
    async fn persistence_ids(
        &self,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>> {
        (**self).persistence_ids(after, limit).await
    }
    async fn events_by_tag(
        &self,
        tag: &Tag,
        from_offset: u64,
        limit: usize,
    ) -> Result<Vec<TaggedEvent>> {
        (**self).events_by_tag(tag, from_offset, limit).await
    }
    fn subscribe_tag(&self, tag: &Tag, from_offset: u64) -> TagSubscription {
        (**self).subscribe_tag(tag, from_offset)
    }
    async fn flush(&self) -> Result<()> {
        (**self).flush().await
    }
    async fn close(&self) {
        (**self).close().await
    }
}

type BatchStream = Pin<Box<dyn Stream<Item = Result<Vec<PersistedEvent>>> + Send>>;

/// A replay in progress: a stream of event batches, each at most the
/// backend's batch size. After an `Err` item the stream ends.
#[must_use = "a replay does nothing unless polled"]
pub struct Replay {
    inner: BatchStream,
}

impl Replay {
    /// Wraps any stream of batches.
    pub fn from_stream(
        s: impl Stream<Item = Result<Vec<PersistedEvent>>> + Send + 'static,
    ) -> Self {
        Self { inner: Box::pin(s) }
    }

    /// A replay that fails at once.
    pub fn failed(err: JournalError) -> Self {
        Self::from_stream(futures::stream::once(async move { Err(err) }))
    }

    /// Collects every event into memory. Only for streams known to be short
    /// (tests, tools); recovery should consume batches.
    pub async fn collect_all(mut self) -> Result<Vec<PersistedEvent>> {
        let mut out = Vec::new();
        while let Some(batch) = self.next().await {
            out.extend(batch?);
        }
        Ok(out)
    }

    /// Folds every event into an accumulator, batch by batch.
    pub async fn try_fold_events<A>(
        mut self,
        mut acc: A,
        mut f: impl FnMut(A, PersistedEvent) -> Result<A>,
    ) -> Result<A> {
        while let Some(batch) = self.next().await {
            for ev in batch? {
                acc = f(acc, ev)?;
            }
        }
        Ok(acc)
    }
}

impl Stream for Replay {
    type Item = Result<Vec<PersistedEvent>>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// A live subscription to one tag (see [`Journal::subscribe_tag`]).
///
/// Backed by a task that stops when the subscription is dropped. Items are
/// buffered in a bounded channel; a slow consumer slows the catch-up reads,
/// and falls back to reading from storage if it lags behind live appends.
pub struct TagSubscription {
    rx: mpsc::Receiver<Result<TaggedEvent>>,
    /// None for a subscription that failed before it started.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TagSubscription {
    pub(crate) fn new(
        rx: mpsc::Receiver<Result<TaggedEvent>>,
        task: tokio::task::JoinHandle<()>,
    ) -> Self {
        Self {
            rx,
            task: Some(task),
        }
    }

    /// A subscription that yields one error and ends.
    pub fn failed(err: JournalError) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Err(err));
        Self { rx, task: None }
    }

    /// The next event, or `None` when the journal closed.
    pub async fn recv(&mut self) -> Option<Result<TaggedEvent>> {
        self.rx.recv().await
    }
}

impl Drop for TagSubscription {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Stream for TagSubscription {
    type Item = Result<TaggedEvent>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

//! A journal wrapper that injects faults, for other crates' tests.
//!
//! Wrap any backend, keep the [`FaultPlan`] handle, and arm faults as the
//! test goes:
//!
//! | fault | what the caller sees | what the journal holds |
//! |---|---|---|
//! | [`FaultPlan::fail_appends`] | `Err(Injected)` | nothing new |
//! | [`FaultPlan::lose_acks`] | `Err(Injected)` (a time-out, say) | the events |
//! | [`FaultPlan::corrupt_reads`] | replayed events with garbage payloads | the good events |
//! | [`FaultPlan::hold_reads`] | snapshot loads wait until [`FaultPlan::release_reads`] | unchanged |
//!
//! The second is the case that breaks naive retry logic: the write happened,
//! the writer does not know it, and a blind retry gets a `SeqConflict`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::StreamExt;

use crate::error::{JournalError, Result};
use crate::event::{AppendOutcome, NewEvent, NewSnapshot, Snapshot, TaggedEvent};
use crate::id::{PersistenceId, Tag};
use crate::journal::{Journal, Replay, TagSubscription};

#[derive(Default)]
struct Plan {
    fail_appends: u32,
    lose_acks: u32,
    corrupt: HashSet<(PersistenceId, u64)>,
    appends_seen: u64,
}

/// Shared control over the faults a [`FaultyJournal`] injects.
#[derive(Clone)]
pub struct FaultPlan(Arc<Mutex<Plan>>, Arc<tokio::sync::watch::Sender<bool>>);

impl Default for FaultPlan {
    fn default() -> Self {
        Self(
            Arc::default(),
            Arc::new(tokio::sync::watch::Sender::new(false)),
        )
    }
}

impl FaultPlan {
    fn with<T>(&self, f: impl FnOnce(&mut Plan) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The next `n` appends fail without writing anything.
    pub fn fail_appends(&self, n: u32) {
        self.with(|p| p.fail_appends += n);
    }

    /// The next `n` appends are written but reported as failed.
    pub fn lose_acks(&self, n: u32) {
        self.with(|p| p.lose_acks += n);
    }

    /// Replays of `id` return garbage payload bytes for event `seq`.
    pub fn corrupt_reads(&self, id: &PersistenceId, seq: u64) {
        self.with(|p| p.corrupt.insert((id.clone(), seq)));
    }

    /// Snapshot loads (where every recovery starts) wait until
    /// [`FaultPlan::release_reads`]: a recovery that cannot finish, for as
    /// long as the test wants.
    pub fn hold_reads(&self) {
        self.1.send_replace(true);
    }

    /// Lets held and later snapshot loads through.
    pub fn release_reads(&self) {
        self.1.send_replace(false);
    }

    /// Stops corrupting reads.
    pub fn heal_reads(&self) {
        self.with(|p| p.corrupt.clear());
    }

    /// Appends attempted through the wrapper so far.
    pub fn appends_seen(&self) -> u64 {
        self.with(|p| p.appends_seen)
    }
}

/// Garbage that no rmp-serde decoder accepts (0xc1 is a reserved marker).
pub const GARBAGE_PAYLOAD: &[u8] = &[0xc1, 0xc1, 0xde, 0xad];

/// A [`Journal`] that injects the faults armed in its [`FaultPlan`].
#[derive(Clone)]
pub struct FaultyJournal<J> {
    inner: J,
    plan: FaultPlan,
}

impl<J: Journal + Clone> FaultyJournal<J> {
    /// Wraps `inner`; returns the wrapper and its plan.
    pub fn new(inner: J) -> (Self, FaultPlan) {
        let plan = FaultPlan::default();
        (
            Self {
                inner,
                plan: plan.clone(),
            },
            plan,
        )
    }

    /// The wrapped journal.
    pub fn inner(&self) -> &J {
        &self.inner
    }
}

#[async_trait::async_trait]
impl<J: Journal + Clone> Journal for FaultyJournal<J> {
    async fn append(
        &self,
        id: &PersistenceId,
        expected_seq: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome> {
        enum Action {
            Fail,
            LoseAck,
            Pass,
        }
        let action = self.plan.with(|p| {
            p.appends_seen += 1;
            if p.fail_appends > 0 {
                p.fail_appends -= 1;
                Action::Fail
            } else if p.lose_acks > 0 {
                p.lose_acks -= 1;
                Action::LoseAck
            } else {
                Action::Pass
            }
        });
        match action {
            Action::Fail => Err(JournalError::Injected(format!(
                "append to `{id}` failed before writing"
            ))),
            Action::LoseAck => {
                self.inner.append(id, expected_seq, events).await?;
                Err(JournalError::Injected(format!(
                    "append to `{id}` was written but its acknowledgement was lost"
                )))
            }
            Action::Pass => self.inner.append(id, expected_seq, events).await,
        }
    }

    fn replay(&self, id: &PersistenceId, from_seq: u64, to_seq: u64) -> Replay {
        let plan = self.plan.clone();
        Replay::from_stream(self.inner.replay(id, from_seq, to_seq).map(move |batch| {
            batch.map(|mut events| {
                plan.with(|p| {
                    for ev in &mut events {
                        if p.corrupt.contains(&(ev.id.clone(), ev.seq)) {
                            ev.payload = GARBAGE_PAYLOAD.to_vec();
                        }
                    }
                });
                events
            })
        }))
    }

    async fn highest_seq(&self, id: &PersistenceId) -> Result<u64> {
        self.inner.highest_seq(id).await
    }
    async fn save_snapshot(&self, id: &PersistenceId, snapshot: NewSnapshot) -> Result<()> {
        self.inner.save_snapshot(id, snapshot).await
    }
    async fn load_snapshot(&self, id: &PersistenceId) -> Result<Option<Snapshot>> {
        let mut held = self.plan.1.subscribe();
        // Err only when the plan is gone, which the wrapper keeps alive.
        let _ = held.wait_for(|h| !*h).await;
        self.inner.load_snapshot(id).await
    }
    async fn delete_events_to(&self, id: &PersistenceId, to_seq: u64) -> Result<()> {
        self.inner.delete_events_to(id, to_seq).await
    }
    async fn persistence_ids(
        &self,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>> {
        self.inner.persistence_ids(after, limit).await
    }
    async fn events_by_tag(
        &self,
        tag: &Tag,
        from_offset: u64,
        limit: usize,
    ) -> Result<Vec<TaggedEvent>> {
        self.inner.events_by_tag(tag, from_offset, limit).await
    }
    fn subscribe_tag(&self, tag: &Tag, from_offset: u64) -> TagSubscription {
        self.inner.subscribe_tag(tag, from_offset)
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InMemoryJournal;

    fn ev(n: u8) -> NewEvent {
        NewEvent::raw("t", 1, vec![0x90 + n % 16]).unwrap()
    }

    #[tokio::test]
    async fn a_lost_ack_leaves_the_events_written() {
        let (j, plan) = FaultyJournal::new(InMemoryJournal::new());
        let id = PersistenceId::parse("a/1").unwrap();
        plan.lose_acks(1);
        assert!(matches!(
            j.append(&id, 0, vec![ev(1)]).await,
            Err(JournalError::Injected(_))
        ));
        assert_eq!(j.highest_seq(&id).await.unwrap(), 1);
        // A blind retry is refused, not duplicated.
        assert!(matches!(
            j.append(&id, 0, vec![ev(1)]).await,
            Err(JournalError::SeqConflict { actual: 1, .. })
        ));
    }

    #[tokio::test]
    async fn a_failed_append_writes_nothing_and_corrupt_reads_are_decode_errors() {
        let (j, plan) = FaultyJournal::new(InMemoryJournal::new());
        let id = PersistenceId::parse("a/1").unwrap();
        plan.fail_appends(1);
        assert!(j.append(&id, 0, vec![ev(1)]).await.is_err());
        assert_eq!(j.highest_seq(&id).await.unwrap(), 0);
        j.append(&id, 0, vec![ev(1), ev(2)]).await.unwrap();
        plan.corrupt_reads(&id, 2);
        let events = j.replay(&id, 1, u64::MAX).collect_all().await.unwrap();
        assert_eq!(events[1].payload, GARBAGE_PAYLOAD);
        assert_eq!(plan.appends_seen(), 2);
    }
}

//! The journal conformance suite (TCK): the behaviour every backend must have.
//!
//! A backend implements [`TckHarness`] (open, close, reopen and corrupt its
//! storage) and runs every check with [`journal_tck!`](crate::journal_tck):
//!
//! ```ignore
//! struct Mem(InMemoryJournal);
//! // impl TckHarness for Mem { ... }
//! troupe_journal::journal_tck!(Mem(InMemoryJournal::new()));
//! ```
//!
//! Checks panic with a message naming the violated property.

use std::collections::{BTreeMap, HashSet};

use futures::StreamExt;

use crate::error::JournalError;
use crate::event::{NewEvent, NewSnapshot, PersistedEvent};
use crate::id::{PersistenceId, Tag};
use crate::journal::Journal;

/// What the suite needs from a backend's test setup.
#[async_trait::async_trait]
pub trait TckHarness: Send {
    /// The backend under test.
    type Journal: Journal + Clone;
    /// Opens the journal on this harness's storage; after [`close`](Self::close),
    /// opens the same storage again (a restart).
    async fn open(&mut self) -> Self::Journal;
    /// Closes a handle so that the storage can be reopened.
    async fn close(&mut self, journal: Self::Journal);
    /// Overwrites the stored bytes of one event, bypassing every check.
    async fn overwrite_raw(
        &mut self,
        journal: &Self::Journal,
        id: &PersistenceId,
        seq: u64,
        bytes: &[u8],
    );
    /// The backend's replay batch size.
    fn replay_batch_size(&self) -> usize;
}

/// Runs every check of the suite as its own `#[tokio::test]`.
///
/// `$make` is an expression that builds a fresh harness (it is evaluated
/// once per test). The calling crate needs `tokio` with the `macros` and
/// `rt-multi-thread` features.
#[macro_export]
macro_rules! journal_tck {
    ($make:expr) => {
        $crate::journal_tck!(@tests $make;
            append_then_replay_returns_events_in_order,
            stale_writer_gets_seq_conflict_and_nothing_is_overwritten,
            concurrent_appenders_on_one_id_never_lose_or_duplicate,
            concurrent_appenders_on_many_ids_keep_each_stream_dense,
            replay_after_reopen_returns_the_same_events,
            replay_is_delivered_in_bounded_batches,
            stalled_replays_hold_nothing_others_need,
            snapshots_and_deletion_keep_the_highest_sequence,
            tag_subscription_has_no_gap_or_duplicate_at_the_seam,
            corrupt_entries_are_reported_by_id_and_seq,
            persistence_ids_page_through_every_id,
            invalid_requests_are_refused_with_typed_errors
        );
    };
    (@tests $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let mut harness = $make;
                $crate::tck::$name(&mut harness).await;
            }
        )*
    };
}

fn pid(s: &str) -> PersistenceId {
    PersistenceId::parse(s).expect("valid test id")
}

/// A small event whose payload is an rmp-serde string `label`.
pub fn event(label: &str) -> NewEvent {
    NewEvent::raw(
        "tck.Event",
        1,
        rmp_serde::to_vec(label).expect("strings encode"),
    )
    .expect("valid test event")
}

fn tagged(label: &str, tag: &Tag) -> NewEvent {
    event(label).with_tag(tag.clone()).expect("one tag")
}

fn label(ev: &PersistedEvent) -> String {
    rmp_serde::from_slice(&ev.payload).expect("tck payloads decode")
}

async fn all<J: Journal>(j: &J, id: &PersistenceId) -> Vec<PersistedEvent> {
    j.replay(id, 1, u64::MAX)
        .collect_all()
        .await
        .unwrap_or_else(|e| panic!("replay of {id} failed: {e}"))
}

fn labels(events: &[PersistedEvent]) -> Vec<String> {
    events.iter().map(label).collect()
}

fn assert_dense(id: &PersistenceId, events: &[PersistedEvent], first: u64) {
    for (i, ev) in events.iter().enumerate() {
        assert_eq!(
            ev.seq,
            first + i as u64,
            "{id}: sequence numbers are not dense"
        );
        assert_eq!(&ev.id, id, "event of another id in the replay of {id}");
    }
}

/// Appended events replay in order, whole or by range, with their metadata.
pub async fn append_then_replay_returns_events_in_order<H: TckHarness>(h: &mut H) {
    let j = h.open().await;
    let id = pid("order/1");
    let t = Tag::parse("order").expect("tag");
    let r1 = j
        .append(&id, 0, vec![event("a"), tagged("b", &t)])
        .await
        .expect("first append");
    assert_eq!((r1.first_seq, r1.last_seq), (1, 2));
    let r2 = j
        .append(&id, 2, vec![event("c")])
        .await
        .expect("second append");
    assert_eq!((r2.first_seq, r2.last_seq), (3, 3));
    let events = all(&j, &id).await;
    assert_eq!(labels(&events), ["a", "b", "c"]);
    assert_dense(&id, &events, 1);
    assert_eq!(events[1].tags, vec![t]);
    assert_eq!(&*events[0].event_type, "tck.Event");
    assert!(events[0].timestamp_ms > 0);
    let middle = j
        .replay(&id, 2, 2)
        .collect_all()
        .await
        .expect("range replay");
    assert_eq!(labels(&middle), ["b"]);
    assert!(
        j.replay(&id, 4, u64::MAX)
            .collect_all()
            .await
            .expect("empty")
            .is_empty()
    );
    assert!(all(&j, &pid("order/none")).await.is_empty());
    assert_eq!(j.highest_seq(&id).await.expect("highest"), 3);
    assert_eq!(j.highest_seq(&pid("order/none")).await.expect("highest"), 0);
    h.close(j).await;
}

/// A writer that is behind gets `SeqConflict` and writes nothing.
pub async fn stale_writer_gets_seq_conflict_and_nothing_is_overwritten<H: TckHarness>(h: &mut H) {
    let j = h.open().await;
    let id = pid("conflict/1");
    j.append(&id, 0, vec![event("a"), event("b")])
        .await
        .expect("append");
    for expected in [0, 1, 3] {
        match j.append(&id, expected, vec![event("stale")]).await {
            Err(JournalError::SeqConflict {
                expected: e,
                actual: 2,
                ..
            }) => assert_eq!(e, expected),
            other => panic!("append expecting {expected} gave {other:?}, not a conflict"),
        }
    }
    assert_eq!(labels(&all(&j, &id).await), ["a", "b"]);
    h.close(j).await;
}

/// Racing writers on one id: every success is stored once, in order.
pub async fn concurrent_appenders_on_one_id_never_lose_or_duplicate<H: TckHarness>(h: &mut H) {
    let j = h.open().await;
    let id = pid("race/1");
    let (writers, per_writer) = (8, 25);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (j, id) = (j.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u32;
            for i in 0..per_writer {
                loop {
                    let h = j.highest_seq(&id).await.expect("highest");
                    match j.append(&id, h, vec![event(&format!("{w}:{i}"))]).await {
                        Ok(_) => break,
                        Err(JournalError::SeqConflict { .. }) => conflicts += 1,
                        Err(e) => panic!("unexpected error {e}"),
                    }
                    tokio::task::yield_now().await;
                }
            }
            conflicts
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
    let events = all(&j, &id).await;
    assert_eq!(
        events.len(),
        writers * per_writer,
        "events lost or duplicated"
    );
    assert_dense(&id, &events, 1);
    let mut next = vec![0usize; writers];
    for l in labels(&events) {
        let (w, i) = l.split_once(':').expect("label");
        let (w, i): (usize, usize) = (w.parse().expect("w"), i.parse().expect("i"));
        assert_eq!(i, next[w], "writer {w}'s events out of order or duplicated");
        next[w] += 1;
    }
    h.close(j).await;
}

/// Many ids written at once: each stream stays dense and complete.
pub async fn concurrent_appenders_on_many_ids_keep_each_stream_dense<H: TckHarness>(h: &mut H) {
    let j = h.open().await;
    let (ids, per_id) = (50, 20);
    let mut tasks = Vec::new();
    for n in 0..ids {
        let j = j.clone();
        tasks.push(tokio::spawn(async move {
            let id = pid(&format!("many/{n}"));
            for i in 0..per_id {
                j.append(&id, i, vec![event(&format!("{n}.{i}"))])
                    .await
                    .expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
    for n in 0..ids {
        let id = pid(&format!("many/{n}"));
        let events = all(&j, &id).await;
        assert_dense(&id, &events, 1);
        let want: Vec<String> = (0..per_id).map(|i| format!("{n}.{i}")).collect();
        assert_eq!(labels(&events), want, "{id}");
    }
    h.close(j).await;
}

/// Everything acknowledged is there after a reopen, and writing continues
/// where it left off (sequences and tag offsets are never reused).
pub async fn replay_after_reopen_returns_the_same_events<H: TckHarness>(h: &mut H) {
    let j = h.open().await;
    let t = Tag::parse("reopen").expect("tag");
    let ids: Vec<_> = (0..5).map(|n| pid(&format!("reopen/{n}"))).collect();
    for (n, id) in ids.iter().enumerate() {
        for i in 0..=n as u64 {
            j.append(id, i, vec![tagged(&format!("{n}/{i}"), &t)])
                .await
                .expect("append");
        }
    }
    let mut before = BTreeMap::new();
    for id in &ids {
        before.insert(id.clone(), all(&j, id).await);
    }
    let tagged_before = j.events_by_tag(&t, 1, 1000).await.expect("by tag");
    h.close(j).await;
    let j = h.open().await;
    for id in &ids {
        assert_eq!(all(&j, id).await, before[id], "{id} changed across reopen");
        assert_eq!(
            j.highest_seq(id).await.expect("highest"),
            before[id].len() as u64
        );
    }
    assert_eq!(
        j.events_by_tag(&t, 1, 1000).await.expect("by tag"),
        tagged_before
    );
    let last_offset = tagged_before.last().map_or(0, |e| e.offset);
    j.append(&ids[0], 1, vec![tagged("after", &t)])
        .await
        .expect("append after reopen");
    let after = j
        .events_by_tag(&t, last_offset + 1, 10)
        .await
        .expect("by tag");
    assert_eq!(after.len(), 1);
    assert!(
        after[0].offset > last_offset,
        "tag offset reused after reopen"
    );
    h.close(j).await;
}

/// Appends events `0`..`total` to `id`, 100 at a time.
async fn append_numbered(j: &impl Journal, id: &PersistenceId, total: u64) {
    let mut written = 0;
    while written < total {
        let n = (total - written).min(100);
        let events = (0..n).map(|i| event(&(written + i).to_string())).collect();
        j.append(id, written, events).await.expect("append");
        written += n;
    }
}

/// Replay batches never exceed the backend's batch size.
pub async fn replay_is_delivered_in_bounded_batches<H: TckHarness>(h: &mut H) {
    let j = h.open().await;
    let id = pid("batches/1");
    let batch = h.replay_batch_size();
    let total = (batch * 2 + batch / 2 + 7) as u64;
    append_numbered(&j, &id, total).await;
    let mut stream = j.replay(&id, 1, u64::MAX);
    let mut seen = 0u64;
    while let Some(b) = stream.next().await {
        let b = b.expect("batch");
        assert!(
            !b.is_empty() && b.len() <= batch,
            "batch of {} events (bound {batch})",
            b.len()
        );
        for ev in b {
            seen += 1;
            assert_eq!(ev.seq, seen);
        }
    }
    assert_eq!(seen, total);
    h.close(j).await;
}

/// Replays whose consumer stops reading (an event stream whose client
/// stalled) hold nothing the rest of the journal needs: no connection of a
/// pool, no thread of the blocking pool. 600 of them, each stopped after
/// its first batch (more than Tokio's 512 blocking threads and any pool),
/// and the journal still appends and reads; then each finishes.
pub async fn stalled_replays_hold_nothing_others_need<H: TckHarness>(h: &mut H) {
    const STALLED: usize = 600;
    let j = h.open().await;
    let id = pid("stalled/1");
    let batch = h.replay_batch_size();
    // More batches than any read-ahead buffers.
    let total = (batch * 8) as u64;
    append_numbered(&j, &id, total).await;
    // A liveness bound, not a timing one: what a stalled replay held would
    // block forever.
    let bound = std::time::Duration::from_secs(60);
    let mut stalled = Vec::with_capacity(STALLED);
    for _ in 0..STALLED {
        let mut r = j.replay(&id, 1, u64::MAX);
        let first = tokio::time::timeout(bound, r.next())
            .await
            .expect("a replay's first batch arrives while others stall")
            .expect("a first batch")
            .expect("readable");
        assert_eq!(first[0].seq, 1);
        stalled.push(r);
    }
    let other = pid("stalled/2");
    tokio::time::timeout(bound, j.append(&other, 0, vec![event("x")]))
        .await
        .expect("an append completes while 600 replays stall")
        .expect("append");
    let seq = tokio::time::timeout(bound, j.highest_seq(&id))
        .await
        .expect("a read completes while 600 replays stall")
        .expect("highest");
    assert_eq!(seq, total);
    for mut r in stalled.drain(..50) {
        let mut last = 0;
        while let Some(b) = tokio::time::timeout(bound, r.next())
            .await
            .expect("a resumed replay goes on")
        {
            last = b.expect("batch").last().map_or(last, |e| e.seq);
        }
        assert_eq!(last, total, "a stalled replay resumes where it stopped");
    }
    drop(stalled);
    h.close(j).await;
}

/// The latest snapshot wins; deleting events keeps the highest sequence.
pub async fn snapshots_and_deletion_keep_the_highest_sequence<H: TckHarness>(h: &mut H) {
    let j = h.open().await;
    let id = pid("snap/1");
    let events = (1..=10).map(|i| event(&i.to_string())).collect();
    j.append(&id, 0, events).await.expect("append");
    let snap = |seq: u64| NewSnapshot {
        seq,
        state_type: "tck.State".into(),
        schema_version: 1,
        payload: rmp_serde::to_vec(&seq).expect("encode"),
    };
    assert!(j.load_snapshot(&id).await.expect("load").is_none());
    j.save_snapshot(&id, snap(5)).await.expect("save");
    j.save_snapshot(&id, snap(3))
        .await
        .expect("older snapshot is accepted but ignored");
    assert!(
        j.save_snapshot(&id, snap(11)).await.is_err(),
        "a snapshot past the highest event was accepted"
    );
    let s = j.load_snapshot(&id).await.expect("load").expect("snapshot");
    assert_eq!((s.seq, &*s.state_type), (5, "tck.State"));
    j.delete_events_to(&id, 5).await.expect("delete");
    let rest = all(&j, &id).await;
    assert_eq!(labels(&rest), ["6", "7", "8", "9", "10"]);
    assert_dense(&id, &rest, 6);
    assert_eq!(j.highest_seq(&id).await.expect("highest"), 10);
    assert!(
        j.delete_events_to(&id, 11).await.is_err(),
        "deleting past the highest event"
    );
    h.close(j).await;
    let j = h.open().await;
    assert_eq!(
        j.load_snapshot(&id).await.expect("load").map(|s| s.seq),
        Some(5)
    );
    j.delete_events_to(&id, 10).await.expect("delete all");
    assert!(all(&j, &id).await.is_empty());
    assert_eq!(
        j.highest_seq(&id).await.expect("highest"),
        10,
        "deleting all events reset the sequence"
    );
    assert!(
        matches!(
            j.append(&id, 0, vec![event("x")]).await,
            Err(JournalError::SeqConflict { actual: 10, .. })
        ),
        "a deleted stream accepted sequence 1 again"
    );
    j.append(&id, 10, vec![event("11")])
        .await
        .expect("append after deletion");
    h.close(j).await;
    let j = h.open().await;
    assert_eq!(labels(&all(&j, &id).await), ["11"]);
    assert_eq!(j.highest_seq(&id).await.expect("highest"), 11);
    h.close(j).await;
}

/// A subscription that starts while writers are busy sees every tagged
/// event exactly once, in offset order, across the catch-up/live seam.
pub async fn tag_subscription_has_no_gap_or_duplicate_at_the_seam<H: TckHarness>(h: &mut H) {
    let j = h.open().await;
    let t = Tag::parse("seam").expect("tag");
    let other = Tag::parse("other").expect("tag");
    let before = 300u64;
    let during = 300u64;
    for i in 0..before {
        let id = pid(&format!("seam/{}", i % 7));
        let h = j.highest_seq(&id).await.expect("highest");
        j.append(
            &id,
            h,
            vec![
                tagged(&format!("pre{i}"), &t),
                tagged("noise", &other),
                event("plain"),
            ],
        )
        .await
        .expect("append");
    }
    let mut sub = j.subscribe_tag(&t, 1);
    let writer = {
        let (j, t) = (j.clone(), t.clone());
        tokio::spawn(async move {
            for i in 0..during {
                let id = pid(&format!("seam/{}", i % 5));
                let h = j.highest_seq(&id).await.expect("highest");
                j.append(&id, h, vec![tagged(&format!("live{i}"), &t)])
                    .await
                    .expect("append");
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut seen = Vec::new();
    while (seen.len() as u64) < before + during {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(60), sub.next())
            .await
            .expect("subscription stalled: a gap at the seam")
            .expect("subscription ended early")
            .expect("subscription error");
        seen.push(ev);
    }
    writer.await.expect("writer");
    for w in seen.windows(2) {
        assert!(
            w[0].offset < w[1].offset,
            "offsets not increasing: duplicate or reorder"
        );
    }
    let got: Vec<String> = seen.iter().map(|e| label(&e.event)).collect();
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "duplicate event delivered");
    for i in 0..before {
        assert!(unique.contains(&format!("pre{i}")), "pre{i} missing");
    }
    for i in 0..during {
        assert!(unique.contains(&format!("live{i}")), "live{i} missing");
    }
    let stored = j.events_by_tag(&t, 1, 10_000).await.expect("by tag");
    assert_eq!(
        stored, seen,
        "live delivery differs from the stored tag index"
    );
    // A subscription from a middle offset starts exactly there.
    let mid = seen[seen.len() / 2].offset;
    let mut from_mid = j.subscribe_tag(&t, mid);
    let first = from_mid.next().await.expect("event").expect("ok");
    assert_eq!(first.offset, mid);
    drop(from_mid);
    drop(sub);
    h.close(j).await;
}

/// Garbage in one stored entry is reported with its id and sequence; other
/// entries and other ids still replay.
pub async fn corrupt_entries_are_reported_by_id_and_seq<H: TckHarness>(h: &mut H) {
    let j = h.open().await;
    let (a, b) = (pid("corrupt/a"), pid("corrupt/b"));
    j.append(&a, 0, (1..=10).map(|i| event(&i.to_string())).collect())
        .await
        .expect("append");
    j.append(&b, 0, vec![event("b1"), event("b2"), event("b3")])
        .await
        .expect("append");
    h.overwrite_raw(&j, &a, 4, b"this is not an envelope").await;
    let mut good = Vec::new();
    event("7").encode_envelope(&mut good);
    h.overwrite_raw(&j, &a, 7, &good[..good.len() - 3]).await;
    h.close(j).await;
    let j = h.open().await;
    let mut stream = j.replay(&a, 1, u64::MAX);
    let mut ok = Vec::new();
    let err = loop {
        match stream.next().await {
            Some(Ok(batch)) => ok.extend(batch),
            Some(Err(e)) => break e,
            None => panic!("replay over a corrupt entry ended without an error"),
        }
    };
    assert_eq!(
        labels(&ok),
        ["1", "2", "3"],
        "events before the corrupt one"
    );
    match &err {
        JournalError::Corrupt { id, seq: 4, .. } => assert_eq!(id, &a),
        other => panic!("expected Corrupt at corrupt/a #4, got {other}"),
    }
    assert!(
        err.to_string().contains("corrupt/a") && err.to_string().contains("#4"),
        "{err}"
    );
    assert!(
        stream.next().await.is_none(),
        "replay went on after an error"
    );
    let tail = j
        .replay(&a, 5, 6)
        .collect_all()
        .await
        .expect("entries 5-6 are intact");
    assert_eq!(labels(&tail), ["5", "6"]);
    match j.replay(&a, 5, u64::MAX).collect_all().await {
        Err(JournalError::Corrupt { seq: 7, .. }) => {}
        other => panic!("truncated entry #7 not reported: {other:?}"),
    }
    assert_eq!(labels(&all(&j, &b).await), ["b1", "b2", "b3"]);
    h.close(j).await;
}

/// Listing ids pages through every id exactly once, in order.
pub async fn persistence_ids_page_through_every_id<H: TckHarness>(h: &mut H) {
    let j = h.open().await;
    let mut want: Vec<PersistenceId> = (0..25).map(|n| pid(&format!("list/{n:02}"))).collect();
    for id in &want {
        j.append(id, 0, vec![event("x")]).await.expect("append");
    }
    want.sort();
    let mut got = Vec::new();
    let mut after: Option<PersistenceId> = None;
    loop {
        let page = j.persistence_ids(after.as_ref(), 10).await.expect("list");
        assert!(page.len() <= 10, "page larger than its limit");
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        got.extend(page);
    }
    let got: Vec<_> = got.into_iter().filter(|id| id.kind() == "list").collect();
    assert_eq!(got, want);
    h.close(j).await;
}

/// Bad requests get typed errors and change nothing.
pub async fn invalid_requests_are_refused_with_typed_errors<H: TckHarness>(h: &mut H) {
    let j = h.open().await;
    let id = pid("invalid/1");
    assert!(matches!(
        j.append(&id, 0, vec![]).await,
        Err(JournalError::InvalidRequest { .. })
    ));
    let too_many = (0..crate::MAX_EVENTS_PER_APPEND + 1)
        .map(|_| event("x"))
        .collect();
    assert!(matches!(
        j.append(&id, 0, too_many).await,
        Err(JournalError::InvalidRequest { .. })
    ));
    assert!(matches!(
        j.delete_events_to(&id, 1).await,
        Err(JournalError::InvalidRequest { .. })
    ));
    assert_eq!(j.highest_seq(&id).await.expect("highest"), 0);
    h.close(j).await;
}

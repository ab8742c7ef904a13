//! Tiered storage: replay across hot, warm and cold tiers; crash points in
//! archiving; corrupt and missing segments; blobs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use proptest::prelude::*;
use troupe_journal::tiered::{ArchiveStep, open_object_store};
use troupe_journal::{
    ColdConfig, Journal, JournalError, NewEvent, NewSnapshot, PersistedEvent, PersistenceId,
    RocksConfig, RocksJournal, Tag, TierConfig, TieredJournal,
};

async fn open(dir: &Path, config: TierConfig) -> TieredJournal {
    let warm_config = RocksConfig::new(dir.join("journal")).replay_batch_size(16);
    let mut warm = None;
    // A closed handle's blocking readers may take a moment to let go of
    // the lock.
    for _ in 0..200 {
        match RocksJournal::open(warm_config.clone()) {
            Ok(j) => {
                warm = Some(j);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let warm = warm.unwrap_or_else(|| RocksJournal::open(warm_config).expect("open warm"));
    let cold = open_object_store(&ColdConfig::default(), &dir.join("cold")).expect("cold store");
    TieredJournal::new(warm, cold, config).expect("tiered journal")
}

fn event(label: &str, ts: u64) -> NewEvent {
    let mut e = NewEvent::raw("test.Event", 1, rmp_serde::to_vec(label).unwrap()).unwrap();
    e.timestamp_ms = ts;
    e
}

fn labels(events: &[PersistedEvent]) -> Vec<(u64, String)> {
    events
        .iter()
        .map(|e| (e.seq, rmp_serde::from_slice(&e.payload).unwrap()))
        .collect()
}

async fn replay(j: &TieredJournal, id: &PersistenceId, from: u64, to: u64) -> Vec<(u64, String)> {
    let events = j.replay(id, from, to).collect_all().await.expect("replay");
    labels(&events)
}

fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    fn walk(d: &Path, out: &mut Vec<std::path::PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "seg") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir.join("cold").join("segments"), &mut out);
    out.sort();
    out
}

fn archive_everything() -> TierConfig {
    let mut c = TierConfig::default();
    c.archive.archive_after_s = Some(0);
    c.archive.min_segment_events = 1;
    c.archive.max_segment_events = 50;
    c
}

const NOW: u64 = 2_000_000_000_000;

#[derive(serde::Serialize, serde::Deserialize)]
struct State(u64);
impl troupe_journal::Schema for State {
    const TYPE_NAME: &'static str = "test.State";
}

#[derive(Debug, Clone)]
enum Op {
    Append { id: usize, n: usize, tagged: bool },
    Snapshot { id: usize },
    Archive { advance_s: u64 },
    Delete { id: usize, percent: u64 },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..3usize, 1..25usize, any::<bool>()).prop_map(|(id, n, tagged)| Op::Append { id, n, tagged }),
        1 => (0..3usize).prop_map(|id| Op::Snapshot { id }),
        2 => (0..20u64).prop_map(|advance_s| Op::Archive { advance_s }),
        1 => (0..3usize, 0..100u64).prop_map(|(id, percent)| Op::Delete { id, percent }),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Whatever mix of appends, snapshots, archive runs, deletes and
    /// restarts, and whatever the hot and segment limits, every replay
    /// range returns exactly the events the model holds, in order, and so
    /// does a tag query.
    #[test]
    fn replay_across_tiers_returns_exactly_the_original_events(
        ops in proptest::collection::vec(op(), 1..30),
        hot_events in 0..30usize,
        min_seg in 1..10usize,
        max_seg in 1..40usize,
        probes in proptest::collection::vec((0..3usize, 0..120u64, 0..120u64), 6),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let mut config = TierConfig::default();
            config.hot.default.max_events = hot_events;
            config.archive.archive_after_s = Some(10);
            config.archive.snapshot_retention_s = Some(3);
            config.archive.min_segment_events = min_seg;
            config.archive.max_segment_events = max_seg;
            let ids: Vec<PersistenceId> = (0..3).map(|i| PersistenceId::parse(&format!("chat/{i}")).unwrap()).collect();
            let tag = Tag::parse("t").unwrap();
            let mut j = open(dir.path(), config.clone()).await;
            let mut model: Vec<BTreeMap<u64, String>> = vec![BTreeMap::new(); 3];
            let mut highest = [0u64; 3];
            let mut tagged_model: Vec<(usize, u64)> = Vec::new();
            let mut clock = NOW;
            let mut archive_now = NOW;
            for (step, op) in ops.iter().enumerate() {
                match op {
                    Op::Append { id, n, tagged } => {
                        let events: Vec<NewEvent> = (0..*n).map(|k| {
                            clock += 1000;
                            let mut e = event(&format!("{id}-{step}-{k}"), clock);
                            if *tagged { e = e.with_tag(tag.clone()).unwrap(); }
                            e
                        }).collect();
                        let out = j.append(&ids[*id], highest[*id], events).await.unwrap();
                        for (k, seq) in (out.first_seq..=out.last_seq).enumerate() {
                            model[*id].insert(seq, format!("{id}-{step}-{k}"));
                            if *tagged { tagged_model.push((*id, seq)); }
                        }
                        highest[*id] = out.last_seq;
                    }
                    Op::Snapshot { id } => {
                        if highest[*id] > 0 {
                            let snap = NewSnapshot::new(highest[*id], &State(highest[*id])).unwrap();
                            j.save_snapshot(&ids[*id], snap).await.unwrap();
                        }
                    }
                    Op::Archive { advance_s } => {
                        archive_now = archive_now.max(clock) + advance_s * 1000;
                        j.archive_all(archive_now, |_, _| {}).await.unwrap();
                    }
                    Op::Delete { id, percent } => {
                        let to = highest[*id] * percent / 100;
                        j.delete_events_to(&ids[*id], to).await.unwrap();
                        model[*id].retain(|s, _| *s > to);
                    }
                    Op::Reopen => {
                        j.close().await;
                        drop(j);
                        j = open(dir.path(), config.clone()).await;
                    }
                }
                for (i, id) in ids.iter().enumerate() {
                    let all: Vec<(u64, String)> = model[i].iter().map(|(s, l)| (*s, l.clone())).collect();
                    assert_eq!(replay(&j, id, 1, u64::MAX).await, all, "{id} after {op:?}");
                    assert_eq!(j.highest_seq(id).await.unwrap(), highest[i]);
                }
                for (i, a, b) in &probes {
                    let (from, to) = (*a.min(b), *a.max(b));
                    let want: Vec<(u64, String)> = model[*i].range(from.max(1)..=to.max(1)).map(|(s, l)| (*s, l.clone())).collect();
                    let want = if from.max(1) > to { Vec::new() } else { want };
                    assert_eq!(replay(&j, &ids[*i], from, to).await, want, "{} {from}..{to}", ids[*i]);
                }
            }
            let tagged = j.events_by_tag(&tag, 1, 10_000).await.unwrap();
            let got: Vec<(String, u64)> = tagged.iter().map(|t| (t.event.id.to_string(), t.event.seq)).collect();
            let want: Vec<(String, u64)> = tagged_model.iter()
                .filter(|(i, s)| model[*i].contains_key(s))
                .map(|(i, s)| (ids[*i].to_string(), *s)).collect();
            assert_eq!(got, want);
            j.close().await;
        });
    }
}

async fn fill(j: &TieredJournal, ids: &[PersistenceId], n: u64) -> Vec<Vec<(u64, String)>> {
    let mut all = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut expected = Vec::new();
        for chunk in 0..(n / 25) {
            let events: Vec<NewEvent> = (0..25)
                .map(|k| event(&format!("{i}/{}", chunk * 25 + k + 1), NOW))
                .collect();
            j.append(id, chunk * 25, events).await.unwrap();
        }
        for s in 1..=n {
            expected.push((s, format!("{i}/{s}")));
        }
        all.push(expected);
    }
    all
}

/// A crash at each step of archiving (and of a delete that drops
/// segments) leaves every event readable exactly once after a restart; the
/// next run finishes the job and leaves no unreferenced segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_archive_step_loses_nothing_and_duplicates_nothing() {
    let ids: Vec<PersistenceId> = (0..3)
        .map(|i| PersistenceId::parse(&format!("chat/{i}")).unwrap())
        .collect();
    for step in ArchiveStep::ALL {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path(), archive_everything()).await;
        let mut expected = fill(&j, &ids, 150).await;
        if step == ArchiveStep::DeleteCommitted {
            j.archive_all(NOW + 1000, |_, _| {}).await.unwrap();
        }
        j.crash_at(Some(step));
        let result = if step == ArchiveStep::DeleteCommitted {
            let r = j.delete_events_to(&ids[1], 120).await;
            expected[1].retain(|(s, _)| *s > 120);
            r
        } else {
            j.archive_all(NOW + 1000, |_, _| {}).await.map(|_| ())
        };
        assert!(
            matches!(result, Err(JournalError::Injected(_))),
            "{step:?}: {result:?}"
        );
        j.close().await;
        drop(j);

        let j = open(dir.path(), archive_everything()).await;
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                replay(&j, id, 1, u64::MAX).await,
                expected[i],
                "{step:?}: {id}"
            );
            assert_eq!(
                replay(&j, id, 130, 140).await,
                expected[i]
                    .iter()
                    .filter(|(s, _)| (130..=140).contains(s))
                    .cloned()
                    .collect::<Vec<_>>()
            );
        }
        let report = j.archive_all(NOW + 1000, |_, _| {}).await.unwrap();
        if step == ArchiveStep::DeleteCommitted
            || step == ArchiveStep::SegmentWritten
            || step == ArchiveStep::SegmentVerified
        {
            assert!(report.orphans_removed >= 1, "{step:?}: {report:?}");
        }
        let mut in_manifests = 0;
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                replay(&j, id, 1, u64::MAX).await,
                expected[i],
                "{step:?} after the rerun: {id}"
            );
            let m = j.manifest(id).await.unwrap().expect("archived");
            assert_eq!(m.archived_to, 150);
            in_manifests += m.segments.len();
        }
        assert_eq!(
            segment_files(dir.path()).len(),
            in_manifests,
            "{step:?}: orphans left"
        );
        j.close().await;
    }
}

/// A segment that is corrupt or gone fails the replay with an error that
/// names the id, the sequence range and the segment; events outside it
/// still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_missing_segments_are_named_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = archive_everything();
    config.hot = troupe_journal::HotConfig::disabled();
    let j = open(dir.path(), config).await;
    let id = PersistenceId::parse("chat/x").unwrap();
    fill(&j, std::slice::from_ref(&id), 125).await;
    j.archive_all(NOW + 1, |_, _| {}).await.unwrap();
    let m = j.manifest(&id).await.unwrap().unwrap();
    assert_eq!(m.segments.len(), 3);
    let second = m.segments[1].clone();
    let file = dir.path().join("cold").join(&second.object);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&file, &bytes).unwrap();
    let err = j.replay(&id, 1, u64::MAX).collect_all().await.unwrap_err();
    match &err {
        JournalError::ColdSegment {
            id: eid,
            from,
            to,
            segment,
            reason,
        } => {
            assert_eq!((eid, *from, *to), (&id, 51, 100));
            assert_eq!(segment, &second.object);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected a cold segment error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("chat/x") && text.contains("#51..#100") && text.contains(&second.object),
        "{text}"
    );
    assert_eq!(
        replay(&j, &id, 101, 125).await.len(),
        25,
        "later events still read"
    );
    assert_eq!(
        replay(&j, &id, 1, 50).await.len(),
        50,
        "earlier events still read"
    );

    std::fs::remove_file(&file).unwrap();
    let err = j.replay(&id, 60, 70).collect_all().await.unwrap_err();
    assert!(
        matches!(&err, JournalError::ColdSegment { from: 51, to: 100, reason, .. } if reason.contains("missing")),
        "{err:?}"
    );
    j.close().await;
}

/// A replay that starts inside the hot tail is served from memory: the
/// bytes on disk are not read (here they are corrupt, and the replay does
/// not notice), and the hit is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_inside_the_hot_tail_do_not_touch_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = TierConfig::default();
    config.hot.default.max_events = 10;
    let j = open(dir.path(), config).await;
    let id = PersistenceId::parse("session/s").unwrap();
    let expected = fill(&j, std::slice::from_ref(&id), 50).await.remove(0);
    j.warm().overwrite_raw(&id, 45, b"garbage").unwrap();
    assert_eq!(replay(&j, &id, 41, u64::MAX).await, expected[40..].to_vec());
    assert!(replay(&j, &id, 51, u64::MAX).await.is_empty());
    let err = j.replay(&id, 40, u64::MAX).collect_all().await.unwrap_err();
    assert!(
        matches!(err, JournalError::Corrupt { seq: 45, .. }),
        "{err:?}"
    );
    let stats = j.stats(|_| {}).await.unwrap();
    let kind = &stats.kinds["session"];
    assert_eq!((kind.hot.hits, kind.hot.misses), (2, 1));
    assert_eq!(kind.hot.events, 10);
    assert_eq!(kind.warm_events, 50);
    j.close().await;
}

fn chunks(
    total: usize,
    chunk: usize,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::iter((0..total.div_ceil(chunk)).map(move |i| {
        let len = chunk.min(total - i * chunk);
        Ok((0..len).map(|k| ((i * chunk + k) % 251) as u8).collect())
    }))
}

/// Blobs stream in and out in parts, are checked against their hash, are
/// refused past the size limit, keep while an event (warm or archived)
/// refers to them, and are collected after the last such event is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_are_streamed_checked_bounded_and_collected_when_unreferenced() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = archive_everything();
    config.blobs.chunk_bytes = 256 << 10;
    config.blobs.max_blob_bytes = 4 << 20;
    config.blobs.gc_grace_s = 0;
    let j = open(dir.path(), config).await;
    let blobs = j.blobs().clone();

    let total = 3 * (1 << 20) + 12_345;
    let image = blobs
        .put_stream("image/png", chunks(total, 10_000))
        .await
        .unwrap();
    assert_eq!(image.size, total as u64);
    let mut back = Vec::new();
    let mut parts = 0;
    let mut s = blobs.get_stream(&image).await.unwrap();
    while let Some(p) = s.next().await {
        back.extend_from_slice(&p.unwrap());
        parts += 1;
    }
    assert!(parts > 1, "streamed in parts");
    let want: Vec<u8> = (0..total).map(|k| (k % 251) as u8).collect();
    assert_eq!(back, want);
    assert_eq!(image.hash, troupe_journal::BlobHash::of(&want));

    let err = blobs
        .put_stream("video/mp4", chunks(5 << 20, 100_000))
        .await
        .unwrap_err();
    assert!(
        matches!(err, JournalError::BlobTooLarge { limit, .. } if limit == 4 << 20),
        "{err:?}"
    );
    assert_eq!(
        blobs.list().await.unwrap().len(),
        1,
        "the refused blob left nothing"
    );
    let err = blobs.put("not a media type", vec![1u8]).await.unwrap_err();
    assert!(
        matches!(
            err,
            JournalError::InvalidName {
                what: "media type",
                ..
            }
        ),
        "{err:?}"
    );

    let small = blobs.put("audio/wav", vec![7u8; 1000]).await.unwrap();
    let id = PersistenceId::parse("chat/media").unwrap();
    let ghost = troupe_journal::BlobRef {
        hash: troupe_journal::BlobHash::of(b"never stored"),
        size: 12,
        media_type: "image/png".into(),
    };
    let err = j
        .append(&id, 0, vec![event("ghost", NOW).with_blob(&ghost).unwrap()])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, JournalError::BlobMissing { hash } if hash == &ghost.hash.to_string()),
        "{err:?}"
    );

    j.append(&id, 0, vec![event("photo", NOW).with_blob(&image).unwrap()])
        .await
        .unwrap();
    j.append(
        &id,
        1,
        vec![
            event("photo again", NOW).with_blob(&image).unwrap(),
            event("text", NOW),
        ],
    )
    .await
    .unwrap();
    let gc = j.collect_blobs(NOW * 2).await.unwrap();
    assert_eq!(
        (gc.collected, gc.kept),
        (1, 1),
        "the unreferenced wav goes, the image stays: {gc:?}"
    );
    assert!(matches!(
        blobs.get_stream(&small).await.err(),
        Some(JournalError::BlobMissing { .. })
    ));

    // Archived events still hold their blobs.
    j.archive_all(NOW + 1, |_, _| {}).await.unwrap();
    assert_eq!(j.manifest(&id).await.unwrap().unwrap().archived_to, 3);
    assert_eq!(j.collect_blobs(NOW * 2).await.unwrap().collected, 0);
    j.delete_events_to(&id, 1).await.unwrap();
    assert_eq!(
        j.collect_blobs(NOW * 2).await.unwrap().collected,
        0,
        "event 2 still refers to it"
    );
    j.delete_events_to(&id, 3).await.unwrap();
    let gc = j.collect_blobs(NOW * 2).await.unwrap();
    assert_eq!((gc.collected, gc.bytes_freed), (1, total as u64), "{gc:?}");
    assert!(matches!(
        blobs.get_stream(&image).await.err(),
        Some(JournalError::BlobMissing { .. })
    ));

    // A blob whose bytes changed on disk fails at the end of its stream.
    let doc = blobs.put("application/pdf", vec![3u8; 5000]).await.unwrap();
    let hex = doc.hash.hex();
    let file = dir
        .path()
        .join("cold/blobs/sha256")
        .join(&hex[..2])
        .join(&hex);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[10] = 4;
    std::fs::write(&file, &bytes).unwrap();
    let err = blobs.get_bytes(&doc, 1 << 20).await.unwrap_err();
    assert!(
        matches!(&err, JournalError::BlobCorrupt { hash, .. } if hash == &doc.hash.to_string()),
        "{err:?}"
    );
    j.close().await;
}

/// The background archiver moves eligible events on its own schedule and
/// stops when its task is aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_archiver_archives_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let j = open(dir.path(), archive_everything()).await;
    let id = PersistenceId::parse("chat/bg").unwrap();
    let expected = fill(&j, std::slice::from_ref(&id), 75).await.remove(0);
    let archiver = j.spawn_archiver(Duration::from_millis(20));
    // Liveness only: the first runs happen within milliseconds.
    let mut archived = 0;
    for _ in 0..1000 {
        archived = j.manifest(&id).await.unwrap().map_or(0, |m| m.archived_to);
        if archived == 75 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    archiver.abort();
    assert_eq!(archived, 75, "the archiver never ran");
    assert_eq!(replay(&j, &id, 1, u64::MAX).await, expected);
    j.close().await;
}

/// Two journals pointed at one cold store: the second is refused before it
/// could take the first one's segments for orphans (or overwrite them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_store_belongs_to_one_journal() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("cold");
    let open_at = |name: &str| {
        let warm = RocksJournal::open(RocksConfig::new(dir.path().join(name))).expect("open");
        let cold = open_object_store(&ColdConfig::default(), &shared).expect("cold");
        TieredJournal::new(warm, cold, archive_everything()).expect("tiered")
    };
    let (a, b) = (open_at("a"), open_at("b"));
    let id = PersistenceId::parse("chat/same").unwrap();
    fill(&a, std::slice::from_ref(&id), 25).await;
    fill(&b, std::slice::from_ref(&id), 25).await;
    a.archive_all(NOW + 1, |_, _| {}).await.unwrap();
    let err = b.archive_all(NOW + 1, |_, _| {}).await.unwrap_err();
    assert!(
        err.to_string().contains("belongs to another journal"),
        "{err}"
    );
    assert!(b.collect_blobs(NOW).await.is_err());
    assert_eq!(replay(&a, &id, 1, u64::MAX).await.len(), 25);
    a.close().await;
    b.close().await;
}

/// Appends abandoned at random points (their futures dropped while the
/// write is queued or committing) never leave the hot tail behind the
/// journal: after each one, a resume served from memory returns exactly
/// what RocksDB holds, and the highest sequence agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_appends_never_leave_the_hot_tail_stale() {
    use rand::Rng;
    let dir = tempfile::tempdir().unwrap();
    let j = open(dir.path(), TierConfig::default()).await;
    let id = PersistenceId::parse("session/racy").unwrap();
    let mut rng = rand::rng();
    let mut abandoned = 0;
    for round in 0..300u64 {
        let expected = j.warm().highest_seq(&id).await.unwrap();
        let events = vec![event(&format!("r{round}"), NOW); rng.random_range(1..4)];
        let patience = Duration::from_micros(rng.random_range(0..400));
        match tokio::time::timeout(patience, j.append(&id, expected, events)).await {
            Ok(result) => {
                result.unwrap();
            }
            Err(_) => abandoned += 1,
        }
        // Whatever was queued has committed once a flush returns.
        j.flush().await.unwrap();
        let stored = j.warm().highest_seq(&id).await.unwrap();
        assert_eq!(j.highest_seq(&id).await.unwrap(), stored, "round {round}");
        let from = stored.saturating_sub(4).max(1);
        let hot = j.replay(&id, from, u64::MAX).collect_all().await.unwrap();
        let warm = j
            .warm()
            .replay(&id, from, u64::MAX)
            .collect_all()
            .await
            .unwrap();
        assert_eq!(labels(&hot), labels(&warm), "round {round}");
    }
    let stats = j.stats(|_| {}).await.unwrap();
    assert!(stats.kinds["session"].hot.hits >= 250, "{stats:?}");
    assert!(
        abandoned > 0,
        "no append was abandoned; the test proved nothing"
    );
    j.close().await;
}

//! Archiving in a real process killed with SIGKILL at random moments:
//! appends and archive runs (with deletes now and then) race in the child;
//! after every kill the parent reopens the journal and finds every
//! acknowledged event readable exactly once, in order, whichever tier holds
//! it, and the next run leaves no unreferenced segment behind.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rand::Rng;
use troupe::journal::tiered::open_object_store;
use troupe::journal::{ColdConfig, HotConfig};
use troupe::prelude::*;

mod common;

const CHILD_DIR: &str = "TROUPE_ARCHIVE_CHILD_DIR";
const IDS: usize = 4;

fn tiers() -> TierConfig {
    let mut c = TierConfig {
        hot: HotConfig::disabled(),
        ..TierConfig::default()
    };
    c.archive.archive_after_s = Some(0);
    c.archive.snapshot_retention_s = None;
    c.archive.min_segment_events = 1;
    c.archive.max_segment_events = 7;
    c
}

async fn open(dir: &Path) -> TieredJournal {
    let config = RocksConfig::new(dir.join("journal")).durability(Durability::Fsync);
    let mut warm = None;
    for _ in 0..300 {
        match RocksJournal::open(config.clone()) {
            Ok(j) => {
                warm = Some(j);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let warm = warm.unwrap_or_else(|| RocksJournal::open(config).expect("open the journal"));
    let cold = open_object_store(&ColdConfig::default(), &dir.join("cold")).expect("cold store");
    TieredJournal::new(warm, cold, tiers()).expect("tiered")
}

fn label(id: usize, seq: u64) -> String {
    format!("{id}:{seq}")
}

fn pid(i: usize) -> PersistenceId {
    PersistenceId::parse(&format!("chat/{i}")).expect("id")
}

/// The process to kill: appends batches to random ids, printing `ACK i last`
/// once acknowledged, and archives (printing `ARCHIVED n`) between them;
/// now and then deletes the oldest events of an id (`DELETED i to`).
#[test]
#[ignore = "the child process of archiving_killed_at_random_loses_and_duplicates_nothing"]
fn archive_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let j = open(Path::new(&dir)).await;
        let mut rng = rand::rng();
        let mut highest = [0u64; IDS];
        for (i, h) in highest.iter_mut().enumerate() {
            *h = j.highest_seq(&pid(i)).await.expect("highest");
        }
        println!("READY");
        loop {
            let i = rng.random_range(0..IDS);
            let n = rng.random_range(1..12u64);
            let events: Vec<NewEvent> = (1..=n)
                .map(|k| {
                    NewEvent::raw("t.E", 1, label(i, highest[i] + k).into_bytes()).expect("event")
                })
                .collect();
            let out = j.append(&pid(i), highest[i], events).await.expect("append");
            highest[i] = out.last_seq;
            println!("ACK {i} {}", out.last_seq);
            if rng.random_bool(0.3) {
                let r = j
                    .archive_all(troupe::journal::now_ms() + 1000, |_, _| {})
                    .await
                    .expect("archive");
                println!("ARCHIVED {}", r.events);
            }
            if rng.random_bool(0.05) && highest[i] > 10 {
                let to = highest[i] / 3;
                j.delete_events_to(&pid(i), to).await.expect("delete");
                println!("DELETED {i} {to}");
            }
        }
    });
}

#[test]
fn archiving_killed_at_random_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rng = rand::rng();
    let mut acked = [0u64; IDS];
    let mut deleted = [0u64; IDS];
    let mut archived_total = 0u64;
    let rounds = 8;
    for round in 0..rounds {
        let mut child = common::spawn(
            "archive_child",
            &[(CHILD_DIR, dir.path().display().to_string())],
        );
        let patience = Duration::from_secs(60);
        // libtest's own lines come first.
        loop {
            match child.next_line(patience).as_deref() {
                Some("READY") => break,
                Some(_) => continue,
                None => panic!("the child exited before it was ready"),
            }
        }
        let lines = rng.random_range(5..120);
        let mut handle = |line: &str| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                ["ACK", i, s] => acked[i.parse::<usize>().unwrap()] = s.parse().unwrap(),
                ["ARCHIVED", n] => archived_total += n.parse::<u64>().unwrap(),
                ["DELETED", i, to] => {
                    let i: usize = i.parse().unwrap();
                    deleted[i] = deleted[i].max(to.parse().unwrap());
                }
                _ => {}
            }
        };
        for _ in 0..lines {
            match child.next_line(patience) {
                Some(line) => handle(&line),
                None => panic!("the child exited on its own in round {round}"),
            }
        }
        child.kill();
        for line in child.finish() {
            handle(&line);
        }
        rt.block_on(async {
            let j = open(dir.path()).await;
            for (i, (&a, &d)) in acked.iter().zip(deleted.iter()).enumerate() {
                let id = pid(i);
                let highest = j.highest_seq(&id).await.expect("highest");
                assert!(
                    highest >= a,
                    "round {round}: {id} lost acknowledged events ({highest} < {a})"
                );
                let events = j
                    .replay(&id, 1, u64::MAX)
                    .collect_all()
                    .await
                    .expect("replay");
                let first = events.first().map_or(highest + 1, |e| e.seq);
                // A delete the child did not get to print may have happened.
                assert!(
                    first > d || events.is_empty() && d == 0,
                    "round {round}: {id} starts at {first}, deleted to {d}"
                );
                let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
                assert_eq!(
                    seqs,
                    (first..=highest).collect::<Vec<_>>(),
                    "round {round}: {id} not dense"
                );
                for e in &events {
                    assert_eq!(
                        String::from_utf8_lossy(&e.payload),
                        label(i, e.seq),
                        "round {round}"
                    );
                }
            }
            j.close().await;
        });
    }
    rt.block_on(async {
        let j = open(dir.path()).await;
        j.archive_all(troupe::journal::now_ms() + 1000, |_, _| {})
            .await
            .expect("archive");
        let mut in_manifests = BTreeMap::new();
        for i in 0..IDS {
            if let Some(m) = j.manifest(&pid(i)).await.expect("manifest") {
                for s in m.segments {
                    in_manifests.insert(s.object, ());
                }
            }
        }
        let mut on_disk = Vec::new();
        let mut stack = vec![dir.path().join("cold/segments")];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                } else {
                    on_disk.push(e.path());
                }
            }
        }
        assert_eq!(
            on_disk.len(),
            in_manifests.len(),
            "orphan segments left: {on_disk:?}"
        );
        j.close().await;
    });
    assert!(archived_total > 0, "the child never archived anything");
}

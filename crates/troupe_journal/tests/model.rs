//! Property: any sequence of appends, snapshots, deletes and reopens leaves
//! the RocksDB journal replaying exactly what a simple in-memory model holds.

use std::collections::BTreeMap;

use proptest::prelude::*;
use troupe_journal::{
    Durability, Journal, JournalError, NewEvent, NewSnapshot, PersistenceId, RocksConfig,
    RocksJournal,
};

#[derive(Debug, Clone)]
enum Op {
    /// Append `n` events to id `id`; `stale` uses a wrong expected sequence.
    Append {
        id: usize,
        n: u8,
        stale: bool,
    },
    /// Snapshot id at a fraction of its highest sequence.
    Snapshot {
        id: usize,
        at: u8,
    },
    /// Delete events of id up to a fraction of its highest sequence.
    Delete {
        id: usize,
        to: u8,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 1..5u8, prop::bool::weighted(0.2)).prop_map(|(id, n, stale)| Op::Append { id, n, stale }),
        1 => (0..3usize, 0..=100u8).prop_map(|(id, at)| Op::Snapshot { id, at }),
        1 => (0..3usize, 0..=100u8).prop_map(|(id, to)| Op::Delete { id, to }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default, Debug)]
struct Model {
    highest: u64,
    events: BTreeMap<u64, String>,
    snapshot: Option<u64>,
}

fn open(dir: &std::path::Path) -> RocksJournal {
    let config = RocksConfig::new(dir)
        .durability(Durability::Buffered)
        .replay_batch_size(3);
    RocksJournal::open(config).expect("open")
}

async fn check(j: &RocksJournal, ids: &[PersistenceId], model: &[Model]) {
    for (id, m) in ids.iter().zip(model) {
        let got: Vec<(u64, String)> = j
            .replay(id, 1, u64::MAX)
            .collect_all()
            .await
            .expect("replay")
            .iter()
            .map(|e| (e.seq, rmp_serde::from_slice(&e.payload).expect("payload")))
            .collect();
        let want: Vec<(u64, String)> = m.events.iter().map(|(s, l)| (*s, l.clone())).collect();
        assert_eq!(got, want, "{id} replays differently from the model");
        assert_eq!(
            j.highest_seq(id).await.expect("highest"),
            m.highest,
            "{id} highest"
        );
        let snap = j.load_snapshot(id).await.expect("snapshot").map(|s| s.seq);
        assert_eq!(snap, m.snapshot, "{id} snapshot");
    }
}

async fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ids: Vec<_> = (0..3)
        .map(|n| PersistenceId::parse(&format!("model/{n}")).expect("id"))
        .collect();
    let mut model: Vec<Model> = (0..3).map(|_| Model::default()).collect();
    let mut j = open(dir.path());
    let mut label = 0u64;
    for op in ops {
        match op {
            Op::Append { id, n, stale } => {
                let m = &mut model[id];
                let expected = if stale { m.highest + 1 } else { m.highest };
                let events: Vec<NewEvent> = (0..n)
                    .map(|_| {
                        label += 1;
                        NewEvent::raw(
                            "model.Event",
                            1,
                            rmp_serde::to_vec(&label.to_string()).expect("enc"),
                        )
                        .expect("event")
                    })
                    .collect();
                let labels: Vec<String> = (0..n as u64)
                    .map(|i| (label - n as u64 + 1 + i).to_string())
                    .collect();
                match j.append(&ids[id], expected, events).await {
                    Ok(out) => {
                        assert!(!stale, "a stale append succeeded");
                        assert_eq!(out.first_seq, m.highest + 1);
                        for l in labels {
                            m.highest += 1;
                            m.events.insert(m.highest, l);
                        }
                        assert_eq!(out.last_seq, m.highest);
                    }
                    Err(JournalError::SeqConflict { actual, .. }) => {
                        assert!(stale, "a current append conflicted");
                        assert_eq!(actual, m.highest);
                    }
                    Err(e) => panic!("append failed: {e}"),
                }
            }
            Op::Snapshot { id, at } => {
                let m = &mut model[id];
                let seq = m.highest * at as u64 / 100;
                let snap = NewSnapshot {
                    seq,
                    state_type: "model.State".into(),
                    schema_version: 1,
                    payload: vec![0xc0],
                };
                let res = j.save_snapshot(&ids[id], snap).await;
                if seq == 0 {
                    assert!(res.is_err(), "snapshot at 0 accepted");
                } else {
                    res.expect("snapshot");
                    if m.snapshot.is_none_or(|s| s <= seq) {
                        m.snapshot = Some(seq);
                    }
                }
            }
            Op::Delete { id, to } => {
                let m = &mut model[id];
                let to_seq = m.highest * to as u64 / 100;
                j.delete_events_to(&ids[id], to_seq).await.expect("delete");
                m.events = m.events.split_off(&(to_seq + 1));
            }
            Op::Reopen => {
                j.close().await;
                drop(j);
                j = open(dir.path());
            }
        }
    }
    check(&j, &ids, &model).await;
    j.close().await;
    drop(j);
    let j = open(dir.path());
    check(&j, &ids, &model).await;
    j.close().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn replay_equals_the_model_after_any_history(ops in prop::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(run(ops));
    }
}

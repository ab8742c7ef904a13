//! Property: random commands with random crashes (actors killed), restarts
//! (a new registry over the same journal, as after a process restart) and
//! passivations always recover to the state of a simple model.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use troupe_actor::{DurableConfig, Entities, EntityConfig};
use troupe_journal::{InMemoryJournal, Journal};

#[derive(Debug, Clone)]
enum Op {
    Add { key: u8, n: i64 },
    Kill { key: u8 },
    Restart,
    PassivateAll,
    Check { key: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..4u8, -50..50i64).prop_map(|(key, n)| Op::Add { key, n }),
        2 => (0..4u8).prop_map(|key| Op::Kill { key }),
        1 => Just(Op::Restart),
        1 => Just(Op::PassivateAll),
        2 => (0..4u8).prop_map(|key| Op::Check { key }),
    ]
}

fn registry(journal: &InMemoryJournal, snapshot_every: Option<u64>) -> Entities<Counter> {
    let durable = DurableConfig {
        snapshot_every,
        ..DurableConfig::default()
    };
    let config = EntityConfig {
        idle_timeout: None,
        durable,
        ..EntityConfig::default()
    };
    let j: Arc<dyn Journal> = Arc::new(journal.clone());
    Entities::new(Counter, j, config)
}

async fn run(ops: Vec<Op>, snapshot_every: Option<u64>) {
    let journal = InMemoryJournal::new();
    let mut entities = registry(&journal, snapshot_every);
    let mut model: BTreeMap<u8, CounterState> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Add { key, n } => {
                let total = entities
                    .ask(&format!("k{key}"), |r| CounterCmd::Add(n, r), T)
                    .await
                    .expect("add");
                let m = model.entry(key).or_default();
                m.total += n;
                m.adds += 1;
                assert_eq!(total, m.total);
            }
            Op::Kill { key } => {
                let k = format!("k{key}");
                if entities.is_active(&k) {
                    let handle = entities.handle(&k).await.expect("handle");
                    if let Some(cell) = handle.cell() {
                        cell.kill();
                    }
                    eventually("killed", || handle.cell().is_none()).await;
                }
            }
            Op::Restart => {
                entities.passivate_all().await; // the old "process" lets go of its actors
                entities = registry(&journal.reopen(), snapshot_every);
            }
            Op::PassivateAll => entities.passivate_all().await,
            Op::Check { key } => {
                let got = entities
                    .ask(&format!("k{key}"), CounterCmd::Get, T)
                    .await
                    .expect("get");
                assert_eq!(got, model.get(&key).cloned().unwrap_or_default(), "k{key}");
            }
        }
    }
    for (key, want) in &model {
        let got = entities
            .ask(&format!("k{key}"), CounterCmd::Get, T)
            .await
            .expect("get");
        assert_eq!(&got, want, "k{key} after the whole history");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn recovery_always_matches_the_model(ops in prop::collection::vec(op(), 1..60), snap in prop::option::of(1..8u64)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(run(ops, snap));
    }
}

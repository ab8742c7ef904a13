//! Random DAGs of up to 30 steps with random failures, retries and
//! crash/restart points: a saga completes iff every step succeeded;
//! otherwise exactly the completed steps are compensated, each once, never
//! before the steps that depend on them. Plus a crash in the middle of a
//! step: it is retried with the same idempotency key.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use serde_json::json;
use troupe_journal::{InMemoryJournal, Journal};
use troupe_saga::*;

const T: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Case {
    deps: Vec<Vec<usize>>,
    fail: BTreeSet<usize>,
    flaky: Vec<(usize, u32)>,
    crash_after: Option<u32>,
}

fn case() -> impl Strategy<Value = Case> {
    (1..=30usize)
        .prop_flat_map(|n| {
            (
                prop::collection::vec(prop::collection::vec(any::<prop::sample::Index>(), 0..3), n),
                prop::collection::btree_set(0..n, 0..3),
                prop::collection::vec((0..n, 1..3u32), 0..4),
                prop::option::of(0..40u32),
            )
        })
        .prop_map(|(raw, fail, flaky, crash_after)| {
            let deps = raw
                .iter()
                .enumerate()
                .map(|(i, ds)| {
                    let mut v: Vec<usize> = if i == 0 {
                        vec![]
                    } else {
                        ds.iter().map(|x| x.index(i)).collect()
                    };
                    v.sort();
                    v.dedup();
                    v
                })
                .collect();
            // Only some of the failure picks are kept: many sagas should complete.
            let fail = fail.into_iter().filter(|f| f % 3 == 0).collect();
            Case {
                deps,
                fail,
                flaky,
                crash_after,
            }
        })
}

fn definition(c: &Case) -> SagaDefinition {
    let names: Vec<String> = (0..c.deps.len()).map(|i| format!("s{i}")).collect();
    let steps = c
        .deps
        .iter()
        .enumerate()
        .map(|(i, ds)| {
            let after: Vec<&str> = ds.iter().map(|d| names[*d].as_str()).collect();
            step(&names[i], &after)
        })
        .collect();
    SagaDefinition::new("random", steps).expect("acyclic by construction")
}

async fn run(c: Case) {
    let def = definition(&c);
    let log = Shared::default();
    let faults = Faults {
        fail: c.fail.iter().map(|i| format!("s{i}")).collect(),
        flaky: c.flaky.iter().map(|(i, n)| (format!("s{i}"), *n)).collect(),
        ..Faults::default()
    };
    let mem = InMemoryJournal::new();
    let journal: Arc<dyn Journal> = Arc::new(mem.clone());
    let sagas = Sagas::new(journal, handlers(&log, &faults));
    sagas.register(def.clone()).expect("register");
    let id = sagas
        .start("random", json!({"n": c.deps.len()}))
        .await
        .expect("start");
    let sagas = match c.crash_after {
        None => sagas,
        Some(k) => {
            // Crash once the participants have seen k calls (or the saga ended).
            loop {
                let calls: u32 = log.lock().expect("log").raw_calls.values().sum();
                if calls >= k || sagas.running() == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            sagas.stop_all().await;
            let restarted = Sagas::new(Arc::new(mem.reopen()), handlers(&log, &faults));
            restarted.register(def.clone()).expect("register");
            restarted.resume_all().await.expect("resume");
            restarted
        }
    };
    let status = sagas.wait(&id, T).await.expect("wait");
    assert!(status.phase.is_final(), "saga stuck: {status:?}");
    let all_ok = status
        .steps
        .iter()
        .all(|(_, s)| matches!(s, StepState::Succeeded(_)));
    assert_eq!(
        status.phase == Phase::Completed,
        all_ok,
        "completed iff every step succeeded"
    );
    if std::env::var("SAGA_PROP_DEBUG").is_ok() {
        eprintln!(
            "{:?} steps={} crash={:?} fail={:?}",
            status.phase,
            c.deps.len(),
            c.crash_after,
            c.fail
        );
    }
    let log = std::mem::take(&mut *log.lock().expect("log"));
    check_outcome(&def, &status, &log);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64), ..ProptestConfig::default() })]

    #[test]
    fn compensation_is_exact_and_ordered_for_random_dags(c in case()) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(run(c));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_interrupted_by_a_crash_is_retried_with_the_same_idempotency_key() {
    let keys = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let gate = Arc::new(tokio::sync::Notify::new());
    let mk = |block: bool| {
        let (keys, gate) = (keys.clone(), gate.clone());
        let mut h = Handlers::default();
        h.register("charge", move |ctx: StepContext| {
            let (keys, gate) = (keys.clone(), gate.clone());
            async move {
                keys.lock().expect("keys").push(ctx.idempotency_key());
                if block {
                    gate.notified().await; // the "process" dies while this runs
                }
                Ok(json!("charged"))
            }
        });
        h
    };
    let mem = InMemoryJournal::new();
    let def = SagaDefinition::new("pay", vec![StepDef::new("charge", "charge")]).expect("def");
    let first = Sagas::new(Arc::new(mem.clone()), mk(true));
    first.register(def.clone()).expect("register");
    let id = first.start("pay", json!({})).await.expect("start");
    while keys.lock().expect("keys").is_empty() {
        tokio::task::yield_now().await;
    }
    first.stop_all().await;
    let second = Sagas::new(Arc::new(mem.reopen()), mk(false));
    second.register(def).expect("register");
    assert_eq!(second.resume_all().await.expect("resume"), 1);
    let status = second.wait(&id, T).await.expect("wait");
    assert_eq!(status.phase, Phase::Completed);
    let keys = keys.lock().expect("keys").clone();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(
        keys[0], keys[1],
        "the retry after the crash used another idempotency key"
    );
    assert!(keys[0].ends_with("/charge/1"));
}

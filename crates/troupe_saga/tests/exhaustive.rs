//! Small DAGs, every step failing in turn and every compensation failing in turn.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;
use troupe_journal::{InMemoryJournal, Journal};
use troupe_saga::*;

const T: Duration = Duration::from_secs(30);

fn dags() -> Vec<SagaDefinition> {
    vec![
        SagaDefinition::new(
            "chain",
            vec![
                step("a", &[]),
                step("b", &["a"]),
                step("c", &["b"]),
                step("d", &["c"]),
            ],
        )
        .expect("chain"),
        SagaDefinition::new(
            "diamond",
            vec![
                step("a", &[]),
                step("b", &["a"]),
                step("c", &["a"]),
                step("d", &["b", "c"]),
            ],
        )
        .expect("diamond"),
        SagaDefinition::new(
            "fan",
            vec![
                step("a", &[]),
                step("b", &["a"]),
                step("c", &["a"]),
                step("d", &["a"]),
                step("e", &["a"]),
                step("f", &["b", "c", "d", "e"]),
            ],
        )
        .expect("fan"),
    ]
}

async fn run(def: &SagaDefinition, faults: Faults) -> (SagaStatus, Log) {
    let log = Shared::default();
    let journal: Arc<dyn Journal> = Arc::new(InMemoryJournal::new());
    let sagas = Sagas::new(journal, handlers(&log, &faults));
    sagas.register(def.clone()).expect("register");
    let id = sagas
        .start(def.name(), json!({"order": 42}))
        .await
        .expect("start");
    let status = sagas.wait(&id, T).await.expect("wait");
    let log = std::mem::take(&mut *log.lock().expect("log"));
    (status, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_failures_every_dag_completes() {
    for def in dags() {
        let (status, log) = run(&def, Faults::default()).await;
        assert_eq!(status.phase, Phase::Completed, "{}", def.name());
        check_outcome(&def, &status, &log);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_each_step_in_turn_compensates_exactly_what_completed() {
    for def in dags() {
        for s in def.steps() {
            let faults = Faults {
                fail: [s.name.clone()].into(),
                ..Faults::default()
            };
            let (status, log) = run(&def, faults).await;
            assert_eq!(
                status.phase,
                Phase::Aborted,
                "{} failing {}",
                def.name(),
                s.name
            );
            assert!(
                status.error.as_deref().is_some_and(|e| e.contains(&s.name)),
                "{status:?}"
            );
            check_outcome(&def, &status, &log);
            assert!(
                !log.entries
                    .iter()
                    .any(|(k, st)| k == "undo" && st == &s.name),
                "the failed step was compensated"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_within_the_policy() {
    for def in dags() {
        let first = def.steps()[0].name.clone();
        let faults = Faults {
            flaky: [(first.clone(), 2)].into(),
            ..Faults::default()
        };
        let (status, log) = run(&def, faults).await;
        assert_eq!(status.phase, Phase::Completed, "{}", def.name());
        assert_eq!(log.raw_calls[&first], 3, "two failures then a success");
        let faults = Faults {
            flaky: [(first.clone(), 3)].into(),
            ..Faults::default()
        };
        let (status, _) = run(&def, faults).await;
        assert_eq!(
            status.phase,
            Phase::Aborted,
            "three failures exhaust three attempts"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_each_compensation_in_turn_parks_the_saga_for_attention() {
    for def in dags() {
        let sink = def.steps().last().expect("steps").name.clone();
        for s in def.steps().iter().filter(|s| s.name != sink) {
            let faults = Faults {
                fail: [sink.clone()].into(),
                fail_undo: [s.name.clone()].into(),
                ..Faults::default()
            };
            let (status, log) = run(&def, faults).await;
            assert_eq!(
                status.phase,
                Phase::NeedsAttention,
                "{} undo {}",
                def.name(),
                s.name
            );
            assert!(
                status
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains(&s.name) && e.contains("2 times")),
                "{status:?}"
            );
            // Its dependencies wait for it and are never undone.
            let i = def.index(&s.name).expect("index");
            for d in def.deps(i) {
                let dn = &def.steps()[d].name;
                assert!(
                    !log.entries.iter().any(|(k, st)| k == "undo" && st == dn),
                    "`{dn}` undone before `{}`",
                    s.name
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_definitions_name_the_steps_at_fault() {
    let cycle = SagaDefinition::new(
        "c",
        vec![step("a", &["c"]), step("b", &["a"]), step("c", &["b"])],
    )
    .expect_err("cycle");
    assert!(
        cycle.to_string().contains("cycle") && cycle.to_string().contains("\"a\""),
        "{cycle}"
    );
    let unknown = SagaDefinition::new("u", vec![step("a", &["ghost"])]).expect_err("unknown");
    assert!(unknown.to_string().contains("ghost"), "{unknown}");
    let dup =
        SagaDefinition::new("d", vec![step("a", &[]), step("a", &[])]).expect_err("duplicate");
    assert!(dup.to_string().contains("duplicate step name `a`"), "{dup}");
    let sagas = Sagas::new(Arc::new(InMemoryJournal::new()), Handlers::default());
    let def = SagaDefinition::new("h", vec![StepDef::new("a", "nobody")]).expect("valid shape");
    assert!(matches!(
        sagas.register(def),
        Err(SagaError::UnknownHandler { .. })
    ));
    assert!(matches!(
        sagas.start_json(b"{not json").await,
        Err(SagaError::Malformed(_))
    ));
    assert!(matches!(
        sagas.start_json(br#"{"definition":"nope"}"#).await,
        Err(SagaError::UnknownDefinition(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_step_waits_for_its_signal_and_fails_past_its_deadline() {
    let log = Shared::default();
    let journal: Arc<dyn Journal> = Arc::new(InMemoryJournal::new());
    let sagas = Sagas::new(journal, handlers(&log, &Faults::default()));
    let def = SagaDefinition::new(
        "approval",
        vec![
            step("draft", &[]),
            StepDef::signal("approve", "approved", Duration::from_millis(300)).after(&["draft"]),
            step("publish", &["approve"]),
        ],
    )
    .expect("def");
    sagas.register(def.clone()).expect("register");
    let id = sagas.start("approval", json!({})).await.expect("start");
    // Deliver once the step is waiting.
    let deadline = tokio::time::Instant::now() + T;
    while !sagas
        .signal(&id, "approved", json!({"by": "ada"}))
        .await
        .expect("signal")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never waited for the signal"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let status = sagas.wait(&id, T).await.expect("wait");
    assert_eq!(status.phase, Phase::Completed);
    assert_eq!(
        status.steps[1].1,
        StepState::Succeeded(json!({"by": "ada"}))
    );
    // Nobody approves the second one.
    let id = sagas.start("approval", json!({})).await.expect("start");
    let status = sagas.wait(&id, T).await.expect("wait");
    assert_eq!(status.phase, Phase::Aborted);
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("deadline")),
        "{status:?}"
    );
    assert_eq!(
        status.steps[0].1,
        StepState::Compensated,
        "draft was not undone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_timeout_fails_and_is_retried() {
    let mut h = Handlers::default();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let c = calls.clone();
    h.register("slow", move |_ctx: StepContext| {
        let c = c.clone();
        async move {
            let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n == 0 {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Ok(json!(n))
        }
    });
    let sagas = Sagas::new(Arc::new(InMemoryJournal::new()), h);
    sagas
        .register(
            SagaDefinition::new(
                "t",
                vec![
                    StepDef::new("s", "slow")
                        .timeout(Duration::from_millis(50))
                        .retry(RetryPolicy::immediate(2)),
                ],
            )
            .expect("def"),
        )
        .expect("register");
    let id = sagas.start("t", json!(null)).await.expect("start");
    let status = sagas.wait(&id, T).await.expect("wait");
    assert_eq!(status.phase, Phase::Completed);
    assert_eq!(status.steps[0].1, StepState::Succeeded(json!(1)));
}

struct Inventory;

enum InventoryMsg {
    Reserve(
        String,
        ractor::RpcReplyPort<Result<serde_json::Value, StepError>>,
    ),
}

impl ractor::Actor for Inventory {
    type Msg = InventoryMsg;
    type State = u32;
    type Arguments = ();
    async fn pre_start(
        &self,
        _: ractor::ActorRef<InventoryMsg>,
        _: (),
    ) -> Result<u32, ractor::ActorProcessingErr> {
        Ok(0)
    }
    async fn handle(
        &self,
        _: ractor::ActorRef<InventoryMsg>,
        msg: InventoryMsg,
        n: &mut u32,
    ) -> Result<(), ractor::ActorProcessingErr> {
        let InventoryMsg::Reserve(key, reply) = msg;
        *n += 1;
        let _ = reply.send(Ok(json!({ "reserved_by": key, "count": *n })));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_can_target_an_actor_by_its_registered_name() {
    let (actor, _) = ractor::Actor::spawn(Some("inventory-test".into()), Inventory, ())
        .await
        .expect("spawn");
    let mut h = Handlers::default();
    h.register_actor("reserve", "inventory-test", |ctx: StepContext, reply| {
        InventoryMsg::Reserve(ctx.idempotency_key(), reply)
    });
    h.register_actor(
        "missing",
        "nobody-registered-this",
        |ctx: StepContext, reply| InventoryMsg::Reserve(ctx.idempotency_key(), reply),
    );
    let sagas = Sagas::new(Arc::new(InMemoryJournal::new()), h);
    sagas
        .register(SagaDefinition::new("inv", vec![StepDef::new("r", "reserve")]).expect("def"))
        .expect("register");
    let id = sagas.start("inv", json!({})).await.expect("start");
    let status = sagas.wait(&id, T).await.expect("wait");
    assert_eq!(status.phase, Phase::Completed);
    match &status.steps[0].1 {
        StepState::Succeeded(v) => assert!(
            v["reserved_by"]
                .as_str()
                .is_some_and(|k| k.ends_with("/r/1")),
            "{v}"
        ),
        other => panic!("{other:?}"),
    }
    sagas
        .register(
            SagaDefinition::new(
                "gone",
                vec![StepDef::new("m", "missing").retry(RetryPolicy::immediate(2))],
            )
            .expect("def"),
        )
        .expect("register");
    let id = sagas.start("gone", json!({})).await.expect("start");
    let status = sagas.wait(&id, T).await.expect("wait");
    assert_eq!(status.phase, Phase::Aborted);
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("nobody-registered-this")),
        "{status:?}"
    );
    actor.stop(None);
}

/// Handlers where step "a" waits for `gate` before succeeding.
fn gated(gate: &Arc<tokio::sync::Notify>, log: &Shared) -> Handlers {
    let mut h = handlers(log, &Faults::default());
    let (g, l) = (gate.clone(), log.clone());
    h.register("gated", move |ctx: StepContext| {
        let (g, l) = (g.clone(), l.clone());
        async move {
            g.notified().await;
            let mut log = l.lock().unwrap_or_else(|p| p.into_inner());
            if log.keys.insert(format!("do:{}", ctx.idempotency_key())) {
                log.entries.push(("do".into(), ctx.step.clone()));
            }
            Ok(json!("gated"))
        }
    });
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_whose_journal_fails_stops_and_resumes_when_asked() {
    let log = Shared::default();
    let gate = Arc::new(tokio::sync::Notify::new());
    let (journal, faults) = troupe_journal::FaultyJournal::new(InMemoryJournal::new());
    let sagas = Sagas::new(Arc::new(journal), gated(&gate, &log));
    let def = SagaDefinition::new(
        "j",
        vec![
            StepDef::new("a", "gated").compensate_with("undo"),
            step("b", &["a"]),
            step("c", &["b"]),
        ],
    )
    .expect("def");
    sagas.register(def.clone()).expect("register");
    let id = sagas.start("j", json!({})).await.expect("start");
    // Step a is running (its start is journaled); the write of its success
    // fails, so the saga actor fails rather than go on unjournaled.
    while sagas.status(&id).await.expect("status").steps[0].1 != StepState::Running(1) {
        tokio::task::yield_now().await;
    }
    faults.fail_appends(1);
    gate.notify_one();
    let deadline = tokio::time::Instant::now() + T;
    while sagas.running() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "saga neither failed nor finished"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let stopped = sagas.status(&id).await.expect("status");
    assert_eq!(stopped.phase, Phase::Running, "{stopped:?}");
    assert_eq!(
        stopped.steps[0].1,
        StepState::Running(1),
        "a's success was not journaled"
    );
    // Resumed, a runs again with the same idempotency key (deduplicated).
    assert_eq!(sagas.resume_all().await.expect("resume"), 1);
    gate.notify_one();
    let status = sagas.wait(&id, T).await.expect("wait");
    assert_eq!(status.phase, Phase::Completed);
    let log = log.lock().expect("log");
    check_outcome(&def, &status, &log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_past_the_running_bound_is_refused() {
    let log = Shared::default();
    let gate = Arc::new(tokio::sync::Notify::new());
    let sagas =
        Sagas::new(Arc::new(InMemoryJournal::new()), gated(&gate, &log)).with_max_running(1);
    sagas
        .register(SagaDefinition::new("one", vec![StepDef::new("a", "gated")]).expect("def"))
        .expect("register");
    let first = sagas.start("one", json!({})).await.expect("first");
    assert!(matches!(
        sagas.start("one", json!({})).await,
        Err(SagaError::Overloaded { running: 1 })
    ));
    gate.notify_one();
    assert_eq!(
        sagas.wait(&first, T).await.expect("wait").phase,
        Phase::Completed
    );
    let deadline = tokio::time::Instant::now() + T;
    while sagas.running() > 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    sagas.start("one", json!({})).await.expect("room again");
}

//! Durable timers: a timer an agent schedules, or a saga's signal
//! deadline, is journaled with its absolute time and fires once, also
//! when the process that scheduled it is gone by then.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::json;
use troupe::agent::TimerFired;
use troupe::prelude::*;
use troupe::saga::{Phase, SagaEvent};

/// Schedules reminders and remembers the ones that fired.
struct Reminder;

const REMINDER: AgentKey<Reminder> = AgentKey::new("reminder");

#[derive(Default, Serialize, Deserialize)]
struct Fired {
    names: Vec<String>,
}

impl Agent for Reminder {
    type State = Fired;

    async fn on_timer(
        &self,
        st: &mut Fired,
        _: &mut Context<Self>,
        timer: TimerFired,
    ) -> Result<(), AgentError> {
        st.names
            .push(format!("{}:{}", timer.name, timer.payload["note"]));
        Ok(())
    }
}

/// Schedule a reminder `in` from now.
struct Remind {
    name: &'static str,
    after: Duration,
}

impl Handles<Remind> for Reminder {
    type Reply = Result<u64, AgentError>;
    async fn handle(&self, _: &mut Fired, r: Remind, ctx: &mut Context<Self>) -> Self::Reply {
        ctx.schedule_in(r.after, r.name, &json!({"note": "call back"}))
            .await
    }
}

struct WhatFired;

impl Handles<WhatFired> for Reminder {
    type Reply = Vec<String>;
    async fn handle(&self, st: &mut Fired, _: WhatFired, _: &mut Context<Self>) -> Vec<String> {
        st.names.clone()
    }
}

async fn system(dir: &std::path::Path) -> Troupe {
    Troupe::builder()
        .data_dir(dir)
        .durability(Durability::Fsync)
        .agent(&REMINDER, Reminder, AgentOptions::default())
        .build()
        .await
        .expect("troupe")
}

/// Polls `f` until it holds (bounded: a liveness check, not a timing one).
async fn eventually<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) {
    for _ in 0..3_000 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("never happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_timer_fires_once_in_the_next_process_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = system(dir.path()).await;
    let me = first.agent(&REMINDER).expect("kind").get("customer-1");
    me.ask(Remind {
        name: "soon",
        after: Duration::from_millis(300),
    })
    .await
    .expect("ask")
    .expect("scheduled");
    me.ask(Remind {
        name: "now",
        after: Duration::ZERO,
    })
    .await
    .expect("ask")
    .expect("scheduled");
    eventually(|| {
        let me = me.clone();
        async move { me.ask(WhatFired).await.expect("ask").len() == 1 }
    })
    .await;
    // Gone before the second one is due.
    first.shutdown().await.expect("shutdown");
    drop(first);

    let second = system(dir.path()).await;
    let me = second.agent(&REMINDER).expect("kind").get("customer-1");
    eventually(|| {
        let me = me.clone();
        async move { me.ask(WhatFired).await.expect("ask").len() == 2 }
    })
    .await;
    assert_eq!(
        me.ask(WhatFired).await.expect("ask"),
        ["now:\"call back\"", "soon:\"call back\""]
    );
    // Delivered, then marked done in the timer journal: none is left to fire.
    eventually(|| async { second.timers().pending().await.expect("pending") == 0 }).await;
    second.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_signal_deadline_is_absolute_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let build = || async {
        Troupe::builder()
            .data_dir(dir.path())
            .durability(Durability::Fsync)
            .step("book", |_c: StepContext| async {
                Ok(json!({"booked": true}))
            })
            .step("unbook", |_c: StepContext| async { Ok(json!(null)) })
            .workflow(
                SagaDefinition::new(
                    "trip",
                    vec![
                        StepDef::new("book", "book").compensate_with("unbook"),
                        StepDef::signal("approve", "approve", Duration::from_millis(800))
                            .after(&["book"]),
                    ],
                )
                .expect("workflow"),
            )
            .build()
            .await
            .expect("troupe")
    };
    let first = build().await;
    let started = SystemTime::now();
    first
        .sagas()
        .start_with_id("trip-1", "trip", json!({}))
        .await
        .expect("start");
    eventually(|| async {
        let s = first.sagas().status("trip-1").await.expect("status");
        s.steps[1].1 == troupe::saga::StepState::Running(1)
    })
    .await;
    first.shutdown().await.expect("shutdown");
    drop(first);

    let restarted = troupe::journal::now_ms();
    let second = build().await;
    let done = second
        .sagas()
        .wait("trip-1", Duration::from_secs(30))
        .await
        .expect("wait");
    assert_eq!(done.phase, Phase::Aborted, "{done:?}");
    assert!(
        done.error
            .as_deref()
            .is_some_and(|e| e.contains("did not arrive before its deadline")),
        "{done:?}"
    );
    // One deadline, journaled with the step's start, one durable timer for
    // it: the restart did not arm a fresh 800 ms.
    let pid = PersistenceId::new("saga", "trip-1").expect("id");
    let events = second
        .journal()
        .replay(&pid, 1, u64::MAX)
        .collect_all()
        .await
        .expect("replay");
    let deadlines: Vec<(u64, Option<u64>)> = events
        .iter()
        .filter_map(|e| match e.decode::<SagaEvent>().ok()? {
            SagaEvent::StepStarted {
                step: 1,
                deadline_ms: Some(d),
                timer,
                ..
            } => Some((d, timer)),
            _ => None,
        })
        .collect();
    assert_eq!(deadlines.len(), 1, "{deadlines:?}");
    let (deadline, timer) = deadlines[0];
    assert!(timer.is_some(), "a durable timer was scheduled");
    let started = started
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        deadline >= started + 800,
        "the deadline counts from the step's start"
    );
    assert!(
        deadline < restarted + 800,
        "the deadline was set before the restart, not re-armed by it"
    );
    eventually(|| async { second.timers().pending().await.expect("pending") == 0 }).await;
    second.shutdown().await.expect("shutdown");
}

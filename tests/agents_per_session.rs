//! One agent kind, many sessions, each with an instance of its own:
//! answered concurrently (shown by the backend, which holds every stream
//! until enough are in flight together), each instance's state exact with
//! no lock in the agent, a failing instance restarted alone, and the
//! kind's limit on turns in flight kept (the next turn waits, or is
//! refused with a retry hint).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use troupe::prelude::*;
use troupe::testing::PacedBackend;

const SESSIONS: usize = 200;
const TURNS: u32 = 3;
/// The session whose instance panics on its second turn.
const FAILING: usize = 7;

/// Answers with the model and remembers which turns it answered.
struct Counter;

const COUNTER: AgentKey<Counter> = AgentKey::new("counter");
const LIMITED: AgentKey<Counter> = AgentKey::new("limited");
const IMPATIENT: AgentKey<Counter> = AgentKey::new("impatient");

#[derive(Default, Serialize, Deserialize)]
struct Answered {
    turns: Vec<u32>,
}

impl Agent for Counter {
    type State = Answered;

    async fn on_turn(&self, st: &mut Answered, ctx: &mut Context<Self>) -> Result<(), AgentError> {
        let turn = ctx.turn().expect("a turn");
        if ctx.session().ends_with(&format!("-{FAILING}")) && turn == 2 {
            st.turns.push(999); // never journaled: the instance restarts
            panic!("session {FAILING} fails on its second turn");
        }
        ctx.reply().await?;
        st.turns.push(turn);
        Ok(())
    }
}

/// This instance's answered turns.
struct Turns;

impl Handles<Turns> for Counter {
    type Reply = Vec<u32>;
    async fn handle(&self, st: &mut Answered, _: Turns, _: &mut Context<Self>) -> Vec<u32> {
        st.turns.clone()
    }
}

async fn system(backend: PacedBackend, options: AgentOptions, key: &AgentKey<Counter>) -> Troupe {
    Troupe::builder()
        .durability(Durability::InMemory)
        .backend(backend)
        .agent(key, Counter, options.model("paced", "paced"))
        .build()
        .await
        .expect("troupe")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sessions_of_one_kind_are_answered_at_once_each_with_exact_state() {
    // ANCHOR: paced
    // Every stream waits for its first token until 100 are in flight
    // together: with one mailbox per agent this would never happen.
    let backend = PacedBackend::new(
        "paced",
        4,
        Duration::from_millis(2),
        Duration::from_millis(2),
    )
    .hold_until(100, Duration::from_secs(60));
    let troupe = system(backend.clone(), AgentOptions::default(), &COUNTER).await;
    // ANCHOR_END: paced
    let counter = troupe.agent(&COUNTER).unwrap();
    let mut ids = Vec::new();
    for i in 0..SESSIONS {
        let id = format!("customer-{i}");
        troupe
            .sessions()
            .open(&id, COUNTER.name(), None)
            .await
            .unwrap();
        ids.push(id);
    }
    let mut clients = Vec::new();
    for id in ids.clone() {
        let agents = troupe.agents().clone();
        clients.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for q in 1..=TURNS {
                let posted = agents
                    .sessions()
                    .post(&id, &format!("question {q}"))
                    .await
                    .unwrap();
                outcomes.push(agents.wait_turn_end(&id, posted.turn).await.is_ok());
            }
            outcomes
        }));
    }
    let mut results = Vec::new();
    for c in clients {
        results.push(c.await.unwrap());
    }
    assert!(
        backend.max_in_flight() >= 100,
        "only {} streams in flight at once",
        backend.max_in_flight()
    );
    for (i, id) in ids.iter().enumerate() {
        let turns = counter.get(id).ask(Turns).await.unwrap();
        if i == FAILING {
            assert_eq!(results[i], [true, false, true]);
            assert_eq!(turns, [1, 3], "rolled back to its journaled state, then on");
        } else {
            assert_eq!(results[i], [true; TURNS as usize], "session {i}");
            assert_eq!(turns, [1, 2, 3], "session {i}");
        }
    }
    assert_eq!(counter.restarts(), 1, "one instance restarted, alone");
    troupe.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kinds_limit_holds_turns_in_flight_and_the_next_one_waits() {
    let backend = PacedBackend::new(
        "paced",
        2,
        Duration::from_millis(1),
        Duration::from_millis(1),
    )
    .hold_until(50, Duration::from_secs(60));
    let options = AgentOptions::default().concurrency(50, Duration::from_secs(120));
    let troupe = system(backend.clone(), options, &LIMITED).await;
    let mut waits = Vec::new();
    for i in 0..SESSIONS {
        let id = format!("s-{i}");
        troupe
            .sessions()
            .open(&id, LIMITED.name(), None)
            .await
            .unwrap();
        let posted = troupe.sessions().post(&id, "hello").await.unwrap();
        let agents = troupe.agents().clone();
        waits.push(tokio::spawn(async move {
            agents.wait_turn_end(&id, posted.turn).await
        }));
    }
    for w in waits {
        w.await
            .unwrap()
            .expect("every turn is answered once a slot frees up");
    }
    assert_eq!(
        backend.max_in_flight(),
        50,
        "never more than the limit at once"
    );
    assert_eq!(backend.calls(), SESSIONS);
    troupe.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_kinds_limit_a_turn_that_cannot_wait_is_refused_with_a_hint() {
    // Streams are held until the test releases them.
    let backend = PacedBackend::new("paced", 1, Duration::ZERO, Duration::ZERO)
        .hold_until(usize::MAX, Duration::from_secs(60));
    let options = AgentOptions::default().concurrency(50, Duration::from_millis(100));
    let troupe = system(backend.clone(), options, &IMPATIENT).await;
    let mut first = Vec::new();
    for i in 0..51 {
        let id = format!("s-{i}");
        troupe
            .sessions()
            .open(&id, IMPATIENT.name(), None)
            .await
            .unwrap();
        if i < 50 {
            let posted = troupe.sessions().post(&id, "hello").await.unwrap();
            first.push((id, posted.turn));
        }
    }
    while backend.in_flight() < 50 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let posted = troupe.sessions().post("s-50", "me too").await.unwrap();
    match troupe.agents().wait_turn_end("s-50", posted.turn).await {
        Err(e @ AgentError::TurnFailed { .. }) => {
            let hint = e.retry_after().expect("a retry hint");
            assert!(hint >= Duration::from_millis(100), "{e}");
        }
        other => panic!("the 51st turn should be refused, got {other:?}"),
    }
    assert_eq!(backend.max_in_flight(), 50);
    backend.release();
    for (id, turn) in first {
        troupe.agents().wait_turn_end(&id, turn).await.unwrap();
    }
    // The refused customer asks again and is answered.
    let again = troupe.sessions().post("s-50", "me too").await.unwrap();
    troupe
        .agents()
        .wait_turn_end("s-50", again.turn)
        .await
        .unwrap();
    troupe.shutdown().await.unwrap();
}

//! Agents, one instance per session: turns with tools journaled call by
//! call, typed messages and replies, durable state, hand-offs, topics,
//! failures that restart one instance, killed instances whose turn is
//! answered again, tools that never run twice, cancelled turns.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use tokio::sync::Semaphore;
use troupe_agent::{
    Agent, AgentError, AgentKey, AgentOptions, AgentSystem, Context, Dispatch, Handles, Inference,
    LocalBackend, Overflow, Role, SessionConfig, SessionEvent, SessionItem, Sessions, Tool,
    ToolCallInfo, Tools,
};
use troupe_journal::{FaultyJournal, InMemoryJournal, Journal};

fn model() -> LocalBackend {
    LocalBackend::default().words(6, 2).call_tool_when(
        "refund",
        "refund_status",
        json!({"order": "A-17"}),
    )
}

fn system_on(journal: Arc<dyn Journal>, backend: LocalBackend) -> AgentSystem {
    let sessions = Sessions::new(journal, SessionConfig::default());
    AgentSystem::new(sessions, Inference::new().with_backend(backend))
}

fn system() -> AgentSystem {
    system_on(Arc::new(InMemoryJournal::new()), model())
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Order {
    order: String,
}

/// Replies with the model; remembers how many questions it was asked.
struct Desk;

const DESK: AgentKey<Desk> = AgentKey::new("desk");

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct DeskState {
    asked: u32,
    notes: Vec<String>,
}

impl Agent for Desk {
    type State = DeskState;

    async fn on_turn(&self, st: &mut DeskState, ctx: &mut Context<Self>) -> Result<(), AgentError> {
        st.asked += 1;
        ctx.reply().await?;
        Ok(())
    }
}

/// How many questions this session's desk was asked.
struct Asked;

impl Handles<Asked> for Desk {
    type Reply = u32;
    async fn handle(&self, st: &mut DeskState, _: Asked, _: &mut Context<Self>) -> u32 {
        st.asked
    }
}

/// Adds a note; answers the notes so far.
struct Note(String);

impl Handles<Note> for Desk {
    type Reply = Vec<String>;
    async fn handle(&self, st: &mut DeskState, n: Note, _: &mut Context<Self>) -> Vec<String> {
        st.notes.push(n.0);
        st.notes.clone()
    }
}

/// Panics, to show that one instance restarts alone.
struct Boom;

impl Handles<Boom> for Desk {
    type Reply = ();
    async fn handle(&self, st: &mut DeskState, _: Boom, _: &mut Context<Self>) {
        st.notes.push("never journaled".into());
        panic!("boom");
    }
}

fn refund_tool(calls: Arc<AtomicUsize>) -> Tool {
    Tool::new("refund_status", "Status of a refund", move |o: Order| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(format!("refund for {} sent", o.order))
        }
    })
}

#[tokio::test]
async fn a_posted_turn_reaches_the_sessions_agent_and_is_journaled_call_by_call() {
    let sys = system();
    let calls = Arc::new(AtomicUsize::new(0));
    let tools = Tools::new().with(refund_tool(calls.clone()));
    let desk = sys
        .register(&DESK, Desk, AgentOptions::default().tools(tools))
        .await
        .unwrap();
    let id = sys.sessions().create(DESK.name(), None).await.unwrap();
    let mut sub = sys.sessions().subscribe(&id, 0).await.unwrap();
    // Posting dispatches the turn: nobody tells the agent separately.
    sys.sessions()
        .post(&id, "where is my refund?")
        .await
        .unwrap();
    let mut kinds = Vec::new();
    while let Some(Ok(SessionItem::Event(rec))) = sub.next().await {
        kinds.push(match &rec.event {
            SessionEvent::Opened { .. } => "opened",
            SessionEvent::UserTurn { .. } => "user",
            SessionEvent::TurnStarted { .. } => "started",
            SessionEvent::ToolCalled { .. } => "tool_called",
            SessionEvent::ToolResult { ok: true, .. } => "tool_result",
            SessionEvent::ModelChunk { .. } => "chunk",
            SessionEvent::TurnCompleted { .. } => "completed",
            other => panic!("unexpected {other:?}"),
        });
        if kinds.last() == Some(&"completed") {
            break;
        }
    }
    let chunks = kinds.iter().filter(|k| **k == "chunk").count();
    assert!(chunks > 1, "the reply streamed in chunks");
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "opened",
            "user",
            "started",
            "tool_called",
            "tool_result",
            "chunk",
            "completed"
        ]
    );
    let view = sys.sessions().view(&id).await.unwrap();
    let roles: Vec<_> = view.messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [Role::User, Role::Assistant, Role::Tool, Role::Assistant]
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The instance's state: typed ask, typed reply.
    assert_eq!(desk.get(&id).ask(Asked).await.unwrap(), 1);
}

#[tokio::test]
async fn instance_state_is_journaled_survives_passivation_and_a_panic_restarts_one_instance() {
    let journal: Arc<dyn Journal> = Arc::new(InMemoryJournal::new());
    let sys = system_on(journal.clone(), model());
    let desk = sys
        .register(&DESK, Desk, AgentOptions::default())
        .await
        .unwrap();
    let a = desk.get("customer-a");
    let b = desk.get("customer-b");
    assert_eq!(
        a.ask(Note("likes tea".into())).await.unwrap(),
        ["likes tea"]
    );
    b.tell(Note("prefers mail".into())).await.unwrap();
    assert_eq!(
        b.ask(Note("vip".into())).await.unwrap(),
        ["prefers mail", "vip"]
    );
    // Passivated, then activated again from the journal.
    desk.passivate_all().await;
    assert_eq!(desk.active_count(), 0);
    assert_eq!(a.ask(Note("and scones".into())).await.unwrap().len(), 2);
    // A panic answers the caller with a typed error, rolls that instance
    // back to its journaled state, and leaves the other alone.
    match a.ask(Boom).await {
        Err(AgentError::Panicked { key, message, .. }) => {
            assert_eq!(key, "customer-a");
            assert_eq!(message, "boom");
        }
        other => panic!("expected a panic error, got {other:?}"),
    }
    assert_eq!(desk.restarts(), 1);
    assert_eq!(
        a.ask(Note("third".into())).await.unwrap(),
        ["likes tea", "and scones", "third"]
    );
    assert_eq!(b.ask(Note("x".into())).await.unwrap().len(), 3);
    // A system over the same journal (a restart) finds the same states.
    let again = system_on(journal, model());
    let desk2 = again
        .register(&DESK, Desk, AgentOptions::default())
        .await
        .unwrap();
    assert_eq!(desk2.get("customer-a").ask(Asked).await.unwrap(), 0);
    assert_eq!(
        desk2.get("customer-b").ask(Note("y".into())).await.unwrap(),
        ["prefers mail", "vip", "x", "y"]
    );
    // Names are unique; unknown names and keys are typed errors.
    assert!(matches!(
        sys.register(&DESK, Desk, AgentOptions::default()).await,
        Err(AgentError::DuplicateAgent(_))
    ));
    const NOBODY: AgentKey<Desk> = AgentKey::new("nobody");
    assert!(matches!(
        sys.agent(&NOBODY),
        Err(AgentError::UnknownAgent(_))
    ));
    const BAD: AgentKey<Desk> = AgentKey::new("no spaces");
    assert!(matches!(
        sys.register(&BAD, Desk, AgentOptions::default()).await,
        Err(AgentError::Invalid { .. })
    ));
}

/// Routes every question to the billing desk.
struct Triage;
const TRIAGE: AgentKey<Triage> = AgentKey::new("triage");
const BILLING: AgentKey<Desk> = AgentKey::new("billing");

impl Agent for Triage {
    type State = ();
    async fn on_turn(&self, _: &mut (), ctx: &mut Context<Self>) -> Result<(), AgentError> {
        ctx.hand_off(&BILLING).await
    }
}

#[tokio::test]
async fn a_turn_handed_off_is_answered_by_the_other_agent_and_waited_for_end_to_end() {
    let sys = system();
    sys.register(&TRIAGE, Triage, AgentOptions::default())
        .await
        .unwrap();
    let billing = sys
        .register(&BILLING, Desk, AgentOptions::default())
        .await
        .unwrap();
    let id = sys.sessions().create(TRIAGE.name(), None).await.unwrap();
    let posted = sys
        .sessions()
        .post_with(&id, "charged twice", Vec::new(), Dispatch::Later)
        .await
        .unwrap();
    let outcome = sys.answer(&id, posted.turn).await.unwrap();
    assert_eq!(outcome.turn.turn, 1);
    assert_eq!(billing.get(&id).ask(Asked).await.unwrap(), 1);
    let events = sys.sessions().journal().replay(
        &troupe_agent::session::session_pid(&id).unwrap(),
        1,
        u64::MAX,
    );
    let events = events.collect_all().await.unwrap();
    let handed = events
        .iter()
        .filter_map(|e| e.decode::<SessionEvent>().ok())
        .any(|e| matches!(e, SessionEvent::HandedOff { agent, .. } if agent == "billing"));
    assert!(handed, "the hand-off is journaled");
    // A turn already ended is nothing to answer.
    assert!(matches!(
        sys.answer(&id, posted.turn).await,
        Err(AgentError::NothingToAnswer(_))
    ));
}

/// Subscribes to the `answered` topic.
struct Board;
const BOARD: AgentKey<Board> = AgentKey::new("board");

impl Agent for Board {
    type State = Vec<u32>;
}

impl Handles<u32> for Board {
    type Reply = ();
    async fn handle(&self, seen: &mut Vec<u32>, n: u32, _: &mut Context<Self>) {
        seen.push(n);
    }
}

struct Seen;
impl Handles<Seen> for Board {
    type Reply = Vec<u32>;
    async fn handle(&self, seen: &mut Vec<u32>, _: Seen, _: &mut Context<Self>) -> Vec<u32> {
        seen.clone()
    }
}

#[tokio::test]
async fn topics_deliver_to_agent_instances_and_drop_or_wait_at_a_full_mailbox() {
    let sys = system();
    let board = sys
        .register(
            &BOARD,
            Board,
            AgentOptions {
                mailbox: 1,
                ..AgentOptions::default()
            },
        )
        .await
        .unwrap();
    let main = board.get("main");
    sys.topics()
        .subscribe_agent::<Board, u32>("answered", main.clone())
        .unwrap();
    let p = sys.topics().publish("answered", 1u32).await.unwrap();
    assert_eq!((p.delivered, p.dropped), (1, 0));
    assert!(matches!(
        sys.topics().publish("answered", "wrong type").await,
        Err(AgentError::WrongMessageType { .. })
    ));
    // Flood with the drop policy: what does not fit is dropped and counted.
    let mut dropped = 0;
    for n in 2..200u32 {
        dropped += sys.topics().publish("answered", n).await.unwrap().dropped;
    }
    let seen = main.ask(Seen).await.unwrap();
    assert_eq!(
        seen.len() + dropped,
        199,
        "every message delivered or counted"
    );
    // With the wait policy nothing is dropped.
    sys.topics()
        .declare::<u32>("answered", Overflow::Wait(Duration::from_secs(30)))
        .unwrap();
    for n in 1000..1100u32 {
        assert_eq!(
            sys.topics().publish("answered", n).await.unwrap().dropped,
            0
        );
    }
    let seen = main.ask(Seen).await.unwrap();
    assert!(seen.ends_with(&(1000..1100).collect::<Vec<_>>()));
}

/// A tool that waits for the test before answering, and counts its calls
/// by key.
#[derive(Clone)]
struct Held {
    gate: Arc<Semaphore>,
    keys: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Held {
    fn tool(&self, name: &str) -> Tool {
        let held = self.clone();
        Tool::keyed(
            name,
            "Waits for the test",
            move |o: Order, call: ToolCallInfo| {
                let held = held.clone();
                async move {
                    held.keys.lock().unwrap().push(format!(
                        "{}:{}",
                        call.idempotency_key(),
                        call.attempt
                    ));
                    held.gate.acquire().await.unwrap().forget();
                    Ok::<_, String>(format!("done for {}", o.order))
                }
            },
        )
    }
}

#[tokio::test]
async fn a_killed_instance_has_its_turn_answered_again_reusing_every_journaled_tool_result() {
    let held = Held {
        gate: Arc::new(Semaphore::new(0)),
        keys: Arc::default(),
    };
    let backend = LocalBackend::default()
        .words(4, 2)
        .call_tool_when("refund", "refund_status", json!({"order": "A-1"}))
        .call_tool_when("charge", "charge_card", json!({"order": "A-2"}));
    let sys = system_on(Arc::new(InMemoryJournal::new()), backend);
    let tools = Tools::new()
        .with(held.tool("refund_status"))
        .with(held.tool("charge_card").at_most_once());
    let desk = sys
        .register(&DESK, Desk, AgentOptions::default().tools(tools))
        .await
        .unwrap();

    // A repeatable tool, interrupted while it runs: run again, same key.
    let id = sys.sessions().create(DESK.name(), None).await.unwrap();
    let posted = sys.sessions().post(&id, "my refund?").await.unwrap();
    while held.keys.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    assert!(desk.kill_instance(&id));
    held.gate.add_permits(1);
    let outcome = sys.wait_turn_end(&id, posted.turn).await.unwrap();
    assert_eq!(outcome.turn.attempt, 2);
    let keys = held.keys.lock().unwrap().clone();
    assert_eq!(keys, [format!("{id}/1/1/0:1"), format!("{id}/1/1/0:2")]);
    assert!(outcome.text.contains("done for A-1"), "{}", outcome.text);

    // Once its result is journaled, a call never runs again: a crash after
    // it (during the answer's text) reuses the result.
    held.keys.lock().unwrap().clear();
    held.gate.add_permits(100);
    let id2 = sys.sessions().create(DESK.name(), None).await.unwrap();
    let mut sub = sys.sessions().subscribe(&id2, 0).await.unwrap();
    let p2 = sys.sessions().post(&id2, "refund again?").await.unwrap();
    while let Some(Ok(SessionItem::Event(rec))) = sub.next().await {
        if matches!(rec.event, SessionEvent::ToolResult { .. }) {
            break;
        }
    }
    desk.kill_instance(&id2);
    let o2 = sys.wait_turn_end(&id2, p2.turn).await.unwrap();
    let runs = held.keys.lock().unwrap().len();
    assert_eq!(runs, 1, "the tool ran once; attempt {}", o2.turn.attempt);
    held.gate.forget_permits(1000);

    // A tool that must not run twice, interrupted: failed, never re-run.
    held.keys.lock().unwrap().clear();
    let id3 = sys.sessions().create(DESK.name(), None).await.unwrap();
    let p3 = sys.sessions().post(&id3, "charge my card").await.unwrap();
    while held.keys.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    desk.kill_instance(&id3);
    held.gate.add_permits(100);
    let o3 = sys.wait_turn_end(&id3, p3.turn).await.unwrap();
    assert_eq!(o3.turn.attempt, 2);
    assert_eq!(held.keys.lock().unwrap().len(), 1, "charged once");
    let view = sys.sessions().view(&id3).await.unwrap();
    let tool_msg = view
        .messages
        .iter()
        .find(|m| m.role == Role::Tool)
        .expect("the failed call is in the context");
    assert!(tool_msg.content.contains("interrupted, not retried"));
}

#[tokio::test]
async fn a_cancelled_turn_is_failed_and_the_session_takes_the_next_message() {
    let held = Held {
        gate: Arc::new(Semaphore::new(0)),
        keys: Arc::default(),
    };
    let sys = system();
    sys.register(
        &DESK,
        Desk,
        AgentOptions::default().tools(Tools::new().with(held.tool("refund_status"))),
    )
    .await
    .unwrap();
    let id = sys.sessions().create(DESK.name(), None).await.unwrap();
    let p = sys.sessions().post(&id, "refund please").await.unwrap();
    while held.keys.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    assert!(matches!(
        sys.sessions().post(&id, "hello?").await,
        Err(AgentError::Busy { .. })
    ));
    assert!(sys.cancel_turn(&id).await.unwrap());
    match sys.wait_turn_end(&id, p.turn).await {
        Err(AgentError::TurnFailed { error, .. }) => {
            assert!(error.contains("cancelled"), "{error}")
        }
        other => panic!("expected a failed turn, got {other:?}"),
    }
    let p2 = sys.sessions().post(&id, "thanks anyway").await.unwrap();
    assert_eq!(p2.turn, 2);
    assert_eq!(sys.wait_turn_end(&id, 2).await.unwrap().turn.turn, 2);
}

#[tokio::test]
async fn journal_failures_reach_callers_as_transient_errors_with_their_source() {
    let (faulty, plan) = FaultyJournal::new(InMemoryJournal::new());
    let sys = system_on(Arc::new(faulty), model());
    sys.register(&DESK, Desk, AgentOptions::default())
        .await
        .unwrap();
    let id = sys.sessions().create(DESK.name(), None).await.unwrap();
    plan.fail_appends(1);
    let e = sys.sessions().post(&id, "hello").await.unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    let mut source = std::error::Error::source(&e);
    let mut found = false;
    while let Some(s) = source {
        found |= s.to_string().contains("injected");
        source = s.source();
    }
    assert!(found, "the journal's own error is kept as a source: {e:?}");
    // The session recovered and takes the message now.
    sys.sessions().post(&id, "hello").await.unwrap();
    assert_eq!(sys.wait_turn_end(&id, 1).await.unwrap().turn.turn, 1);
}

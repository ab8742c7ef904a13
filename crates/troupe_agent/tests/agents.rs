//! Agents: turns with tools on the local backend, messages by name, topics
//! with bounded publishing, restarts.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ractor::RpcReplyPort;
use serde_json::json;
use troupe_agent::{
    Agent, AgentContext, AgentError, AgentOptions, AgentSystem, Inference, LocalBackend, Overflow,
    SessionConfig, SessionEvent, SessionItem, Sessions, Tool, Tools, TurnOutcome,
};
use troupe_journal::InMemoryJournal;

fn system() -> AgentSystem {
    let sessions = Sessions::new(Arc::new(InMemoryJournal::new()), SessionConfig::default());
    let local = LocalBackend::default().words(6, 2).call_tool_when(
        "refund",
        "refund_status",
        json!({"order": "A-17"}),
    );
    AgentSystem::new(sessions, Inference::new().with_backend(local))
}

enum DeskMsg {
    Answer(String, RpcReplyPort<Result<TurnOutcome, AgentError>>),
    Crash,
}

struct Desk;

#[async_trait::async_trait]
impl Agent for Desk {
    type Msg = DeskMsg;
    async fn handle(&mut self, ctx: &AgentContext, msg: DeskMsg) -> Result<(), AgentError> {
        match msg {
            DeskMsg::Answer(session, reply) => {
                let outcome = ctx.reply(&session).await;
                if let Ok(o) = &outcome {
                    ctx.publish("answered", o.turn.turn).await?;
                }
                let _ = reply.send(outcome);
                Ok(())
            }
            DeskMsg::Crash => Err(AgentError::Failed {
                agent: ctx.name().into(),
                message: "asked to crash".into(),
            }),
        }
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Order {
    order: String,
}

#[tokio::test]
async fn a_turn_with_a_tool_call_is_journaled_call_by_call() {
    let sys = system();
    let tools = Tools::new().with(Tool::new(
        "refund_status",
        "Status of a refund",
        |o: Order| async move { Ok::<_, String>(format!("refund for {} sent", o.order)) },
    ));
    let (desk, _sup) = sys
        .spawn("desk", AgentOptions::default().tools(tools), || Desk)
        .await
        .unwrap();
    let id = sys.sessions().create("desk", None).await.unwrap();
    let mut sub = sys.sessions().subscribe(&id, 0).await.unwrap();
    sys.sessions()
        .post(&id, "where is my refund?")
        .await
        .unwrap();
    let outcome = desk
        .ask(|p| DeskMsg::Answer(id.clone(), p), Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome.tool_calls, 1);
    assert!(
        outcome.text.starts_with(r#"("refund for A-17 sent")"#),
        "{}",
        outcome.text
    );
    let mut kinds = Vec::new();
    while let Some(Ok(SessionItem::Event(rec))) = futures::StreamExt::next(&mut sub).await {
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
        if rec.seq == outcome.seq {
            break;
        }
    }
    assert_eq!(
        kinds,
        [
            "opened",
            "user",
            "started",
            "tool_called",
            "tool_result",
            "chunk",
            "chunk",
            "chunk",
            "completed"
        ]
    );
    let view = sys.sessions().view(&id).await.unwrap();
    let roles: Vec<_> = view.messages.iter().map(|m| m.role).collect();
    use troupe_agent::Role;
    assert_eq!(
        roles,
        [Role::User, Role::Assistant, Role::Tool, Role::Assistant]
    );
}

struct Counter(Arc<AtomicUsize>);

#[async_trait::async_trait]
impl Agent for Counter {
    type Msg = u32;
    async fn handle(&mut self, _ctx: &AgentContext, _n: u32) -> Result<(), AgentError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Slow(Arc<tokio::sync::Semaphore>, Arc<AtomicUsize>);

#[async_trait::async_trait]
impl Agent for Slow {
    type Msg = u32;
    async fn handle(&mut self, _ctx: &AgentContext, _n: u32) -> Result<(), AgentError> {
        self.0.acquire().await.unwrap().forget();
        self.1.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn agents_by_name_topics_and_restarts() {
    let sys = system();
    let starts = Arc::new(AtomicUsize::new(0));
    let s = starts.clone();
    let (desk, _sup) = sys
        .spawn("desk", AgentOptions::default(), move || {
            s.fetch_add(1, Ordering::SeqCst);
            Desk
        })
        .await
        .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let (counter, _sup2) = sys
        .spawn("counter", AgentOptions::default(), move || {
            Counter(c.clone())
        })
        .await
        .unwrap();
    // Slow subscriber: mailbox of 1, blocked until we release it.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let slow_done = Arc::new(AtomicUsize::new(0));
    let (g, d) = (gate.clone(), slow_done.clone());
    let options = AgentOptions {
        mailbox: 1,
        ..AgentOptions::default()
    };
    let (slow, _sup3) = sys
        .spawn("slow", options, move || Slow(g.clone(), d.clone()))
        .await
        .unwrap();

    // Names resolve to typed handles.
    assert!(matches!(
        sys.handle::<String>("counter"),
        Err(AgentError::WrongMessageType { .. })
    ));
    assert!(matches!(
        sys.handle::<u32>("nobody"),
        Err(AgentError::UnknownAgent(_))
    ));
    assert!(matches!(
        sys.agent("counter", AgentOptions::default(), || Counter(Arc::new(
            AtomicUsize::new(0)
        ))),
        Err(AgentError::DuplicateAgent(_))
    ));

    // Topic with the Drop policy: the slow subscriber misses what does not fit.
    sys.topics().subscribe("answered", counter.clone()).unwrap();
    sys.topics().subscribe("answered", slow.clone()).unwrap();
    let p1 = sys.topics().publish("answered", 1u32).await.unwrap();
    assert_eq!((p1.delivered, p1.dropped), (2, 0));
    // `slow` now holds message 1 in its handler; one more fits its mailbox.
    while slow.depth() > 0 {
        tokio::task::yield_now().await;
    }
    let p2 = sys.topics().publish("answered", 2u32).await.unwrap();
    assert_eq!((p2.delivered, p2.dropped), (2, 0));
    let p3 = sys.topics().publish("answered", 3u32).await.unwrap();
    assert_eq!(
        (p3.delivered, p3.dropped),
        (1, 1),
        "full mailbox: dropped and counted"
    );
    assert!(matches!(
        sys.topics().publish("answered", "wrong type").await,
        Err(AgentError::WrongMessageType { .. })
    ));
    // With the Wait policy, the publisher waits for room (bounded).
    sys.topics()
        .declare::<u32>("answered", Overflow::Wait(Duration::from_secs(30)))
        .unwrap();
    let waiting = {
        let t = sys.topics().clone();
        tokio::spawn(async move { t.publish("answered", 4u32).await })
    };
    gate.add_permits(10);
    let p4 = waiting.await.unwrap().unwrap();
    assert_eq!((p4.delivered, p4.dropped), (2, 0));

    // A failing agent is restarted with a fresh value and keeps working.
    desk.tell(DeskMsg::Crash).unwrap();
    let id = sys.sessions().create("desk", None).await.unwrap();
    sys.sessions().post(&id, "hello").await.unwrap();
    let outcome = desk
        .ask(|p| DeskMsg::Answer(id.clone(), p), Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome.turn.turn, 1);
    assert_eq!(starts.load(Ordering::SeqCst), 2, "one restart");
    // Its answer was published to the counter (plus messages 1 to 4).
    while count.load(Ordering::SeqCst) < 5 {
        tokio::task::yield_now().await;
    }
}

//! Tool approvals through the API: a call of a tool that needs approval
//! waits, holding no GPU lease and no turn slot, until a person approves
//! or rejects it or its deadline passes; the first decision stands and is
//! journaled before it is answered; the model is told of a rejection.
//! (The HTTP route and a SIGKILL while waiting: `approval_crash.rs`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use troupe::agent::model::{ChatRequest, Chunk, ChunkStream, ModelBackend, Role, ToolCall, Usage};
use troupe::agent::session::{Dispatch, TurnRef};
use troupe::gpu::probe::SimulatedProbe;
use troupe::prelude::*;

struct Desk;

impl Agent for Desk {
    type State = ();
}

const DESK: AgentKey<Desk> = AgentKey::new("desk");

/// A model that calls `lookup` and `refund` in one answer when asked for
/// a refund, `wipe` when asked to wipe, and otherwise answers with what
/// the tools said. It keeps every request it was sent.
#[derive(Clone, Default)]
struct Scripted {
    requests: Arc<std::sync::Mutex<Vec<ChatRequest>>>,
}

#[troupe::async_trait]
impl ModelBackend for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, AgentError> {
        self.requests.lock().unwrap().push(request.clone());
        let last = request.messages.last().cloned();
        let turn = request
            .messages
            .iter()
            .filter(|m| m.role == Role::User)
            .count();
        let call = |name: &str, args: serde_json::Value| {
            Ok(Chunk::ToolCall(ToolCall {
                id: format!("call-{turn}-{name}"),
                name: name.into(),
                arguments: args.to_string(),
            }))
        };
        let done = |reason: &str| {
            Ok(Chunk::Done {
                finish_reason: reason.into(),
                usage: Some(Usage {
                    prompt_tokens: 1,
                    completion_tokens: 1,
                }),
            })
        };
        let chunks: Vec<Result<Chunk, AgentError>> = match last {
            Some(m) if m.role == Role::User && m.content.contains("refund") => vec![
                call("lookup", json!({"order": 7})),
                call("refund", json!({"order": 7})),
                done("tool_calls"),
            ],
            Some(m) if m.role == Role::User && m.content.contains("wipe") => {
                vec![call("wipe", json!({"order": 7})), done("tool_calls")]
            }
            Some(m) if m.role == Role::Tool => {
                let said: Vec<String> = request
                    .messages
                    .iter()
                    .filter(|m| m.role == Role::Tool)
                    .map(|m| m.content.clone())
                    .collect();
                vec![Ok(Chunk::Text(said.join(" | "))), done("stop")]
            }
            _ => vec![Ok(Chunk::Text("hello".into())), done("stop")],
        };
        Ok(Box::pin(futures::stream::iter(chunks)))
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Order {
    order: u32,
}

/// Counts each run of a tool.
fn tool(name: &'static str, runs: Arc<AtomicUsize>) -> Tool {
    Tool::new(name, "Does its job", move |o: Order| {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(json!({ "tool": name, "order": o.order, "done": true }))
        }
    })
}

struct Desked {
    troupe: Troupe,
    model: Scripted,
    lookups: Arc<AtomicUsize>,
    refunds: Arc<AtomicUsize>,
    wipes: Arc<AtomicUsize>,
}

/// One turn at a time for the desk (so a turn that kept its slot while
/// waiting would block every other session), simulated GPUs, timers.
async fn desk(wipe_deadline: Duration) -> Desked {
    let (lookups, refunds, wipes) = Default::default();
    let (lookups, refunds, wipes): (Arc<AtomicUsize>, Arc<AtomicUsize>, Arc<AtomicUsize>) =
        (lookups, refunds, wipes);
    let model = Scripted::default();
    let tools = Tools::new()
        .with(tool("lookup", lookups.clone()))
        .with(
            tool("refund", refunds.clone())
                .at_most_once()
                .needs_approval(Duration::from_secs(600)),
        )
        .with(tool("wipe", wipes.clone()).needs_approval(wipe_deadline));
    let troupe = Troupe::builder()
        .durability(Durability::InMemory)
        .gpus(Arc::new(SimulatedProbe::new(1, 16 << 30)))
        .backend(model.clone())
        .agent(
            &DESK,
            Desk,
            AgentOptions::default()
                .tools(tools)
                .model("scripted", "m")
                .concurrency(1, Duration::from_secs(30)),
        )
        .build()
        .await
        .expect("troupe");
    Desked {
        troupe,
        model,
        lookups,
        refunds,
        wipes,
    }
}

/// Reads the session until `call` waits for approval (the loop decides;
/// its cap only stops a broken build from hanging).
async fn until_waiting(sessions: &Sessions, id: &str, call: &str) -> SessionView {
    for _ in 0..20_000 {
        let view = sessions.view(id).await.expect("view");
        if view.approval(call).is_some_and(|a| a.decision.is_none()) {
            return view;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("call `{call}` of `{id}` never waited for approval");
}

use troupe::agent::SessionView;

async fn events(sessions: &Sessions, id: &str) -> Vec<SessionEvent> {
    use futures::StreamExt;
    let seq = sessions.view(id).await.expect("view").seq;
    let mut stream = sessions.subscribe(id, 0).await.expect("subscribe");
    let mut out = Vec::new();
    while let Some(item) = stream.next().await {
        if let SessionItem::Event(rec) = item.expect("event") {
            out.push(rec.event.clone());
            if rec.seq == seq {
                break;
            }
        }
    }
    out
}

fn kinds(events: &[SessionEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let v = serde_json::to_value(e).unwrap();
            let t = v["type"].as_str().unwrap().to_owned();
            match e {
                SessionEvent::ToolCalled { call, .. } => format!("{t}:{}", call.name),
                SessionEvent::ToolResult { call_id, ok, .. } => format!("{t}:{call_id}:{ok}"),
                _ => t,
            }
        })
        .filter(|t| t != "model_chunk")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_call_runs_after_its_decision_holding_no_lease_or_turn_slot_meanwhile() {
    let d = desk(Duration::from_secs(600)).await;
    let agents = d.troupe.agents().clone();
    let sessions = agents.sessions().clone();
    let id = sessions.create(DESK.name(), None).await.unwrap();
    let posted = sessions.post(&id, "please refund order 7").await.unwrap();
    let view = until_waiting(&sessions, &id, "call-1-refund").await;
    let waiting = view.approval("call-1-refund").unwrap();
    assert_eq!(waiting.tool, "refund");
    assert_eq!(waiting.arguments, r#"{"order":7}"#);
    assert!(waiting.deadline_ms > troupe::journal::now_ms() + 590_000);

    // The call of the same round that needs no approval ran and was
    // journaled; the gated one did not run.
    assert_eq!(d.lookups.load(Ordering::SeqCst), 1);
    assert_eq!(d.refunds.load(Ordering::SeqCst), 0);
    assert_eq!(
        kinds(&events(&sessions, &id).await),
        [
            "opened",
            "user_turn",
            "turn_started",
            "tool_called:lookup",
            "tool_called:refund",
            "approval_requested",
            "tool_result:call-1-lookup:true",
        ]
    );
    // No lease is held while it waits, and the desk's only turn slot is
    // free: another session's turn is answered meanwhile.
    let gpu = d.troupe.gpu().expect("gpus").clone();
    assert!(gpu.live_leases().is_empty(), "{:?}", gpu.live_leases());
    let other = sessions.create(DESK.name(), None).await.unwrap();
    let p = sessions.post(&other, "hello there").await.unwrap();
    let answered = agents.wait_turn_end(&other, p.turn).await.unwrap();
    assert_eq!(answered.text, "hello");

    // The first decision stands; it is journaled before it is answered.
    let decided = sessions
        .decide(&id, "call-1-refund", Decision::approve().by("alice"))
        .await
        .unwrap();
    assert!(decided.approved && !decided.timed_out);
    assert_eq!(decided.by.as_deref(), Some("alice"));
    let second = sessions
        .decide(&id, "call-1-refund", Decision::reject("changed my mind"))
        .await;
    assert!(
        matches!(
            second,
            Err(AgentError::AlreadyDecided {
                approved: true,
                timed_out: false,
                ..
            }) | Err(AgentError::UnknownApproval { .. })
        ),
        "{second:?}"
    );
    let outcome = agents.wait_turn_end(&id, posted.turn).await.unwrap();
    assert!(
        outcome.text.contains(r#""tool":"refund""#),
        "{}",
        outcome.text
    );
    assert_eq!(d.refunds.load(Ordering::SeqCst), 1);
    let all = kinds(&events(&sessions, &id).await);
    assert_eq!(
        all[6..],
        [
            "tool_result:call-1-lookup:true",
            "approval_decided",
            "tool_started",
            "tool_result:call-1-refund:true",
            "turn_completed",
        ]
    );
    // The turn has ended: nothing waits any more.
    let late = sessions
        .decide(&id, "call-1-refund", Decision::approve())
        .await;
    assert!(
        matches!(late, Err(AgentError::UnknownApproval { .. })),
        "{late:?}"
    );
    d.troupe.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_call_does_not_run_and_the_model_is_told_who_and_why() {
    let d = desk(Duration::from_secs(600)).await;
    let agents = d.troupe.agents().clone();
    let sessions = agents.sessions().clone();
    let id = sessions.create(DESK.name(), None).await.unwrap();
    let posted = sessions.post(&id, "refund order 7").await.unwrap();
    until_waiting(&sessions, &id, "call-1-refund").await;
    let decided = sessions
        .decide(
            &id,
            "call-1-refund",
            Decision::reject("over the 100 EUR limit").by("bob"),
        )
        .await
        .unwrap();
    assert!(!decided.approved);
    let outcome = agents.wait_turn_end(&id, posted.turn).await.unwrap();
    assert_eq!(
        d.refunds.load(Ordering::SeqCst),
        0,
        "a rejected call never runs"
    );
    let told = "error: not run: the call was rejected by bob: over the 100 EUR limit";
    assert!(outcome.text.contains(told), "{}", outcome.text);
    // What the model was sent after the round: the rejection as the call's result.
    let requests = d.model.requests.lock().unwrap().clone();
    let last = requests.last().unwrap();
    let tool_msg = last
        .messages
        .iter()
        .find(|m| m.tool_call_id.as_deref() == Some("call-1-refund"))
        .expect("the refund call's result");
    assert_eq!(tool_msg.content, told);
    d.troupe.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_rejects_a_call_nobody_decided_and_the_model_is_told() {
    let d = desk(Duration::from_millis(300)).await;
    let agents = d.troupe.agents().clone();
    let sessions = agents.sessions().clone();
    let id = sessions.create(DESK.name(), None).await.unwrap();
    let posted = sessions.post(&id, "wipe order 7").await.unwrap();
    let outcome = agents.wait_turn_end(&id, posted.turn).await.unwrap();
    assert_eq!(d.wipes.load(Ordering::SeqCst), 0);
    assert!(
        outcome.text.contains("none came before its deadline"),
        "{}",
        outcome.text
    );
    let decided: Vec<SessionEvent> = events(&sessions, &id)
        .await
        .into_iter()
        .filter(|e| matches!(e, SessionEvent::ApprovalDecided { .. }))
        .collect();
    assert!(
        matches!(
            decided[..],
            [SessionEvent::ApprovalDecided {
                approved: false,
                timed_out: true,
                ..
            }]
        ),
        "{decided:?}"
    );
    d.troupe.shutdown().await.unwrap();
}

/// The session's own rules, with no agent answering: the journal is
/// written through `Sessions` as a turn would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_are_refused_once_decided_after_the_deadline_and_for_unknown_calls() {
    let d = desk(Duration::from_secs(600)).await;
    let sessions = d.troupe.agents().sessions().clone();
    let id = sessions.create(DESK.name(), None).await.unwrap();
    sessions
        .post_with(&id, "hold on", Vec::new(), Dispatch::Later)
        .await
        .unwrap();
    let turn: TurnRef = sessions.begin(&id, "scripted").await.unwrap();
    let now = troupe::journal::now_ms();
    let call = |id: &str| ToolCall {
        id: id.into(),
        name: "refund".into(),
        arguments: "{}".into(),
    };
    sessions
        .append(
            &id,
            turn,
            vec![
                SessionEvent::ToolCalled {
                    turn: 1,
                    call: call("past"),
                },
                SessionEvent::ToolCalled {
                    turn: 1,
                    call: call("open"),
                },
                SessionEvent::ApprovalRequested {
                    turn: 1,
                    call_id: "past".into(),
                    tool: "refund".into(),
                    deadline_ms: now - 1,
                },
                SessionEvent::ApprovalRequested {
                    turn: 1,
                    call_id: "open".into(),
                    tool: "refund".into(),
                    deadline_ms: now + 600_000,
                },
            ],
        )
        .await
        .unwrap();
    // After its deadline: the deadline's rejection is journaled instead.
    let late = sessions.decide(&id, "past", Decision::approve()).await;
    assert!(
        matches!(
            late,
            Err(AgentError::AlreadyDecided {
                approved: false,
                timed_out: true,
                ..
            })
        ),
        "{late:?}"
    );
    let view = sessions.view(&id).await.unwrap();
    let d_past = view.approval("past").unwrap().decision.clone().unwrap();
    assert!(!d_past.approved && d_past.timed_out);
    // Unknown call ids and oversized reasons are typed errors.
    let unknown = sessions.decide(&id, "nope", Decision::approve()).await;
    assert!(
        matches!(unknown, Err(AgentError::UnknownApproval { .. })),
        "{unknown:?}"
    );
    let big = sessions
        .decide(&id, "open", Decision::reject("x".repeat(4_096)))
        .await;
    assert!(matches!(big, Err(AgentError::TooLarge { .. })), "{big:?}");
    // The first decision stands, whatever comes after.
    sessions
        .decide(&id, "open", Decision::reject("no").by("carol"))
        .await
        .unwrap();
    for again in [Decision::approve(), Decision::reject("twice")] {
        let r = sessions.decide(&id, "open", again).await;
        assert!(
            matches!(
                r,
                Err(AgentError::AlreadyDecided {
                    approved: false,
                    timed_out: false,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    let decided = sessions.view(&id).await.unwrap();
    let open = decided.approval("open").unwrap().decision.clone().unwrap();
    assert_eq!(
        (open.by.as_deref(), open.reason.as_deref()),
        (Some("carol"), Some("no"))
    );
    // Replayed from the journal (a fresh entity), the approvals are the same.
    sessions.passivate_all().await;
    assert_eq!(
        sessions.view(&id).await.unwrap().approvals,
        decided.approvals
    );
    d.troupe.shutdown().await.unwrap();
}

/// A turn interrupted after an approval: an at-most-once call that never
/// started runs on the next attempt, one that started (`tool_started`) is
/// failed as interrupted and never runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_interruption_an_approved_call_runs_unless_it_had_started() {
    for started in [false, true] {
        let d = desk(Duration::from_secs(600)).await;
        let agents = d.troupe.agents().clone();
        let sessions = agents.sessions().clone();
        let id = sessions.create(DESK.name(), None).await.unwrap();
        let posted = sessions
            .post_with(&id, "refund order 7", Vec::new(), Dispatch::Later)
            .await
            .unwrap();
        // What an attempt that died would have left.
        let turn = sessions.begin(&id, "scripted").await.unwrap();
        sessions
            .append(
                &id,
                turn,
                vec![
                    SessionEvent::ToolCalled {
                        turn: 1,
                        call: ToolCall {
                            id: "call-1-refund".into(),
                            name: "refund".into(),
                            arguments: r#"{"order":7}"#.into(),
                        },
                    },
                    SessionEvent::ApprovalRequested {
                        turn: 1,
                        call_id: "call-1-refund".into(),
                        tool: "refund".into(),
                        deadline_ms: troupe::journal::now_ms() + 600_000,
                    },
                ],
            )
            .await
            .unwrap();
        sessions
            .decide(&id, "call-1-refund", Decision::approve())
            .await
            .unwrap();
        if started {
            let started = SessionEvent::ToolStarted {
                turn: 1,
                call_id: "call-1-refund".into(),
            };
            sessions.append(&id, turn, vec![started]).await.unwrap();
        }
        let outcome = agents.answer(&id, posted.turn).await.unwrap();
        assert_eq!(outcome.turn.attempt, 2);
        let runs = d.refunds.load(Ordering::SeqCst);
        if started {
            assert_eq!(runs, 0, "a call that may have run is not run again");
            assert!(
                outcome.text.contains("interrupted, not retried"),
                "{}",
                outcome.text
            );
        } else {
            assert_eq!(runs, 1, "the approval applies to the new attempt");
            assert!(
                outcome.text.contains(r#""tool":"refund""#),
                "{}",
                outcome.text
            );
        }
        d.troupe.shutdown().await.unwrap();
    }
}

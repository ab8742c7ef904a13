//! Tool approvals: a refund desk whose `issue_refund` tool runs only once
//! a person approves the call. The turn waits (journaled, with an absolute
//! deadline, holding no GPU lease), a supervisor approves one refund and
//! rejects another with a reason, and the model answers each customer
//! knowing what was decided. The book's chapter "Tool approvals" walks
//! through it.
//!
//! Run with `cargo run --example approvals`. `--data-dir DIR` chooses
//! where the journal goes; `--quick` is accepted (it is always quick).

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use troupe::prelude::*;

struct RefundDesk;

const DESK: AgentKey<RefundDesk> = AgentKey::new("refunds");

impl Agent for RefundDesk {
    type State = ();
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Refund {
    /// The order to refund.
    order: String,
    /// How much, in euros.
    amount: u32,
}

// ANCHOR: tool
/// Sends money back: it must not run twice, and a person approves each
/// call within 15 minutes or it is rejected.
fn issue_refund() -> Tool {
    Tool::new("issue_refund", "Refunds an order", |r: Refund| async move {
        Ok::<_, String>(json!({ "order": r.order, "refunded_eur": r.amount }))
    })
    .at_most_once()
    .needs_approval(Duration::from_secs(15 * 60))
}
// ANCHOR_END: tool

// ANCHOR: supervisor
/// What a supervisor's screen does: follows the session, and decides each
/// call that waits (here, by its amount).
async fn supervise(sessions: Sessions, id: String) -> Result<(), AgentError> {
    let mut events = sessions.subscribe(&id, 0).await?;
    while let Some(item) = events.next().await {
        let SessionItem::Event(record) = item? else {
            continue;
        };
        match &record.event {
            SessionEvent::ApprovalRequested { call_id, tool, .. } => {
                let view = sessions.view(&id).await?;
                let arguments = &view.approval(call_id).expect("it waits").arguments;
                println!("approval: {tool} {arguments} waits for a decision");
                let amount: serde_json::Value = serde_json::from_str(arguments).unwrap_or_default();
                let decision = if amount["amount"].as_u64().unwrap_or(0) <= 100 {
                    Decision::approve().by("dana")
                } else {
                    Decision::reject("refunds over 100 EUR go through billing").by("dana")
                };
                // Journaled before it returns; a second decision is refused.
                let decided = sessions.decide(&id, call_id, decision).await?;
                println!("decided:  approved = {}", decided.approved);
            }
            e if e.ends_turn() => return Ok(()),
            _ => {}
        }
    }
    Ok(())
}
// ANCHOR_END: supervisor

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let temp = tempfile::tempdir()?;
    let data_dir = match args.iter().position(|a| a == "--data-dir") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--data-dir needs a directory")?),
        None => temp.path().to_owned(),
    };
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }
    // The local model calls the tool when a customer asks for a refund.
    let model = LocalBackend::default()
        .call_tool_when(
            "duplicate",
            "issue_refund",
            json!({"order": "A-1042", "amount": 40}),
        )
        .call_tool_when(
            "whole",
            "issue_refund",
            json!({"order": "B-77", "amount": 900}),
        );
    let troupe = Troupe::builder()
        .data_dir(&data_dir)
        .backend(model)
        .agent(
            &DESK,
            RefundDesk,
            AgentOptions::default().tools(Tools::new().with(issue_refund())),
        )
        .build()
        .await?;
    let sessions = troupe.sessions().clone();
    for question in [
        "I was charged a duplicate for order A-1042, can I get a refund?",
        "Please refund the whole of order B-77.",
    ] {
        let id = sessions.create(DESK.name(), None).await?;
        println!("customer: {question}");
        let supervisor = tokio::spawn(supervise(sessions.clone(), id.clone()));
        let posted = sessions.post(&id, question).await?;
        let outcome = troupe.agents().wait_turn_end(&id, posted.turn).await?;
        supervisor.await??;
        println!("agent:    {}\n", outcome.text);
    }
    troupe.shutdown().await?;
    Ok(())
}

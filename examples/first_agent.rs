//! Your first durable agent: one agent with one tool answers a
//! conversation that is journaled event by event, a client follows the
//! reply as it streams, and after a restart the conversation, and what the
//! agent remembers of it, are still there. The book's tutorial, "Your
//! first durable agent in ten minutes", walks through it.
//!
//! Run with `cargo run --example first_agent`. `--quick` streams faster;
//! `--data-dir DIR` chooses where the journal goes (default: a fresh
//! temporary directory).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use troupe::prelude::*;

// ANCHOR: tool
/// The arguments of the `forecast` tool; the model sees their JSON schema.
#[derive(Deserialize, JsonSchema)]
struct Forecast {
    /// The city, in English.
    city: String,
}

fn forecast() -> Tool {
    Tool::new(
        "forecast",
        "Tomorrow's weather in a city",
        |f: Forecast| async move {
            Ok::<_, String>(json!({"city": f.city, "sky": "sunny", "high_c": 24}))
        },
    )
}
// ANCHOR_END: tool

// ANCHOR: agent
/// Answers every session that names it: one instance per session.
struct Concierge;

/// The typed key sessions name it by.
const CONCIERGE: AgentKey<Concierge> = AgentKey::new("concierge");

/// What the concierge remembers of one conversation (journaled).
#[derive(Default, Serialize, Deserialize)]
struct Visit {
    questions: u32,
}

impl Agent for Concierge {
    type State = Visit;

    async fn on_turn(&self, visit: &mut Visit, ctx: &mut Context<Self>) -> Result<(), AgentError> {
        visit.questions += 1;
        // Streams the model's reply into the session, runs the tools it
        // calls, and journals every chunk, call and result.
        ctx.reply().await?;
        Ok(())
    }
}

/// A message of its own: how many questions this conversation had.
struct HowMany;

impl Handles<HowMany> for Concierge {
    type Reply = u32;
    async fn handle(&self, visit: &mut Visit, _: HowMany, _: &mut Context<Self>) -> u32 {
        visit.questions
    }
}
// ANCHOR_END: agent

// ANCHOR: system
/// The system: a journal in `data_dir`, a model, the concierge.
async fn system(data_dir: &Path, between_chunks: Duration) -> troupe::Result<Troupe> {
    let model = LocalBackend::default()
        .latency(between_chunks, between_chunks)
        .call_tool_when("weather", "forecast", json!({"city": "Lisbon"}));
    let options = AgentOptions::default().tools(Tools::new().with(forecast()));
    let troupe = Troupe::builder()
        .data_dir(data_dir)
        .backend(model)
        .agent(&CONCIERGE, Concierge, options)
        .build()
        .await?;
    Ok(troupe)
}
// ANCHOR_END: system

/// The first run: a conversation of two turns. Returns the session's id.
async fn first_run(data_dir: &Path, between_chunks: Duration) -> troupe::Result<String> {
    let troupe = system(data_dir, between_chunks).await?;
    // ANCHOR: session
    let sessions = troupe.sessions();
    let id = sessions.create(CONCIERGE.name(), None).await?;
    let mut events = sessions.subscribe(&id, 0).await?;
    // ANCHOR_END: session

    // ANCHOR: turns
    for question in [
        "What is the weather in Lisbon tomorrow?",
        "Thanks! Do I need a coat?",
    ] {
        println!("you:       {question}");
        // Posting journals the turn and hands it to the concierge.
        let posted = sessions.post(&id, question).await?;
        print!("concierge: ");
        // Follow the session until this turn ends.
        while let Some(item) = events.next().await {
            let SessionItem::Event(record) = item? else {
                continue; // a heartbeat: the session is idle
            };
            match &record.event {
                SessionEvent::ToolCalled { call, .. } => {
                    print!("[calls {} {}] ", call.name, call.arguments);
                }
                SessionEvent::ModelChunk { text, .. } => print!("{text}"),
                SessionEvent::TurnCompleted { turn, .. } if *turn == posted.turn => break,
                SessionEvent::TurnFailed { error, .. } => return Err(error.clone().into()),
                _ => {}
            }
            std::io::stdout().flush()?;
        }
        println!();
    }
    // ANCHOR_END: turns

    // ANCHOR: stop
    troupe.shutdown().await?;
    Ok(id)
    // ANCHOR_END: stop
}

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let temp = tempfile::tempdir()?;
    let data_dir = match args.iter().position(|a| a == "--data-dir") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--data-dir needs a directory")?),
        None => temp.path().to_owned(),
    };
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }
    let between_chunks = Duration::from_millis(if quick { 2 } else { 60 });
    let id = first_run(&data_dir, between_chunks).await?;

    // ANCHOR: restart
    // A new process would do just this: build the same system again.
    let troupe = system(&data_dir, between_chunks).await?;
    let view = troupe.sessions().view(&id).await?;
    let asked = troupe.agent(&CONCIERGE)?.get(&id).ask(HowMany).await?;
    println!(
        "\nafter a restart: {} events, {} turns answered, {asked} questions remembered by the concierge; the model's context:",
        view.seq, view.completed
    );
    for message in &view.messages {
        let role = format!("{:?}", message.role);
        match message.tool_calls.first() {
            Some(call) => println!("  {role:<9} [calls {} {}]", call.name, call.arguments),
            None => println!("  {role:<9} {}", message.content),
        }
    }
    // ANCHOR_END: restart
    troupe.shutdown().await?;
    if view.completed != 2 || asked != 2 {
        return Err(format!("expected 2 answered turns, found {}", view.completed).into());
    }
    Ok(())
}

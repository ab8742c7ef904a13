//! Your first durable agent: one agent with one tool answers a
//! conversation that is journaled event by event, a client follows the
//! reply as it streams, and after a restart the conversation is still
//! there. The book's tutorial, "Your first durable agent in ten minutes",
//! walks through it.
//!
//! Run with `cargo run --example first_agent`. `--quick` streams faster;
//! `--data-dir DIR` chooses where the journal goes (default: a fresh
//! temporary directory).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;
use troupe::prelude::*;

type Error = Box<dyn std::error::Error + Send + Sync>;

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
/// Answers the pending turn of every session it is sent.
struct Concierge;

#[troupe::async_trait]
impl Agent for Concierge {
    type Msg = String; // a session id

    async fn handle(&mut self, ctx: &AgentContext, session: String) -> Result<(), AgentError> {
        // Streams the model's reply into the session, runs the tools it
        // calls, and journals every chunk, call and result.
        ctx.reply(&session).await?;
        Ok(())
    }
}
// ANCHOR_END: agent

/// The first run: starts the system, has a conversation, stops. Returns
/// the session's id.
async fn first_run(data_dir: &Path, between_chunks: Duration) -> Result<String, Error> {
    // ANCHOR: system
    let troupe = Troupe::builder().data_dir(data_dir).build().await?;
    let sessions = Sessions::new(troupe.journal(), SessionConfig::default());
    let model = LocalBackend::default()
        .words(12, 2)
        .latency(between_chunks, between_chunks)
        .call_tool_when("weather", "forecast", json!({"city": "Lisbon"}));
    let system = AgentSystem::new(sessions.clone(), Inference::new().with_backend(model));
    let options = AgentOptions::default().tools(Tools::new().with(forecast()));
    let (concierge, supervisor) = system.spawn("concierge", options, || Concierge).await?;
    // ANCHOR_END: system

    // ANCHOR: session
    let id = sessions.create("concierge", None).await?;
    let mut events = sessions.subscribe(&id, 0).await?;
    // ANCHOR_END: session

    // ANCHOR: turns
    for question in [
        "What is the weather in Lisbon tomorrow?",
        "Thanks! Do I need a coat?",
    ] {
        println!("you:       {question}");
        let posted = sessions.post(&id, question).await?;
        concierge
            .send(id.clone(), Duration::from_secs(5))
            .await
            .map_err(|r| r.error)?;
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
    supervisor.stop(Duration::from_secs(5)).await;
    sessions.passivate_all().await;
    troupe.shutdown().await?;
    Ok(id)
    // ANCHOR_END: stop
}

#[tokio::main]
async fn main() -> Result<(), Error> {
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
    // A new process would do just this: open the same directory.
    let troupe = Troupe::builder().data_dir(&data_dir).build().await?;
    let sessions = Sessions::new(troupe.journal(), SessionConfig::default());
    let view = sessions.view(&id).await?;
    println!(
        "\nafter a restart: {} events, {} turns answered; the model's context:",
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
    sessions.passivate_all().await;
    troupe.shutdown().await?;
    if view.completed != 2 {
        return Err(format!("expected 2 answered turns, found {}", view.completed).into());
    }
    Ok(())
}

//! Tools from an MCP server: the reference server
//! `@modelcontextprotocol/server-everything`, started as a child process
//! and spoken to over stdio, gives an agent two of its tools; the agent
//! answers a conversation with them, every call journaled; the server is
//! killed under the running agent and comes back by itself.
//!
//! Run with `cargo run --release --example mcp_tools` once the reference
//! server is installed (`npm ci --prefix tests/mcp`; `make test` does it).
//! `MCP_SERVER="program arg..."` runs another stdio server instead;
//! `--quick` streams faster; `--data-dir DIR` chooses where the journal goes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use troupe::agent::Role;
use troupe::mcp::{McpServer, McpServerConfig, McpStatus};
use troupe::prelude::*;

/// Answers with the model and the tools it is allowed.
struct Clerk;

const CLERK: AgentKey<Clerk> = AgentKey::new("clerk");

impl Agent for Clerk {
    type State = ();

    async fn on_turn(&self, _: &mut (), ctx: &mut Context<Self>) -> Result<(), AgentError> {
        ctx.reply().await?;
        Ok(())
    }
}

// ANCHOR: server
/// The reference server over stdio, supervised: restarted with backoff.
fn everything() -> troupe::Result<McpServerConfig> {
    if let Ok(command) = std::env::var("MCP_SERVER") {
        let mut words = command.split_whitespace();
        let program = words.next().ok_or("MCP_SERVER is empty")?;
        return Ok(McpServerConfig::stdio("tools", program, words));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/mcp/node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    if !script.exists() {
        return Err(format!(
            "{} is missing: run `npm ci --prefix tests/mcp` (make test does)",
            script.display()
        )
        .into());
    }
    let script = script.to_string_lossy().into_owned();
    Ok(
        McpServerConfig::stdio("everything", "node", [script, "stdio".to_owned()])
            .call_timeout(Duration::from_secs(10)),
    )
}
// ANCHOR_END: server

// ANCHOR: system
/// The system: the clerk may call `get-sum` and `echo`, nothing else.
async fn system(data_dir: &Path, server: &McpServer, pace: Duration) -> troupe::Result<Troupe> {
    let model = LocalBackend::default()
        .latency(pace, pace)
        .call_tool_when("add", "get-sum", json!({"a": 2, "b": 40}))
        .call_tool_when("repeat", "echo", json!({"message": "all received"}));
    let tools = Tools::new().with_source(server.allow(["get-sum", "echo"]));
    let troupe = Troupe::builder()
        .data_dir(data_dir)
        .backend(model)
        .agent(&CLERK, Clerk, AgentOptions::default().tools(tools))
        .build()
        .await?;
    Ok(troupe)
}
// ANCHOR_END: system

/// One turn; prints the calls and results it journaled.
async fn ask(troupe: &Troupe, id: &str, question: &str) -> troupe::Result<u32> {
    println!("you:   {question}");
    let posted = troupe.sessions().post(id, question).await?;
    let outcome = troupe.agents().wait_turn_end(id, posted.turn).await?;
    let view = troupe.sessions().view(id).await?;
    for m in view
        .messages
        .iter()
        .rev()
        .take_while(|m| m.role != Role::User)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        match (m.role, m.tool_calls.first()) {
            (_, Some(call)) => println!("clerk: [calls {} {}]", call.name, call.arguments),
            (Role::Tool, _) => println!("tool:  {}", m.content),
            _ => {}
        }
    }
    println!("clerk: {}", outcome.text.trim());
    Ok(outcome.tool_calls)
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
    let pace = Duration::from_millis(if quick { 2 } else { 40 });

    // ANCHOR: start
    let server = McpServer::start(everything()?)?;
    server.wait_up(Duration::from_secs(60)).await?;
    println!("{} is up: {:?}", server.name(), server.status());
    println!(
        "offered to the clerk: {:?}",
        server
            .allow(["get-sum", "echo"])
            .list()
            .iter()
            .map(|t| t.spec().name.clone())
            .collect::<Vec<_>>()
    );
    // ANCHOR_END: start

    let troupe = system(&data_dir, &server, pace).await?;
    let id = troupe.sessions().create(CLERK.name(), None).await?;
    let mut calls = ask(&troupe, &id, "Can you add these up for me?").await?;

    // ANCHOR: kill
    // The child dies under the running agent: its tools are withdrawn,
    // and it is started again after a short delay.
    if let Some(pid) = server.pid() {
        std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()?;
        let mut status = server.watch();
        while matches!(*status.borrow_and_update(), McpStatus::Up { .. }) {
            status
                .changed()
                .await
                .map_err(|_| "the MCP server stopped")?;
        }
        println!("killed {pid}: {:?}", server.status());
        server.wait_up(Duration::from_secs(60)).await?;
        println!(
            "back as {:?}, {} starts",
            server.pid(),
            server.stats().starts
        );
    }
    // ANCHOR_END: kill
    calls += ask(&troupe, &id, "Please repeat that back to me.").await?;
    troupe.shutdown().await?;
    server.shutdown().await;
    if calls != 2 {
        return Err(format!("expected 2 tool calls, the clerk made {calls}").into());
    }
    Ok(())
}

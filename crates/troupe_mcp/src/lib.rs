//! Tools of Model Context Protocol servers, as the tools of Troupe agents.
//!
//! Use this crate when an agent should call tools that live outside the
//! process: a server started as a child process and spoken to over stdio
//! (most MCP servers published on npm and PyPI), or one reached over
//! Streamable HTTP. Tools written in Rust inside the process stay plain
//! [`troupe_agent::Tool`]s; both kinds sit side by side in an agent's
//! [`troupe_agent::Tools`].
//!
//! ```no_run
//! use troupe_agent::{AgentOptions, Tools};
//! use troupe_mcp::{McpServer, McpServerConfig};
//!
//! # async fn run() -> Result<(), troupe_mcp::McpError> {
//! // A child process, supervised: restarted with backoff when it dies.
//! let files = McpServer::start(McpServerConfig::stdio(
//!     "files",
//!     "npx",
//!     ["-y", "@modelcontextprotocol/server-filesystem", "/srv/docs"],
//! ))?;
//! // A server over Streamable HTTP, with a token of its own.
//! let search = McpServer::start(
//!     McpServerConfig::http("search", "https://mcp.example.com/mcp").bearer("s3cret"),
//! )?;
//! // Each agent gets the tools it is allowed, and nothing else.
//! let options = AgentOptions::default().tools(
//!     Tools::new()
//!         .with_source(files.allow(["read_text_file", "list_directory"]))
//!         .with_source(search.tools()),
//! );
//! # let _ = options;
//! # Ok(())
//! # }
//! ```
//!
//! ## What an agent sees
//!
//! An [`McpServer`] keeps one connection to its server and the list of the
//! tools it offers. The list is read when the connection comes up and read
//! again each time the server announces a change
//! (`notifications/tools/list_changed`); each request to the model offers
//! what the list holds at that moment. While the server is down, none of
//! its tools are offered, and a call the model made just before gets an
//! error saying the server is down (the model is told, the turn goes on).
//!
//! A call is journaled like any tool's (`tool_called` before it runs,
//! `tool_result` when it returns, errors included). A tool the server
//! marks read-only or idempotent (`readOnlyHint`, `idempotentHint`) is run
//! again by a new attempt of a turn interrupted between the two; any other
//! is failed instead ("interrupted, not retried"), as
//! [`troupe_agent::Tool::at_most_once`] does. The call's idempotency key
//! (`session/turn/round/index`) goes to the server in the request's
//! `_meta` as `io.troupe/idempotency-key`.
//!
//! ## Bounds
//!
//! Every call has a time-out ([`McpServerConfig::call_timeout`], 30 s; the
//! request is cancelled on the server when it passes); a result is at most
//! [`McpServerConfig::max_result`] bytes of text (256 KiB); one message
//! from the server at most [`McpServerConfig::max_message`] bytes over
//! HTTP (4 MiB; over stdio rmcp's own line limit of 16 MiB applies); a
//! server lists at most [`McpServerConfig::max_tools`] tools (256; the
//! rest are left out and counted). Starting, the handshake and the first
//! listing together have [`McpServerConfig::connect_timeout`] (20 s).
//!
//! ## Supervision
//!
//! A connection that ends (the child exits or is killed, the HTTP server
//! stops answering, a call finds the connection broken) is started again
//! after a delay that doubles from [`Backoff::initial`] (200 ms) up to
//! [`Backoff::max`] (30 s), with a little jitter; the delay falls back to
//! the initial one once a connection stayed up for [`Backoff::reset_after`]
//! (10 s). An idle connection is checked with a `ping` every
//! [`McpServerConfig::health_interval`] (15 s), so a server that stopped
//! answering is noticed without waiting for a call.
//! [`McpServerConfig::max_failures`] gives up after that many failed starts
//! in a row (never, by default). [`McpServer::status`] says
//! where it stands; `troupe_mcp_up`, `troupe_mcp_restarts_total` and
//! `troupe_mcp_calls_total` are exported as metrics, labelled by server.
//!
//! ## Protocol revisions
//!
//! The client is rmcp's, with the session lifecycle (an `initialize`
//! handshake, then requests and notifications on that session): it offers
//! MCP revision 2025-11-25 and takes 2025-06-18, 2025-03-26 or 2024-11-05
//! when the server answers with one of those. Revision 2026-07-28, which
//! drops the session (`server/discover`, list changes over
//! `subscriptions/listen`), is not used yet; servers of that revision keep
//! answering the handshake of the earlier ones. Tools that need
//! task-augmented calls (`execution.taskSupport: "required"`) are offered,
//! and their calls fail with the server's error: calls are plain
//! `tools/call` requests.

mod client;
mod config;
mod convert;
mod error;

pub use client::{McpServer, McpStats, McpStatus, McpTools};
pub use config::{Backoff, McpServerConfig, McpTransport};
pub use error::McpError;

/// The `_meta` key that carries a call's idempotency key to the server.
pub const IDEMPOTENCY_META_KEY: &str = "io.troupe/idempotency-key";

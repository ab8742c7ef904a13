//! # Troupe
//!
//! A Rust actor framework for AI agent systems: every agent, session and
//! GPU is a supervised actor, mailboxes are the message queue, and whatever
//! must survive a crash is journaled before anyone is told it happened.
//!
//! This facade re-exports the crates a user writes against:
//!
//! | module | crate | what it is for |
//! |---|---|---|
//! | [`Troupe`] | `troupe_runtime` | the system: one builder for the journal, GPUs, models, agents, sessions and sagas; one root supervisor; an orderly shutdown |
//! | [`agent`] | `troupe_agent` | agents (one instance per session, typed messages, durable state), durable sessions, model backends, tools, topics |
//! | [`saga`] | `troupe_saga` | DAG workflows with retries, compensation, signals |
//! | [`gpu`] | `troupe_gpu` | GPU probes, leases, deadline-aware admission |
//! | [`gateway`] | `troupe_gateway` | the HTTP API as a mountable router: 202 submission, resumable SSE, tenants, metrics |
//! | [`actor`] | `troupe_actor` | bounded mailboxes, supervision, durable entities, durable timers |
//! | [`journal`] | `troupe_journal` | the event journal: append, replay, snapshots, tags; storage tiers and blobs |
//! | [`postgres`] | `troupe_postgres` | the journal in PostgreSQL, shared by several processes |
//! | `cluster` (feature `cluster`) | (here) | nodes on `ractor_cluster`: agents by name across nodes, entities placed by consistent hashing, GPU admission across nodes |
//! | `testing` (feature `test-util`) | (here) | a kit for testing your own agents: deterministic and paced models, a fault-injecting journal, crash tests in a child process |
//!
//! ## Which to pick
//!
//! | you write | when |
//! |---|---|
//! | an [`Agent`](agent::Agent) | anything that talks to models, answers sessions, or takes messages of its own: one instance per key, typed messages and replies, state journaled for you |
//! | an [`EventSourced`](actor::EventSourced) entity | domain state whose every change is an event you define (an account, an order), replayed after a crash |
//!
//! A saga step is a function registered by name ([`TroupeBuilder::step`]),
//! not an actor.
//!
//! Most programs start with `use troupe::prelude::*;` and return
//! [`troupe::Result`](Result).

#[cfg(feature = "cluster")]
pub mod cluster;
#[cfg(feature = "test-util")]
pub mod testing;

use std::time::Duration;

/// For implementing [`ModelBackend`](agent::ModelBackend) (an async trait).
pub use async_trait::async_trait;
pub use ractor;
pub use troupe_actor as actor;
pub use troupe_agent as agent;
pub use troupe_gateway as gateway;
pub use troupe_gpu as gpu;
pub use troupe_journal as journal;
pub use troupe_mcp as mcp;
pub use troupe_postgres as postgres;
pub use troupe_runtime::{Readiness, RuntimeError, Troupe, TroupeBuilder};
pub use troupe_saga as saga;

/// Any Troupe error, for applications: each variant keeps its crate's own
/// error, so [`Error::is_transient`] and [`Error::retry_after`] answer
/// whatever the layer it came from.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The system could not be built or stopped.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Agents, sessions, models, tools.
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
    /// Workflows.
    #[error(transparent)]
    Saga(#[from] saga::SagaError),
    /// GPUs and leases.
    #[error(transparent)]
    Gpu(#[from] gpu::GpuError),
    /// Actors, mailboxes, entities, timers.
    #[error(transparent)]
    Actor(#[from] actor::ActorError),
    /// The journal.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// The HTTP gateway.
    #[error(transparent)]
    Gateway(#[from] gateway::GatewayError),
    /// MCP servers and their tools.
    #[error(transparent)]
    Mcp(#[from] mcp::McpError),
    /// Files and sockets of the program itself.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// JSON the program reads or writes.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Anything else the program reports.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Runtime(e) => e.is_transient(),
            Error::Agent(e) => e.is_transient(),
            Error::Saga(e) => e.is_transient(),
            Error::Gpu(e) => e.is_transient(),
            Error::Actor(e) => e.is_transient(),
            Error::Journal(e) => e.is_transient(),
            Error::Gateway(e) => e.is_transient(),
            Error::Mcp(e) => e.is_transient(),
            Error::Io(_) | Error::Json(_) | Error::Other(_) => false,
        }
    }

    /// The retry hint, for the errors that carry one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Runtime(e) => e.retry_after(),
            Error::Agent(e) => e.retry_after(),
            Error::Saga(e) => e.retry_after(),
            Error::Gpu(e) => e.retry_after(),
            Error::Actor(e) => e.retry_after(),
            Error::Gateway(e) => e.retry_after(),
            _ => None,
        }
    }
}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error::Other(s)
    }
}

/// A task of the program that panicked or was cancelled.
impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Other(format!("a task ended abnormally: {e}"))
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Self {
        Error::Other(s.to_owned())
    }
}

/// `Result` with Troupe's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The names most programs need.
pub mod prelude {
    pub use crate::{Error, Result, Troupe, TroupeBuilder};
    pub use troupe_actor::{
        ActorError, ActorHandle, Backoff, ChildSpec, DurableConfig, Effect, Entities, EntityConfig,
        EventSourced, Restart, RpcReplyPort, Strategy, SupervisorHandle, SupervisorSpec,
    };
    pub use troupe_agent::{
        Agent, AgentError, AgentKey, AgentKind, AgentOptions, AgentRef, AgentSystem, Context,
        Decision, Handles, Inference, LeaseSpec, LocalBackend, OpenAiBackend, OpenAiConfig,
        OutputSchema, SessionConfig, SessionEvent, SessionItem, Sessions, TimerFired, Tool,
        ToolCallInfo, ToolSource, Tools, TurnOutcome, Typed,
    };
    pub use troupe_journal::{
        AppendOutcome, BlobRef, BlobStore, Durability, InMemoryJournal, Journal, JournalConfig,
        JournalError, NewEvent, NewSnapshot, PersistedEvent, PersistenceId, Replay, RocksConfig,
        RocksJournal, Schema, Snapshot, Tag, TaggedEvent, TierConfig, TieredJournal, Upcasters,
    };
    pub use troupe_saga::{SagaDefinition, StepContext, StepDef, StepError};
}

//! # troupe_agent: agents, durable sessions, models, tools, topics
//!
//! This is the API Troupe users write against.
//!
//! | you want | use |
//! |---|---|
//! | an agent that answers sessions, one instance per session, with typed messages of its own and durable state | [`Agent`] (and [`Handles`] per message type), registered under an [`AgentKey`], working through a [`Context`] |
//! | to reach an instance | [`AgentSystem::agent`] then [`AgentKind::get`]: an [`AgentRef`] with `tell`, `send`, `ask` |
//! | a conversation that survives crashes, and clients that resume from the last event they saw | [`Sessions`] ([`Sessions::post`] dispatches the turn; [`Sessions::subscribe`] follows it) |
//! | one full turn: stream the model's reply into the session, run its tool calls, each at most once per journaled result | [`Context::reply`] |
//! | a typed answer (a Rust type the model's JSON must fit, repaired a bounded number of times) | [`Context::reply_as`] with [`OutputSchema`] |
//! | a message for later that survives restarts | [`Context::schedule_at`] |
//! | a tool that runs only once a person approves the call | [`Tool::needs_approval`], decided with [`Sessions::decide`] (see [tool approvals](session#tool-approvals)) |
//! | a model server | [`OpenAiBackend`] (any OpenAI-compatible server), [`LocalBackend`] (deterministic, for examples and tests), or your own [`ModelBackend`] |
//! | inference that never piles onto saturated GPUs | [`Inference`] with a GPU supervisor: every call holds a lease |
//! | typed tools with a JSON schema | [`Tool`], [`Tools`] |
//! | fan-out with bounded publishing | [`Topics`] |
//!
//! Everything is bounded: turns answered at once per kind
//! ([`AgentOptions::max_concurrent_turns`]), instances in memory
//! ([`AgentOptions::max_instances`]), mailboxes ([`AgentOptions::mailbox`]), live
//! buffers and message sizes ([`SessionConfig`]), chunks per append and
//! tool rounds ([`AgentOptions`]), tool argument and result sizes
//! ([`tool::MAX_TOOL_ARGUMENTS`], [`tool::MAX_TOOL_RESULT`]), response
//! sizes and retries ([`OpenAiConfig`]), subscribers per topic
//! ([`topic::MAX_SUBSCRIBERS`]).

#![warn(missing_docs)]

pub mod agent;
mod error;
pub mod inference;
pub mod local;
pub mod model;
pub mod openai;
pub mod session;
pub mod structured;
mod system;
pub mod tool;
pub mod topic;
mod turn;

/// The JSON-schema crate tool argument types derive `JsonSchema` with.
pub use schemars;

pub use agent::{
    Agent, AgentKey, AgentKind, AgentMsg, AgentOptions, AgentRef, Context, Handles, TimerFired,
    TurnOutcome,
};
pub use error::AgentError;
pub use inference::{Holder, Inference, InferenceStream, LeaseSpec};
pub use local::LocalBackend;
pub use model::{
    ChatMessage, ChatRequest, Chunk, ChunkStream, ModelBackend, ResponseFormat, Role, ToolCall,
    ToolSpec, Usage,
};
pub use openai::{OpenAiBackend, OpenAiConfig};
pub use session::{
    Approval, Decided, Decision, Dispatch, KeyedTurn, MAX_ATTACHMENTS, MAX_KEYED_TURNS, OpenCall,
    PendingTurn, Posted, SessionConfig, SessionEvent, SessionItem, SessionRecord, SessionStream,
    SessionView, Sessions, TurnRef,
};
pub use structured::{Mismatch, OutputSchema, Typed};
pub use system::{AgentSystem, LeaseHoldLimit, SystemConfig};
pub use tool::{Tool, ToolCallInfo, ToolSource, Tools};
pub use topic::{Overflow, Published, Topics};
pub use turn::INTERRUPTED;

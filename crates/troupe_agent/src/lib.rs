//! # troupe_agent: agents, durable sessions, models, tools, topics
//!
//! This is the API Troupe users write against.
//!
//! | you want | use |
//! |---|---|
//! | an actor with typed messages that calls models and tools, sends to other agents by name, publishes to topics | [`Agent`], registered with [`AgentSystem::agent`], working through [`AgentContext`] |
//! | a conversation that survives crashes, and clients that resume from the last event they saw | [`Sessions`] ([`Sessions::subscribe`]) |
//! | one full turn: stream the model's reply into the session, run its tool calls | [`AgentContext::reply`] |
//! | a model server | [`OpenAiBackend`] (any OpenAI-compatible server), [`LocalBackend`] (deterministic, for examples and tests), or your own [`ModelBackend`] |
//! | inference that never piles onto saturated GPUs | [`Inference`] with a GPU supervisor: every call holds a lease |
//! | typed tools with a JSON schema | [`Tool`], [`Tools`] |
//! | fan-out with bounded publishing | [`Topics`] |
//!
//! Everything is bounded: mailboxes ([`AgentOptions::mailbox`]), live
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
pub mod tool;
pub mod topic;

/// The JSON-schema crate tool argument types derive `JsonSchema` with.
pub use schemars;

pub use agent::{Agent, AgentActor, AgentContext, AgentOptions, AgentSystem, TurnOutcome};
pub use error::AgentError;
pub use inference::{Holder, Inference, InferenceStream, LeaseSpec};
pub use local::LocalBackend;
pub use model::{
    ChatMessage, ChatRequest, Chunk, ChunkStream, ModelBackend, Role, ToolCall, ToolSpec, Usage,
};
pub use openai::{OpenAiBackend, OpenAiConfig};
pub use session::{
    MAX_ATTACHMENTS, Posted, SessionConfig, SessionEvent, SessionItem, SessionRecord,
    SessionStream, SessionView, Sessions, TurnRef,
};
pub use tool::{Tool, Tools};
pub use topic::{Overflow, Published, Topics};

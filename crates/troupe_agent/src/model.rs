//! Model backends: the [`ModelBackend`] trait and the types it streams.
//!
//! A backend takes a [`ChatRequest`] (the conversation so far and the tools
//! the model may call) and streams [`Chunk`]s: pieces of text, complete tool
//! calls, then one [`Chunk::Done`]. Two backends ship with Troupe:
//!
//! | backend | for |
//! |---|---|
//! | [`crate::OpenAiBackend`] | any OpenAI-compatible server (OpenAI, vLLM, llama.cpp, TGI...): streaming chat completions, time-outs, retries that honour `Retry-After` |
//! | [`crate::LocalBackend`] | examples, tests and benchmarks: a deterministic reply, streamed with a configurable latency |
//!
//! Backends do not take GPU leases themselves: [`crate::Inference`] does,
//! around whichever backend it runs.

use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::error::AgentError;

/// Who said a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions to the model.
    System,
    /// The user.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
}

/// A tool call the model asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id (answers refer to it).
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Arguments, as JSON text.
    pub arguments: String,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who said it.
    pub role: Role,
    /// Text (empty for an assistant message that only calls tools).
    pub content: String,
    /// Tool calls of an assistant message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a tool message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with text only.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// A tool as the model sees it: name, description, JSON schema of its
/// arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// Tool name.
    pub name: String,
    /// What it does (the model reads this).
    pub description: String,
    /// JSON schema of the arguments object.
    pub parameters: serde_json::Value,
}

/// What to ask a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// Model name, as the backend knows it.
    pub model: String,
    /// The conversation, oldest first.
    pub messages: Vec<ChatMessage>,
    /// Tools the model may call.
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// Most tokens to generate.
    pub max_tokens: Option<u32>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
}

impl ChatRequest {
    /// A request for `model` with these messages and no tools.
    pub fn new(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        Self {
            model: model.into(),
            messages,
            tools: Vec::new(),
            max_tokens: None,
            temperature: None,
        }
    }
}

/// Token counts, when the backend reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
}

/// One piece of a streamed answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Chunk {
    /// More text.
    Text(String),
    /// A complete tool call (backends assemble streamed fragments).
    ToolCall(ToolCall),
    /// The answer is complete.
    Done {
        /// Why the model stopped (`stop`, `length`, `tool_calls`...).
        finish_reason: String,
        /// Token counts, if known.
        usage: Option<Usage>,
    },
}

/// A stream of chunks; ends after `Done` or at the first error.
pub type ChunkStream = BoxStream<'static, Result<Chunk, AgentError>>;

/// A model that streams answers. See the [module docs](self).
#[async_trait::async_trait]
pub trait ModelBackend: Send + Sync + 'static {
    /// The backend's name (in errors and metrics).
    fn name(&self) -> &str;

    /// Starts answering `request`. Errors before the first chunk (refused,
    /// unreachable, rate-limited past the retry budget) are returned here;
    /// errors after it end the stream.
    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, AgentError>;
}

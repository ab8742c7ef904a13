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
    /// Files sent with a user message (images, documents, audio). The
    /// text names each one too, for backends that take text only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
}

/// A file sent with a message: its blob, and its bytes once loaded for a
/// backend that takes this media type as a content part
/// ([`ModelBackend::accepts`]). Only the reference is journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The blob (hash, size, media type).
    pub blob: troupe_journal::BlobRef,
    /// Its bytes, when loaded for the model call.
    #[serde(skip)]
    pub data: Option<std::sync::Arc<[u8]>>,
}

impl Attachment {
    /// An attachment not loaded yet.
    pub fn reference(blob: troupe_journal::BlobRef) -> Self {
        Self { blob, data: None }
    }
}

impl ChatMessage {
    /// A message with text only.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            attachments: Vec::new(),
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
    /// The answer must be JSON that fits this schema (see
    /// [`crate::OutputSchema`]); sent as `response_format` to
    /// OpenAI-compatible servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// The GPU lease's priority (0 lowest), for servers that schedule by a
    /// request field (vLLM's `priority`: see
    /// [`crate::OpenAiConfig::priority_field`]). [`crate::Inference`] sets it
    /// from the lease when it is not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
}

/// A JSON schema the answer must fit (`response_format` of type
/// `json_schema`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseFormat {
    /// Name of the schema (letters, digits, `_` and `-`, at most 64).
    pub name: String,
    /// The JSON schema.
    pub schema: serde_json::Value,
    /// Whether the server is asked to hold to it strictly (OpenAI's
    /// `strict`: every object closed, every property required).
    pub strict: bool,
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
            response_format: None,
            priority: None,
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

impl std::ops::Add for Usage {
    type Output = Usage;

    /// The counts of two model calls together (saturating).
    fn add(self, other: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens.saturating_add(other.prompt_tokens),
            completion_tokens: self
                .completion_tokens
                .saturating_add(other.completion_tokens),
        }
    }
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

    /// Whether attachments of this media type (`image/png`,
    /// `application/pdf`...) are sent to the model as content parts, their
    /// bytes loaded from the blob store. Default: none (text only: the
    /// model reads the line that names the attachment).
    fn accepts(&self, media_type: &str) -> bool {
        let _ = media_type;
        false
    }
}

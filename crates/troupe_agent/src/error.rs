//! The agent crate's error type.

use std::sync::Arc;
use std::time::Duration;

use troupe_actor::ActorError;
use troupe_gpu::GpuError;
use troupe_journal::JournalError;

/// Everything that can go wrong with agents, sessions, models and tools.
///
/// Cloneable so that one failure can be reported to every waiter; each
/// variant says what failed and where.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// The work cannot be served in time (a GPU lease was refused, a model
    /// server answered 429 past the retry budget, a queue is at its bound).
    #[error("overloaded: retry after {retry_after:?} ({reason})")]
    Overloaded {
        /// When a retry has a fair chance.
        retry_after: Duration,
        /// Why it was refused.
        reason: String,
    },
    /// No agent is registered under this name.
    #[error("no agent named `{0}`")]
    UnknownAgent(String),
    /// A topic exists but takes another message type.
    #[error("`{name}` takes messages of another type than `{expected}`")]
    WrongMessageType {
        /// Topic name.
        name: String,
        /// The type the caller used.
        expected: &'static str,
    },
    /// An agent name is registered with another agent type than the key
    /// used to look it up (two keys share a name).
    #[error("agent `{name}` is registered with another type than `{expected}`")]
    WrongAgentType {
        /// Agent name.
        name: String,
        /// The type of the key used.
        expected: &'static str,
    },
    /// Two agents with one name.
    #[error("an agent named `{0}` is already registered")]
    DuplicateAgent(String),
    /// No session with this id (never opened, or another tenant's).
    #[error("no session `{0}`")]
    UnknownSession(String),
    /// The session is closed.
    #[error("session `{0}` is closed")]
    SessionClosed(String),
    /// An idempotency key came back with another message than the one it
    /// posted.
    #[error("session `{session}`: this idempotency key posted turn {turn}, another message")]
    KeyReused {
        /// Session id.
        session: String,
        /// The turn the key posted.
        turn: u32,
    },
    /// The session already has a turn in progress.
    #[error("session `{session}` is busy with turn {turn}; wait for it to finish")]
    Busy {
        /// Session id.
        session: String,
        /// The turn in progress.
        turn: u32,
    },
    /// No tool call of the session's turn in progress waits for this
    /// approval (a wrong call id, or its turn has ended).
    #[error("session `{session}`: no tool call `{call}` waits for approval")]
    UnknownApproval {
        /// Session id.
        session: String,
        /// The call id given.
        call: String,
    },
    /// The call's approval was decided already (by someone, or by its
    /// deadline): the first decision stands.
    #[error("session `{session}`: tool call `{call}` was {} already{}", if *approved { "approved" } else { "rejected" }, if *timed_out { " (its deadline passed)" } else { "" })]
    AlreadyDecided {
        /// Session id.
        session: String,
        /// The call.
        call: String,
        /// The decision that stands.
        approved: bool,
        /// Whether the deadline made it.
        timed_out: bool,
    },
    /// A write for a turn attempt that is no longer the current one (the
    /// turn was restarted or finished by someone else).
    #[error("session `{session}`: turn {turn} attempt {attempt} is stale")]
    StaleTurn {
        /// Session id.
        session: String,
        /// Turn.
        turn: u32,
        /// Attempt presented.
        attempt: u32,
    },
    /// A turn ended as failed (read from the session: the failure was
    /// journaled, perhaps by another process).
    #[error("session `{session}`: turn {turn} failed: {error}")]
    TurnFailed {
        /// Session id.
        session: String,
        /// The turn.
        turn: u32,
        /// What went wrong, as journaled.
        error: String,
        /// The retry hint journaled with it.
        retry_after: Option<Duration>,
    },
    /// The session has no user turn waiting for an answer.
    #[error("session `{0}` has no user turn waiting for a reply")]
    NothingToAnswer(String),
    /// No model backend under this name.
    #[error("no model backend named `{0}`")]
    UnknownModel(String),
    /// The model server answered with an error status.
    #[error("model backend `{backend}` answered HTTP {status}: {message}")]
    Backend {
        /// Backend name.
        backend: String,
        /// HTTP status.
        status: u16,
        /// The server's own error message.
        message: String,
    },
    /// The model server could not be reached or the connection broke.
    #[error("model backend `{backend}`: {message}")]
    Transport {
        /// Backend name.
        backend: String,
        /// What went wrong.
        message: String,
    },
    /// A streamed chunk could not be understood.
    #[error("model backend `{backend}` sent a malformed chunk ({message}): {chunk}")]
    MalformedChunk {
        /// Backend name.
        backend: String,
        /// Parser message.
        message: String,
        /// The chunk (cut to 200 bytes).
        chunk: String,
    },
    /// A typed answer (see [`crate::OutputSchema`]) still did not fit its
    /// schema after the last repair attempt.
    #[error(
        "session `{session}`: the answer to turn {turn} does not fit schema `{schema}` at `{field}` \
         after {attempts} attempt(s): {message}"
    )]
    InvalidAnswer {
        /// Session id.
        session: String,
        /// The turn.
        turn: u32,
        /// The schema's name.
        schema: String,
        /// Path of the field that does not fit (`.` for the whole answer).
        field: String,
        /// What is wrong with it.
        message: String,
        /// Answers the model gave (the first and every repair).
        attempts: u32,
    },
    /// The stream ended before the model said it was done.
    #[error("model backend `{backend}` closed the stream after {chunks} chunks without finishing")]
    StreamClosed {
        /// Backend name.
        backend: String,
        /// Chunks received before the end.
        chunks: u32,
    },
    /// Something took longer than its bound.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        what: String,
        /// The bound.
        after: Duration,
    },
    /// The GPU lease under an inference ended before the inference did.
    #[error("GPU lease {lease} was lost during inference: {reason}")]
    LeaseLost {
        /// Lease id.
        lease: u64,
        /// Why (preempted, expired, revoked).
        reason: String,
    },
    /// No tool under this name on this agent.
    #[error("agent has no tool named `{0}`")]
    UnknownTool(String),
    /// A tool's arguments do not match its schema.
    #[error("tool `{tool}`: bad arguments: {message}")]
    ToolArguments {
        /// Tool name.
        tool: String,
        /// What is wrong (names the field).
        message: String,
    },
    /// A tool handler failed.
    #[error("tool `{tool}` failed: {message}")]
    Tool {
        /// Tool name.
        tool: String,
        /// The handler's message.
        message: String,
    },
    /// A value past an explicit bound (text size, tool rounds, batch size).
    #[error("{what} exceeds its limit of {limit}")]
    TooLarge {
        /// What.
        what: String,
        /// The bound.
        limit: usize,
    },
    /// Input that makes no sense.
    #[error("invalid {what}: {message}")]
    Invalid {
        /// What.
        what: String,
        /// Why.
        message: String,
    },
    /// An actor failed, was full or did not answer.
    #[error(transparent)]
    Actor(#[from] ActorError),
    /// The journal failed (its error is the source).
    #[error("journal: {0}")]
    Journal(#[source] Arc<JournalError>),
    /// The GPU supervisor failed (other than a refusal, which is `Overloaded`).
    #[error("GPU: {0}")]
    Gpu(#[source] GpuError),
    /// An agent's handler panicked; the instance was restarted with the
    /// state it had journaled last.
    #[error("agent `{agent}` panicked handling `{key}`: {message}")]
    Panicked {
        /// Agent name.
        agent: String,
        /// The instance's key (a session id).
        key: String,
        /// The panic's message.
        message: String,
    },
    /// An agent's own failure.
    #[error("agent `{agent}` failed: {message}")]
    Failed {
        /// Agent name.
        agent: String,
        /// What went wrong.
        message: String,
    },
}

impl From<JournalError> for AgentError {
    fn from(e: JournalError) -> Self {
        AgentError::Journal(Arc::new(e))
    }
}

impl From<GpuError> for AgentError {
    fn from(e: GpuError) -> Self {
        match e {
            GpuError::Overloaded {
                retry_after,
                reason,
            } => AgentError::Overloaded {
                retry_after,
                reason: format!("GPU lease refused: {reason}"),
            },
            other => AgentError::Gpu(other),
        }
    }
}

impl AgentError {
    /// The retry hint, for errors that have one (an overload, a full
    /// mailbox or key table).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AgentError::Overloaded { retry_after, .. } => Some(*retry_after),
            AgentError::TurnFailed { retry_after, .. } => *retry_after,
            AgentError::Actor(e) => e.retry_after(),
            _ => None,
        }
    }

    /// Whether retrying the same work later may succeed: overloads, time-
    /// outs, broken connections, a model server's 5xx or 429, and actor and
    /// journal failures that are themselves transient.
    pub fn is_transient(&self) -> bool {
        match self {
            AgentError::Overloaded { .. }
            | AgentError::Transport { .. }
            | AgentError::StreamClosed { .. }
            | AgentError::Timeout { .. }
            | AgentError::LeaseLost { .. }
            | AgentError::Busy { .. } => true,
            AgentError::TurnFailed { retry_after, .. } => retry_after.is_some(),
            AgentError::Backend { status, .. } => *status >= 500 || *status == 429,
            AgentError::Actor(e) => e.is_transient(),
            AgentError::Journal(e) => e.is_transient(),
            AgentError::Gpu(e) => e.is_transient(),
            _ => false,
        }
    }
}

//! Durable sessions: every turn, chunk, tool call and result is an event.
//!
//! A session is an [`EventSourced`] entity (`session/<id>`) run by
//! [`Entities`]: activated by the first message, passivated when idle,
//! recovered from the journal on the next one. Its events
//! ([`SessionEvent`]) are the conversation: user turns, the start of each
//! reply attempt, streamed model chunks, tool calls and their results, and
//! the end of each turn.
//!
//! [`Sessions::subscribe`] gives a client every event after a sequence
//! number: first those in the journal, then live ones as they are
//! appended, with no gap and no duplicate at the seam (live events are
//! published after they are journaled; the subscriber drops what it already
//! read and fills any gap from the journal). A subscriber that falls behind
//! the live buffer reads the journal instead: slow clients never lose
//! events and never slow the session down. Idle subscriptions yield
//! [`SessionItem::Heartbeat`] so the server notices a dead client when it
//! writes one, and frees the subscription by dropping the stream.
//!
//! ## Turns and attempts
//! [`Sessions::post`] journals a user turn (refused while another turn is
//! in progress). [`Sessions::begin`] starts an *attempt* at answering it;
//! every later write names that attempt ([`TurnRef`]), so a writer from an
//! attempt that was superseded (a crash, a restart) is refused with
//! [`AgentError::StaleTurn`] rather than interleaving two replies. A turn
//! interrupted by a crash is answered again by beginning a new attempt:
//! clients see `turn_started` with a higher attempt and discard the partial
//! text of the previous one.
//!
//! ## Tool approvals
//! A tool marked [`Tool::needs_approval`](crate::Tool::needs_approval) (or
//! named in [`Tools::needs_approval`](crate::Tools::needs_approval), for a
//! source's tools) does not run when the model calls it. The turn journals
//! `approval_requested` with an absolute deadline, schedules a durable
//! timer for that deadline, and waits, holding no GPU lease (a lease is
//! held only while the model streams) and no turn slot of its agent
//! ([`AgentOptions::max_concurrent_turns`](crate::AgentOptions)). Calls of
//! the same round that need no approval run and are journaled meanwhile.
//!
//! [`Sessions::decide`] journals the first decision on a call
//! (`approval_decided`) before it answers; a second one is refused with
//! [`AgentError::AlreadyDecided`] (HTTP 409). At the deadline the timer
//! journals a rejection (`timed_out`); a decision arriving later is refused
//! the same way. An approved call runs; a rejected one does not, and the
//! model is told (the call's result is an error saying who rejected it and
//! why). Everything is in the journal, so a turn waiting when the process
//! dies waits again after the restart, for the same deadline, and a
//! decision taken meanwhile applies. [`SessionView::approvals`] lists the
//! calls that wait and those decided; clients following the session see
//! the two events.
//!
//! An approved call of an [`at_most_once`](crate::Tool::at_most_once)
//! tool journals `tool_started` just before it runs: a new attempt after
//! a crash fails such a call (it may have run) and runs one that never
//! started, however long ago it was approved. Approved calls of repeatable
//! tools follow the rule of every interrupted call (run again, with the
//! same key).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use ractor::RpcReplyPort;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use troupe_actor::{DurableConfig, Effect, Entities, EntityConfig, EventSourced};
use troupe_journal::{Journal, PersistenceId, Schema};

use crate::error::AgentError;
use crate::model::{ChatMessage, Role, ToolCall, Usage};

/// The kind part of session persistence ids.
pub const SESSION_KIND: &str = "session";

/// One event of a session (also what clients receive, as JSON with a
/// `type` field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SessionEvent {
    /// The session was created.
    Opened {
        /// Session id.
        id: String,
        /// The agent that answers it.
        agent: String,
        /// The tenant that owns it.
        tenant: Option<String>,
        /// Most messages kept as model context.
        context_limit: u32,
    },
    /// The user said something.
    UserTurn {
        /// Turn number, from 1.
        turn: u32,
        /// What the user said.
        text: String,
        /// Images, audio, documents sent with it, as blob references (the
        /// bytes live in the blob store).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        attachments: Vec<troupe_journal::BlobRef>,
        /// The idempotency key it was posted with, if any: the same
        /// message posted again with this key gets this turn back instead
        /// of a second one (see [`Sessions::post_keyed`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
    },
    /// An attempt at answering a turn started (attempt > 1: the previous
    /// attempt was interrupted; the text it was streaming is void, the tool
    /// calls it made and the results journaled for them are kept).
    TurnStarted {
        /// Turn number.
        turn: u32,
        /// Attempt, from 1.
        attempt: u32,
        /// Model backend that answers.
        model: String,
        /// Whether the tool calls of earlier attempts (and their journaled
        /// results) are kept. Always true for events written by this
        /// version; false in journals of 0.1, whose new attempts started
        /// over from the user's message.
        #[serde(default)]
        keeps_tool_results: bool,
    },
    /// The turn was handed to another agent, which answers it (a router
    /// hands a question to a desk). A turn resumed after a crash goes to
    /// the agent it was last handed to.
    HandedOff {
        /// Turn number.
        turn: u32,
        /// The agent that answers it now.
        agent: String,
    },
    /// A piece of the model's reply.
    ModelChunk {
        /// Turn number.
        turn: u32,
        /// The text.
        text: String,
    },
    /// The model called a tool.
    ToolCalled {
        /// Turn number.
        turn: u32,
        /// The call.
        call: ToolCall,
    },
    /// A tool answered (or failed: `ok` false, `output` is the error).
    ToolResult {
        /// Turn number.
        turn: u32,
        /// The call it answers.
        call_id: String,
        /// Whether the tool succeeded.
        ok: bool,
        /// Result (JSON text) or error message.
        output: String,
    },
    /// A typed answer did not fit its schema (see
    /// [`crate::structured`]): the text streamed since the last tool round
    /// becomes an assistant message, `repair` a user message after it, and
    /// the model is asked again.
    AnswerRejected {
        /// Turn number.
        turn: u32,
        /// Path of the field that does not fit.
        field: String,
        /// What is wrong with it.
        error: String,
        /// What the model is told.
        repair: String,
    },
    /// A tool call waits for a person's approval (see [tool
    /// approvals](self#tool-approvals)): it runs only once
    /// `approval_decided` approves it, and is rejected at `deadline_ms`.
    ApprovalRequested {
        /// Turn number.
        turn: u32,
        /// The call that waits (its `tool_called` comes first).
        call_id: String,
        /// The tool.
        tool: String,
        /// When it is rejected unless decided, in ms since the Unix epoch.
        deadline_ms: u64,
    },
    /// A call's approval was decided: the first decision of each call is
    /// the only one.
    ApprovalDecided {
        /// Turn number.
        turn: u32,
        /// The call.
        call_id: String,
        /// Whether it may run.
        approved: bool,
        /// Who decided (a tenant, an operator), if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
        /// Why, as the model is told on a rejection.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Whether the deadline decided it (a rejection).
        #[serde(default)]
        timed_out: bool,
    },
    /// An approved call of a tool that must not run twice
    /// ([`Tool::at_most_once`](crate::Tool::at_most_once)) is about to run:
    /// a new attempt after a crash knows it may have run.
    ToolStarted {
        /// Turn number.
        turn: u32,
        /// The call.
        call_id: String,
    },
    /// The turn's reply is complete.
    TurnCompleted {
        /// Turn number.
        turn: u32,
        /// Why the model stopped.
        finish_reason: String,
        /// Token counts, if known.
        usage: Option<Usage>,
    },
    /// The turn failed; the user may post again.
    TurnFailed {
        /// Turn number.
        turn: u32,
        /// What went wrong.
        error: String,
        /// Retry hint, when the failure was an overload.
        retry_after_ms: Option<u64>,
    },
    /// The session was closed; it takes no more turns.
    Closed {
        /// Why.
        reason: String,
    },
}

/// Most attachments on one user turn.
pub const MAX_ATTACHMENTS: usize = 16;

/// Keyed turns a session remembers (the latest ones): a retry with an
/// older key posts a new turn.
pub const MAX_KEYED_TURNS: usize = 1_024;

/// A user turn posted with an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedTurn {
    /// The key.
    pub key: String,
    /// Its turn.
    pub turn: u32,
    /// The sequence of its `UserTurn` event.
    pub seq: u64,
    /// SHA-256 (hex) of its text and attachments: a retry must send the
    /// same message.
    pub digest: String,
}

/// The digest [`KeyedTurn::digest`] keeps of a message.
fn message_digest(text: &str, attachments: &[troupe_journal::BlobRef]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((text.len() as u64).to_le_bytes());
    h.update(text.as_bytes());
    for a in attachments {
        h.update(a.hash.0);
        h.update(a.size.to_le_bytes());
        h.update((a.media_type.len() as u64).to_le_bytes());
        h.update(a.media_type.as_bytes());
    }
    hex::encode(h.finalize())
}

impl Schema for SessionEvent {
    const TYPE_NAME: &'static str = "agent.SessionEvent";
}

impl SessionEvent {
    /// The turn the event belongs to (none for `opened` and `closed`).
    pub fn turn(&self) -> Option<u32> {
        match self {
            SessionEvent::UserTurn { turn, .. }
            | SessionEvent::TurnStarted { turn, .. }
            | SessionEvent::HandedOff { turn, .. }
            | SessionEvent::ModelChunk { turn, .. }
            | SessionEvent::ToolCalled { turn, .. }
            | SessionEvent::ToolResult { turn, .. }
            | SessionEvent::AnswerRejected { turn, .. }
            | SessionEvent::ApprovalRequested { turn, .. }
            | SessionEvent::ApprovalDecided { turn, .. }
            | SessionEvent::ToolStarted { turn, .. }
            | SessionEvent::TurnCompleted { turn, .. }
            | SessionEvent::TurnFailed { turn, .. } => Some(*turn),
            SessionEvent::Opened { .. } | SessionEvent::Closed { .. } => None,
        }
    }

    /// Whether the event ends its turn (`turn_completed`, `turn_failed`).
    pub fn ends_turn(&self) -> bool {
        matches!(
            self,
            SessionEvent::TurnCompleted { .. } | SessionEvent::TurnFailed { .. }
        )
    }
}

/// A journaled session event with its sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Sequence number in the session (from 1).
    pub seq: u64,
    /// The event.
    pub event: SessionEvent,
}

/// A tool call of the turn in progress whose result is not journaled: an
/// interrupted attempt left it, and the next attempt resolves it (runs it
/// again with the same key, or fails it if the tool must not run twice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenCall {
    /// The call, as the model made it.
    pub call: ToolCall,
    /// Its tool round in the turn, from 1.
    pub round: u32,
    /// Its place in the round, from 0.
    pub index: u32,
}

/// Longest `by` of a [`Decision`], in bytes.
pub const MAX_DECIDER: usize = 256;
/// Longest `reason` of a [`Decision`], in bytes.
pub const MAX_REASON: usize = 2_048;

/// A tool call of the turn in progress that needed approval, and what was
/// decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The call id.
    pub call_id: String,
    /// The tool.
    pub tool: String,
    /// Its arguments (JSON text), as the model wrote them: what is approved.
    pub arguments: String,
    /// When it is rejected unless decided (ms since the Unix epoch).
    pub deadline_ms: u64,
    /// The decision, once made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decided>,
    /// Whether an approved call of a tool that must not run twice was
    /// started (`tool_started`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub started: bool,
}

/// A decision on an approval, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decided {
    /// Whether the call may run.
    pub approved: bool,
    /// Who decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the deadline decided it.
    #[serde(default)]
    pub timed_out: bool,
    /// The attempt of the turn that was current when it was journaled.
    #[serde(default)]
    pub attempt: u32,
    /// The sequence of its `approval_decided` event.
    #[serde(default)]
    pub seq: u64,
}

/// A decision to take to [`Sessions::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    approved: bool,
    by: Option<String>,
    reason: Option<String>,
    deadline: bool,
}

impl Decision {
    /// The call may run.
    pub fn approve() -> Self {
        Self {
            approved: true,
            by: None,
            reason: None,
            deadline: false,
        }
    }

    /// The call must not run; the model is told `reason`.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self {
            approved: false,
            by: None,
            reason: Some(reason.into()).filter(|r: &String| !r.is_empty()),
            deadline: false,
        }
    }

    /// The rejection a deadline makes.
    pub(crate) fn deadline() -> Self {
        Self {
            approved: false,
            by: None,
            reason: None,
            deadline: true,
        }
    }

    /// Says who decides (journaled with the decision).
    pub fn by(mut self, who: impl Into<String>) -> Self {
        self.by = Some(who.into());
        self
    }

    /// Says why (journaled; on a rejection, the model is told).
    pub fn reason(mut self, why: impl Into<String>) -> Self {
        self.reason = Some(why.into());
        self
    }

    /// Whether it approves.
    pub fn approves(&self) -> bool {
        self.approved
    }
}

/// A turn being answered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// Turn number.
    pub turn: u32,
    /// Current attempt (0: not started).
    pub attempt: u32,
    /// Messages before this turn's reply (restart point of 0.1 journals).
    base: usize,
    /// Reply text so far.
    pub text: String,
    /// Tool calls of the current round (not yet in `messages`).
    calls: Vec<ToolCall>,
    /// Tool rounds begun in this turn.
    #[serde(default)]
    rounds: u32,
    /// Calls whose result is not journaled.
    #[serde(default)]
    open: Vec<OpenCall>,
    /// The agent the turn was handed to, if any.
    #[serde(default)]
    handed_to: Option<String>,
    /// Typed answers of this turn rejected so far (every attempt).
    #[serde(default)]
    repairs: u32,
    /// Calls of this turn that needed approval, in the order asked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    approvals: Vec<Approval>,
}

/// What a session's events fold into (also its snapshot).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    /// Session id ("" until opened).
    pub id: String,
    /// Answering agent.
    pub agent: String,
    /// Owning tenant.
    pub tenant: Option<String>,
    /// Most messages kept as context.
    pub context_limit: u32,
    /// Whether it was opened.
    pub opened: bool,
    /// Whether it was closed.
    pub closed: bool,
    /// Events applied (equals the journal's sequence).
    pub seq: u64,
    /// User turns so far.
    pub turns: u32,
    /// Turns answered.
    pub completed: u32,
    /// Turns failed.
    pub failed: u32,
    /// The model context: the latest messages, at most `context_limit`.
    pub messages: VecDeque<ChatMessage>,
    /// The turn in progress.
    pub pending: Option<Pending>,
    /// The latest turns posted with an idempotency key (at most
    /// [`MAX_KEYED_TURNS`]).
    #[serde(default)]
    pub keyed: VecDeque<KeyedTurn>,
}

impl Schema for SessionState {
    const TYPE_NAME: &'static str = "agent.SessionState";
}

impl SessionState {
    /// The turn posted with `key`, if remembered: the same message
    /// (`digest`) or [`AgentError::KeyReused`].
    fn keyed_turn(&self, key: &str, digest: &str) -> Result<Option<Posted>, AgentError> {
        match self.keyed.iter().rev().find(|k| k.key == key) {
            None => Ok(None),
            Some(k) if k.digest == digest => Ok(Some(Posted {
                turn: k.turn,
                seq: k.seq,
                repeated: true,
            })),
            Some(k) => Err(AgentError::KeyReused {
                session: self.id.clone(),
                turn: k.turn,
            }),
        }
    }

    /// The turn in progress and the agent it was handed to, if any.
    pub fn pending_turn(&self) -> Option<(u32, Option<String>)> {
        self.pending.as_ref().map(|p| (p.turn, p.handed_to.clone()))
    }

    fn view(&self) -> SessionView {
        let mut messages: Vec<ChatMessage> = self.messages.iter().cloned().collect();
        let pending = self.pending.as_ref();
        // A round whose calls are journaled but not yet answered: the model
        // must see its assistant message before any result.
        let (round_text, open_calls) = match pending {
            Some(p) if !p.calls.is_empty() => {
                messages.push(ChatMessage {
                    role: Role::Assistant,
                    content: p.text.clone(),
                    tool_calls: p.calls.clone(),
                    tool_call_id: None,
                    attachments: Vec::new(),
                });
                (p.text.clone(), p.open.clone())
            }
            Some(p) => (String::new(), p.open.clone()),
            None => (String::new(), Vec::new()),
        };
        SessionView {
            id: self.id.clone(),
            agent: self.agent.clone(),
            tenant: self.tenant.clone(),
            seq: self.seq,
            turns: self.turns,
            completed: self.completed,
            failed: self.failed,
            closed: self.closed,
            pending: pending.map(|p| TurnRef {
                turn: p.turn,
                attempt: p.attempt,
            }),
            messages,
            rounds: pending.map_or(0, |p| p.rounds),
            open_calls,
            round_text,
            handed_to: pending.and_then(|p| p.handed_to.clone()),
            repairs: pending.map_or(0, |p| p.repairs),
            approvals: pending.map_or_else(Vec::new, |p| p.approvals.clone()),
        }
    }

    fn trim(&mut self) {
        let limit = self.context_limit.max(1) as usize;
        while self.messages.len() > limit
            || self
                .messages
                .front()
                .is_some_and(|m| m.role == Role::Tool || !m.tool_calls.is_empty())
                && self.messages.len() > 1
        {
            self.messages.pop_front();
        }
    }
}

/// Names one attempt at one turn; writes for a superseded attempt are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnRef {
    /// Turn number.
    pub turn: u32,
    /// Attempt.
    pub attempt: u32,
}

/// The turn in progress of a session, and who answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingTurn {
    /// The turn.
    pub turn: u32,
    /// Its current attempt (0: not started).
    pub attempt: u32,
    /// The agent that answers it: the one it was handed to, or the
    /// session's own.
    pub agent: String,
}

/// A posted user turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posted {
    /// Its turn number.
    pub turn: u32,
    /// Its sequence number.
    pub seq: u64,
    /// Whether it was posted before, with the same idempotency key (and
    /// nothing was posted now).
    #[serde(default)]
    pub repeated: bool,
}

/// A read of a session's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    /// Session id.
    pub id: String,
    /// Answering agent.
    pub agent: String,
    /// Owning tenant.
    pub tenant: Option<String>,
    /// Highest sequence.
    pub seq: u64,
    /// User turns.
    pub turns: u32,
    /// Turns answered.
    pub completed: u32,
    /// Turns failed.
    pub failed: u32,
    /// Closed?
    pub closed: bool,
    /// The turn in progress and its current attempt (0: not started).
    pub pending: Option<TurnRef>,
    /// The model context (the turn in progress included: its user message
    /// and the tool rounds it has journaled).
    pub messages: Vec<ChatMessage>,
    /// Tool rounds begun in the turn in progress.
    #[serde(default)]
    pub rounds: u32,
    /// Tool calls of the turn in progress whose result is not journaled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open_calls: Vec<OpenCall>,
    /// Text of the tool round in progress, kept with its calls.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub round_text: String,
    /// The agent the turn in progress was handed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed_to: Option<String>,
    /// Typed answers of the turn in progress rejected so far (see
    /// [`crate::structured`]), every attempt counted.
    #[serde(default)]
    pub repairs: u32,
    /// Tool calls of the turn in progress that needed approval: those
    /// that wait (no `decision`) and those decided.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<Approval>,
}

impl SessionView {
    /// The approval of call `call_id` in the turn in progress, if it needed one.
    pub fn approval(&self, call_id: &str) -> Option<&Approval> {
        self.approvals.iter().find(|a| a.call_id == call_id)
    }
}

impl SessionView {
    /// The agent that answers the turn in progress: the one it was handed
    /// to, or the session's own.
    pub fn answering_agent(&self) -> &str {
        self.handed_to.as_deref().unwrap_or(&self.agent)
    }
}

type Reply<T> = RpcReplyPort<Result<T, AgentError>>;

/// Commands of a session entity (use [`Sessions`]).
pub enum SessionCommand {
    /// Create the session.
    Open {
        /// Session id.
        id: String,
        /// Answering agent.
        agent: String,
        /// Owning tenant.
        tenant: Option<String>,
        /// Answer: the sequence of the `Opened` event.
        reply: Reply<u64>,
    },
    /// Journal a user turn.
    Post {
        /// What the user said.
        text: String,
        /// Blobs sent with it.
        attachments: Vec<troupe_journal::BlobRef>,
        /// Idempotency key: a turn posted with it before is answered
        /// instead of posting another.
        key: Option<String>,
        /// Answer: the turn, and the agent that answers the session.
        reply: Reply<(Posted, String)>,
    },
    /// The turn posted with idempotency key `key`, if the session
    /// remembers one; [`AgentError::KeyReused`] if it was another message.
    Keyed {
        /// The key.
        key: String,
        /// The digest of the message a retry sends.
        digest: String,
        /// Answer.
        reply: Reply<Option<Posted>>,
    },
    /// Start (or restart) an attempt at the pending turn.
    Begin {
        /// Model backend name.
        model: String,
        /// Answer: the attempt, and the session as it begins (the model's
        /// context), in one exchange.
        reply: Reply<(TurnRef, SessionView)>,
    },
    /// The turn in progress, if any, without the conversation.
    Pending {
        /// Answer.
        reply: Reply<Option<PendingTurn>>,
    },
    /// Journal reply events of an attempt.
    Append {
        /// The attempt they belong to.
        turn: TurnRef,
        /// Chunks, tool calls and results, and possibly the turn's end.
        events: Vec<SessionEvent>,
        /// Answer: the last sequence written.
        reply: Reply<u64>,
    },
    /// Hand the pending turn to another agent.
    HandOff {
        /// The turn (refused if another one is pending).
        turn: u32,
        /// The agent that answers it now.
        agent: String,
        /// Answer: the sequence of the `HandedOff` event.
        reply: Reply<u64>,
    },
    /// End the pending turn as failed, whatever its attempt (the turn could
    /// not be dispatched, or it was cancelled).
    FailPending {
        /// The turn (ignored if another one is pending: answers `false`).
        turn: u32,
        /// Why.
        error: String,
        /// Retry hint.
        retry_after_ms: Option<u64>,
        /// Answer: whether the turn was failed.
        reply: Reply<bool>,
    },
    /// Decide the approval of a waiting tool call.
    Decide {
        /// The call.
        call_id: String,
        /// The decision.
        decision: Decision,
        /// Answer: the decision that was journaled.
        reply: Reply<Decided>,
    },
    /// Read the state.
    View {
        /// Answer.
        reply: Reply<SessionView>,
    },
    /// Close the session.
    Close {
        /// Why.
        reason: String,
        /// Answer: the sequence of the `Closed` event.
        reply: Reply<u64>,
    },
}

#[cfg(feature = "cluster")]
impl ractor::Message for SessionCommand {}

/// Live fan-out of journaled events to subscribers, per session.
pub(crate) struct Hub {
    channels: Mutex<HashMap<String, broadcast::Sender<Arc<SessionRecord>>>>,
    capacity: usize,
    max_subscribers: usize,
    subscribers: metrics::Gauge,
}

impl Hub {
    fn new(capacity: usize, max_subscribers: usize) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            max_subscribers: max_subscribers.max(1),
            subscribers: metrics::gauge!("troupe_session_subscribers"),
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<Arc<SessionRecord>>>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn has_subscribers(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|s| s.receiver_count() > 0)
    }

    fn publish(&self, id: &str, last_seq: u64, events: Vec<SessionEvent>) {
        let Some(tx) = self.lock().get(id).cloned() else {
            return;
        };
        let first = last_seq + 1 - events.len() as u64;
        for (i, event) in events.into_iter().enumerate() {
            let rec = Arc::new(SessionRecord {
                seq: first + i as u64,
                event,
            });
            if tx.send(rec).is_err() {
                break; // nobody listens any more
            }
        }
        self.release(id);
    }

    fn subscribe(self: &Arc<Self>, id: &str) -> Result<Subscription, AgentError> {
        let rx = {
            let mut map = self.lock();
            let tx = map
                .entry(id.to_owned())
                .or_insert_with(|| broadcast::channel(self.capacity).0);
            if tx.receiver_count() >= self.max_subscribers {
                return Err(AgentError::Overloaded {
                    retry_after: Duration::from_secs(1),
                    reason: format!(
                        "session `{id}` already has {} subscribers (the most)",
                        self.max_subscribers
                    ),
                });
            }
            tx.subscribe()
        };
        self.subscribers.increment(1.0);
        Ok(Subscription {
            hub: self.clone(),
            id: id.to_owned(),
            rx: Some(rx),
        })
    }

    /// Forgets the channel of `id` once nobody listens.
    fn release(&self, id: &str) {
        let mut map = self.lock();
        if map.get(id).is_some_and(|s| s.receiver_count() == 0) {
            map.remove(id);
        }
    }

    fn channel_count(&self) -> usize {
        self.lock().len()
    }
}

/// A live receiver that frees its channel when dropped.
struct Subscription {
    hub: Arc<Hub>,
    id: String,
    rx: Option<broadcast::Receiver<Arc<SessionRecord>>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        self.hub.subscribers.decrement(1.0);
        self.hub.release(&self.id);
    }
}

/// The session entity (see the [module docs](self)).
pub struct SessionEntity {
    hub: Arc<Hub>,
    context_limit: u32,
    max_text: usize,
    max_events: usize,
}

fn fail<T: Send + 'static>(reply: Reply<T>, error: AgentError) -> Effect<SessionEntity> {
    let _ = reply.send(Err(error));
    Effect::none()
}

impl SessionEntity {
    /// Persists `events`, publishes them live after they are applied, then
    /// answers with `f(state)`.
    fn persist<T: Send + 'static>(
        &self,
        id: &str,
        events: Vec<SessionEvent>,
        reply: Reply<T>,
        f: impl FnOnce(&SessionState) -> T + Send + 'static,
    ) -> Effect<Self> {
        self.persist_then(id, events, reply, move |st| Ok(f(st)))
    }

    /// [`Self::persist`], answering with `f(state)` whether it succeeds or not.
    fn persist_then<T: Send + 'static>(
        &self,
        id: &str,
        events: Vec<SessionEvent>,
        reply: Reply<T>,
        f: impl FnOnce(&SessionState) -> Result<T, AgentError> + Send + 'static,
    ) -> Effect<Self> {
        // Whether anyone listens is decided after the commit (see
        // `Effect::publish`): a subscriber that registers later reads the
        // events from the journal.
        let (hub, id) = (self.hub.clone(), id.to_owned());
        Effect::persist(events)
            .publish(move |st: &SessionState, events: &[SessionEvent]| {
                if hub.has_subscribers(&id) {
                    hub.publish(&id, st.seq, events.to_vec());
                }
            })
            .reply_result(reply, f)
    }

    /// The first decision on a waiting call is journaled, then answered;
    /// any later one is refused with [`AgentError::AlreadyDecided`]. A
    /// decision that comes after the deadline journals the deadline's
    /// rejection instead (if nothing else has yet) and is refused too.
    fn decide(
        &self,
        state: &SessionState,
        call_id: String,
        decision: Decision,
        reply: Reply<Decided>,
    ) -> Effect<Self> {
        if let Err(e) = Self::check_open(state) {
            return fail(reply, e);
        }
        if decision.by.as_ref().is_some_and(|b| b.len() > MAX_DECIDER) {
            let limit = MAX_DECIDER;
            return fail(
                reply,
                AgentError::TooLarge {
                    what: "approval `by`".into(),
                    limit,
                },
            );
        }
        if decision
            .reason
            .as_ref()
            .is_some_and(|r| r.len() > MAX_REASON)
        {
            let limit = MAX_REASON;
            return fail(
                reply,
                AgentError::TooLarge {
                    what: "approval reason".into(),
                    limit,
                },
            );
        }
        let unknown = || AgentError::UnknownApproval {
            session: state.id.clone(),
            call: call_id.clone(),
        };
        let Some(p) = &state.pending else {
            return fail(reply, unknown());
        };
        let Some(a) = p.approvals.iter().find(|a| a.call_id == call_id) else {
            return fail(reply, unknown());
        };
        let already = |d: &Decided| AgentError::AlreadyDecided {
            session: state.id.clone(),
            call: call_id.clone(),
            approved: d.approved,
            timed_out: d.timed_out,
        };
        if let Some(d) = &a.decision {
            return fail(reply, already(d));
        }
        let late = !decision.deadline && troupe_journal::now_ms() >= a.deadline_ms;
        let timed_out = decision.deadline || late;
        let event = SessionEvent::ApprovalDecided {
            turn: p.turn,
            call_id: call_id.clone(),
            approved: decision.approved && !timed_out,
            by: if timed_out { None } else { decision.by },
            reason: if timed_out { None } else { decision.reason },
            timed_out,
        };
        let (session, call) = (state.id.clone(), call_id);
        self.persist_then(&state.id, vec![event], reply, move |st| {
            let decided = st
                .pending
                .as_ref()
                .and_then(|p| p.approvals.iter().find(|a| a.call_id == call))
                .and_then(|a| a.decision.clone())
                .ok_or_else(|| AgentError::UnknownApproval {
                    session: session.clone(),
                    call: call.clone(),
                })?;
            if late {
                return Err(AgentError::AlreadyDecided {
                    session,
                    call,
                    approved: false,
                    timed_out: true,
                });
            }
            Ok(decided)
        })
    }

    fn check_open(state: &SessionState) -> Result<(), AgentError> {
        if !state.opened {
            Err(AgentError::UnknownSession(state.id.clone()))
        } else if state.closed {
            Err(AgentError::SessionClosed(state.id.clone()))
        } else {
            Ok(())
        }
    }
}

impl EventSourced for SessionEntity {
    type Command = SessionCommand;
    type Event = SessionEvent;
    type State = SessionState;
    const KIND: &'static str = SESSION_KIND;

    fn blobs(event: &SessionEvent) -> Vec<troupe_journal::BlobRef> {
        match event {
            SessionEvent::UserTurn { attachments, .. } => attachments.clone(),
            _ => Vec::new(),
        }
    }

    fn handle(&self, state: &SessionState, command: SessionCommand) -> Effect<Self> {
        match command {
            SessionCommand::Open {
                id,
                agent,
                tenant,
                reply,
            } => {
                if state.opened {
                    // Idempotent for the same owner; anything else is a clash.
                    return if state.agent == agent && state.tenant == tenant {
                        let _ = reply.send(Ok(1));
                        Effect::none()
                    } else {
                        fail(
                            reply,
                            AgentError::Invalid {
                                what: "session id".into(),
                                message: format!("`{id}` already exists"),
                            },
                        )
                    };
                }
                let event = SessionEvent::Opened {
                    id: id.clone(),
                    agent,
                    tenant,
                    context_limit: self.context_limit,
                };
                self.persist(&id, vec![event], reply, |st| st.seq)
            }
            SessionCommand::Post {
                text,
                attachments,
                key,
                reply,
            } => {
                if let Err(e) = Self::check_open(state) {
                    return fail(reply, e);
                }
                // A retry gets its first answer, even while its turn runs.
                if let Some(key) = &key {
                    match state.keyed_turn(key, &message_digest(&text, &attachments)) {
                        Ok(Some(p)) => {
                            let _ = reply.send(Ok((p, state.agent.clone())));
                            return Effect::none();
                        }
                        Ok(None) => {}
                        Err(e) => return fail(reply, e),
                    }
                }
                if let Some(p) = &state.pending {
                    return fail(
                        reply,
                        AgentError::Busy {
                            session: state.id.clone(),
                            turn: p.turn,
                        },
                    );
                }
                if text.len() > self.max_text {
                    return fail(
                        reply,
                        AgentError::TooLarge {
                            what: "message text".into(),
                            limit: self.max_text,
                        },
                    );
                }
                if attachments.len() > MAX_ATTACHMENTS {
                    return fail(
                        reply,
                        AgentError::TooLarge {
                            what: "attachments per message".into(),
                            limit: MAX_ATTACHMENTS,
                        },
                    );
                }
                let turn = state.turns + 1;
                let event = SessionEvent::UserTurn {
                    turn,
                    text,
                    attachments,
                    key,
                };
                self.persist(&state.id, vec![event], reply, move |st| {
                    (
                        Posted {
                            turn,
                            seq: st.seq,
                            repeated: false,
                        },
                        st.agent.clone(),
                    )
                })
            }
            SessionCommand::Keyed { key, digest, reply } => {
                if !state.opened {
                    return fail(reply, AgentError::UnknownSession(state.id.clone()));
                }
                let _ = reply.send(state.keyed_turn(&key, &digest));
                Effect::none()
            }
            SessionCommand::Begin { model, reply } => {
                if let Err(e) = Self::check_open(state) {
                    return fail(reply, e);
                }
                let Some(p) = &state.pending else {
                    return fail(reply, AgentError::NothingToAnswer(state.id.clone()));
                };
                let turn = TurnRef {
                    turn: p.turn,
                    attempt: p.attempt + 1,
                };
                let event = SessionEvent::TurnStarted {
                    turn: turn.turn,
                    attempt: turn.attempt,
                    model,
                    keeps_tool_results: true,
                };
                self.persist(&state.id, vec![event], reply, move |st| (turn, st.view()))
            }
            SessionCommand::Pending { reply } => {
                if !state.opened {
                    return fail(reply, AgentError::UnknownSession(state.id.clone()));
                }
                let _ = reply.send(Ok(state.pending.as_ref().map(|p| PendingTurn {
                    turn: p.turn,
                    attempt: p.attempt,
                    agent: p.handed_to.clone().unwrap_or_else(|| state.agent.clone()),
                })));
                Effect::none()
            }
            SessionCommand::Append {
                turn,
                events,
                reply,
            } => {
                if let Err(e) = Self::check_open(state) {
                    return fail(reply, e);
                }
                let stale = || AgentError::StaleTurn {
                    session: state.id.clone(),
                    turn: turn.turn,
                    attempt: turn.attempt,
                };
                match &state.pending {
                    Some(p) if p.turn == turn.turn && p.attempt == turn.attempt => {}
                    _ => return fail(reply, stale()),
                }
                if events.is_empty() || events.len() > self.max_events {
                    return fail(
                        reply,
                        AgentError::Invalid {
                            what: "append".into(),
                            message: format!(
                                "{} events (1 to {} per append)",
                                events.len(),
                                self.max_events
                            ),
                        },
                    );
                }
                for (i, e) in events.iter().enumerate() {
                    let allowed = matches!(
                        e,
                        SessionEvent::ModelChunk { .. }
                            | SessionEvent::ToolCalled { .. }
                            | SessionEvent::ToolResult { .. }
                            | SessionEvent::AnswerRejected { .. }
                            | SessionEvent::ApprovalRequested { .. }
                            | SessionEvent::ToolStarted { .. }
                            | SessionEvent::TurnCompleted { .. }
                            | SessionEvent::TurnFailed { .. }
                    );
                    let last = i + 1 == events.len();
                    if !allowed || e.turn() != Some(turn.turn) || (e.ends_turn() && !last) {
                        return fail(
                            reply,
                            AgentError::Invalid {
                                what: "append".into(),
                                message: format!(
                                    "event {i} ({e:?}) does not belong to turn {}",
                                    turn.turn
                                ),
                            },
                        );
                    }
                }
                self.persist(&state.id, events, reply, |st| st.seq)
            }
            SessionCommand::HandOff { turn, agent, reply } => {
                if let Err(e) = Self::check_open(state) {
                    return fail(reply, e);
                }
                match &state.pending {
                    Some(p) if p.turn == turn => {}
                    _ => return fail(reply, AgentError::NothingToAnswer(state.id.clone())),
                }
                let event = SessionEvent::HandedOff { turn, agent };
                self.persist(&state.id, vec![event], reply, |st| st.seq)
            }
            SessionCommand::FailPending {
                turn,
                error,
                retry_after_ms,
                reply,
            } => match &state.pending {
                Some(p) if p.turn == turn && state.opened && !state.closed => {
                    let event = SessionEvent::TurnFailed {
                        turn,
                        error,
                        retry_after_ms,
                    };
                    self.persist(&state.id, vec![event], reply, |_| true)
                }
                _ => {
                    let _ = reply.send(Ok(false));
                    Effect::none()
                }
            },
            SessionCommand::Decide {
                call_id,
                decision,
                reply,
            } => self.decide(state, call_id, decision, reply),
            SessionCommand::View { reply } => {
                if !state.opened {
                    return fail(reply, AgentError::UnknownSession(state.id.clone()));
                }
                let _ = reply.send(Ok(state.view()));
                Effect::none()
            }
            SessionCommand::Close { reason, reply } => {
                if let Err(e) = Self::check_open(state) {
                    return fail(reply, e);
                }
                let mut events = Vec::new();
                if let Some(p) = &state.pending {
                    events.push(SessionEvent::TurnFailed {
                        turn: p.turn,
                        error: "session closed".into(),
                        retry_after_ms: None,
                    });
                }
                events.push(SessionEvent::Closed { reason });
                self.persist(&state.id, events, reply, |st| st.seq)
            }
        }
    }

    fn apply(state: &mut SessionState, event: &SessionEvent) {
        state.seq += 1;
        match event {
            SessionEvent::Opened {
                id,
                agent,
                tenant,
                context_limit,
            } => {
                state.id = id.clone();
                state.agent = agent.clone();
                state.tenant = tenant.clone();
                state.context_limit = *context_limit;
                state.opened = true;
            }
            SessionEvent::UserTurn {
                turn,
                text,
                attachments,
                key,
            } => {
                state.turns = *turn;
                if let Some(key) = key {
                    if state.keyed.len() >= MAX_KEYED_TURNS {
                        state.keyed.pop_front();
                    }
                    state.keyed.push_back(KeyedTurn {
                        key: key.clone(),
                        turn: *turn,
                        seq: state.seq,
                        digest: message_digest(text, attachments),
                    });
                }
                let mut content = text.clone();
                // Every model sees what was attached, by reference.
                for a in attachments {
                    content.push_str(&format!(
                        "\n[attachment: {} {}, {} bytes]",
                        a.media_type, a.hash, a.size
                    ));
                }
                let mut message = ChatMessage::user(content);
                // Backends that take the media type get the bytes as well.
                message.attachments = attachments
                    .iter()
                    .cloned()
                    .map(crate::model::Attachment::reference)
                    .collect();
                state.messages.push_back(message);
                state.pending = Some(Pending {
                    turn: *turn,
                    base: state.messages.len(),
                    ..Pending::default()
                });
            }
            SessionEvent::TurnStarted {
                turn,
                attempt,
                keeps_tool_results,
                ..
            } => {
                if let Some(p) = state.pending.as_mut().filter(|p| p.turn == *turn) {
                    p.attempt = *attempt;
                    if *keeps_tool_results {
                        // Text streamed before any tool call of its round
                        // is void; a round whose calls were journaled is
                        // kept whole, its text with it.
                        if p.calls.is_empty() {
                            p.text.clear();
                        }
                    } else {
                        // A 0.1 journal: its new attempts started over.
                        state.messages.truncate(p.base);
                        p.text.clear();
                        p.calls.clear();
                        p.open.clear();
                        p.rounds = 0;
                    }
                }
            }
            SessionEvent::HandedOff { turn, agent } => {
                if let Some(p) = state.pending.as_mut().filter(|p| p.turn == *turn) {
                    p.handed_to = Some(agent.clone());
                }
            }
            SessionEvent::ModelChunk { text, .. } => {
                if let Some(p) = &mut state.pending {
                    p.text.push_str(text);
                }
            }
            SessionEvent::ToolCalled { call, .. } => {
                if let Some(p) = &mut state.pending {
                    if p.calls.is_empty() {
                        p.rounds += 1;
                    }
                    p.open.push(OpenCall {
                        call: call.clone(),
                        round: p.rounds,
                        index: p.calls.len() as u32,
                    });
                    p.calls.push(call.clone());
                }
            }
            SessionEvent::ToolResult {
                call_id,
                ok,
                output,
                ..
            } => {
                if let Some(p) = &mut state.pending {
                    p.open.retain(|c| &c.call.id != call_id);
                    if !p.calls.is_empty() {
                        state.messages.push_back(ChatMessage {
                            role: Role::Assistant,
                            content: std::mem::take(&mut p.text),
                            tool_calls: std::mem::take(&mut p.calls),
                            tool_call_id: None,
                            attachments: Vec::new(),
                        });
                    }
                    let content = if *ok {
                        output.clone()
                    } else {
                        format!("error: {output}")
                    };
                    state.messages.push_back(ChatMessage {
                        role: Role::Tool,
                        content,
                        tool_calls: Vec::new(),
                        tool_call_id: Some(call_id.clone()),
                        attachments: Vec::new(),
                    });
                }
            }
            SessionEvent::ApprovalRequested {
                call_id,
                tool,
                deadline_ms,
                ..
            } => {
                if let Some(p) = &mut state.pending
                    && !p.approvals.iter().any(|a| &a.call_id == call_id)
                {
                    let arguments = p
                        .calls
                        .iter()
                        .find(|c| &c.id == call_id)
                        .map(|c| c.arguments.clone())
                        .unwrap_or_default();
                    p.approvals.push(Approval {
                        call_id: call_id.clone(),
                        tool: tool.clone(),
                        arguments,
                        deadline_ms: *deadline_ms,
                        decision: None,
                        started: false,
                    });
                }
            }
            SessionEvent::ToolStarted { call_id, .. } => {
                if let Some(a) = state
                    .pending
                    .as_mut()
                    .and_then(|p| p.approvals.iter_mut().find(|a| &a.call_id == call_id))
                {
                    a.started = true;
                }
            }
            SessionEvent::ApprovalDecided {
                call_id,
                approved,
                by,
                reason,
                timed_out,
                ..
            } => {
                let seq = state.seq;
                if let Some(p) = &mut state.pending {
                    let attempt = p.attempt;
                    if let Some(a) = p
                        .approvals
                        .iter_mut()
                        .find(|a| &a.call_id == call_id && a.decision.is_none())
                    {
                        a.decision = Some(Decided {
                            approved: *approved,
                            by: by.clone(),
                            reason: reason.clone(),
                            timed_out: *timed_out,
                            attempt,
                            seq,
                        });
                    }
                }
            }
            SessionEvent::AnswerRejected { repair, .. } => {
                if let Some(p) = &mut state.pending {
                    p.repairs += 1;
                    state
                        .messages
                        .push_back(ChatMessage::assistant(std::mem::take(&mut p.text)));
                    state.messages.push_back(ChatMessage::user(repair.clone()));
                }
            }
            SessionEvent::TurnCompleted { .. } => {
                if let Some(p) = state.pending.take() {
                    state.messages.push_back(ChatMessage::assistant(p.text));
                }
                state.completed += 1;
                state.trim();
            }
            SessionEvent::TurnFailed { .. } => {
                state.pending = None;
                state.failed += 1;
                state.trim();
            }
            SessionEvent::Closed { .. } => {
                state.closed = true;
                state.pending = None;
            }
        }
    }
}

/// Settings of [`Sessions`].
#[derive(Clone)]
pub struct SessionConfig {
    /// Mailboxes, passivation and snapshots of the session entities.
    /// Sessions never delete the events a snapshot covers: subscribers
    /// resume from any sequence.
    pub entities: EntityConfig,
    /// Bound on one exchange with a session entity.
    pub ask_timeout: Duration,
    /// Live events buffered per session for subscribers; one that falls
    /// further behind reads the journal instead.
    pub live_buffer: usize,
    /// An idle subscription yields a heartbeat this often.
    pub heartbeat: Duration,
    /// Most live subscribers of one session; one more is refused with
    /// [`AgentError::Overloaded`].
    pub max_subscribers: usize,
    /// Most messages kept as model context.
    pub context_limit: u32,
    /// Largest user message, in bytes.
    pub max_text_bytes: usize,
    /// Most events in one append.
    pub max_events_per_append: usize,
}

impl Default for SessionConfig {
    /// Passivation after 60 s idle, a snapshot every 200 events, 10 s asks,
    /// 256 live events, a heartbeat every 15 s, 64 subscribers per
    /// session, 64 context messages,
    /// 32 KiB messages, 256 events per append.
    fn default() -> Self {
        Self {
            entities: EntityConfig {
                mailbox_capacity: 256,
                idle_timeout: Some(Duration::from_secs(60)),
                durable: DurableConfig::default().snapshot_every(200),
                ..EntityConfig::default()
            },
            ask_timeout: Duration::from_secs(10),
            live_buffer: 256,
            heartbeat: Duration::from_secs(15),
            max_subscribers: 64,
            context_limit: 64,
            max_text_bytes: 32 * 1024,
            max_events_per_append: 256,
        }
    }
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionItem {
    /// The next event.
    Event(Arc<SessionRecord>),
    /// Nothing happened for a heartbeat interval.
    Heartbeat,
}

/// A session subscription: every event after the requested sequence, in
/// order, then live ones; ends only with an error.
pub type SessionStream = BoxStream<'static, Result<SessionItem, AgentError>>;

/// Whoever answers posted turns: the agent system installs itself here so
/// that posting a turn dispatches it to the session's agent.
pub(crate) trait TurnDispatch: Send + Sync + 'static {
    /// Dispatches turn `turn` of `session` to `agent` (failing the turn in
    /// the session if that cannot be done).
    fn dispatch(&self, session: String, agent: String, turn: u32) -> BoxFuture<'static, ()>;
}

type Dispatcher = Arc<std::sync::OnceLock<std::sync::Weak<dyn TurnDispatch>>>;

/// Whether [`Sessions::post_with`] hands the turn to the session's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dispatch {
    /// At once (the default of [`Sessions::post`]).
    #[default]
    Now,
    /// Not now: the caller will ([`crate::AgentSystem::answer`]), for
    /// example a worker that waits for the turn's end.
    Later,
}

/// The sessions of one system. Cheap to clone.
#[derive(Clone)]
pub struct Sessions {
    entities: Entities<SessionEntity>,
    hub: Arc<Hub>,
    journal: Arc<dyn Journal>,
    config: SessionConfig,
    dispatcher: Dispatcher,
}

impl Sessions {
    /// Sessions journaled in `journal` (call inside a Tokio runtime).
    pub fn new(journal: Arc<dyn Journal>, config: SessionConfig) -> Self {
        let hub = Arc::new(Hub::new(config.live_buffer, config.max_subscribers));
        let mut entity_config = config.entities.clone();
        entity_config.durable.delete_covered_events = false;
        let entity = SessionEntity {
            hub: hub.clone(),
            context_limit: config.context_limit,
            max_text: config.max_text_bytes,
            max_events: config.max_events_per_append,
        };
        Self {
            entities: Entities::new(entity, journal.clone(), entity_config),
            hub,
            journal,
            config,
            dispatcher: Dispatcher::default(),
        }
    }

    /// Installs the dispatcher of posted turns (once; later calls are
    /// ignored).
    pub(crate) fn set_dispatcher(&self, d: std::sync::Weak<dyn TurnDispatch>) {
        let _ = self.dispatcher.set(d);
    }

    /// The journal sessions are written to.
    pub fn journal(&self) -> &Arc<dyn Journal> {
        &self.journal
    }

    /// The settings.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    async fn ask<T: Send + 'static>(
        &self,
        id: &str,
        build: impl FnOnce(Reply<T>) -> SessionCommand,
    ) -> Result<T, AgentError> {
        let pid = session_pid(id)?;
        self.entities
            .ask(pid.key(), build, self.config.ask_timeout)
            .await?
    }

    /// Creates a session with a fresh random id, answered by `agent`,
    /// owned by `tenant`.
    pub async fn create(&self, agent: &str, tenant: Option<&str>) -> Result<String, AgentError> {
        let id = format!("{:032x}", rand::random::<u128>());
        self.open(&id, agent, tenant).await?;
        Ok(id)
    }

    /// Creates the session `id` (idempotent for the same agent and tenant).
    pub async fn open(
        &self,
        id: &str,
        agent: &str,
        tenant: Option<&str>,
    ) -> Result<(), AgentError> {
        let (id_, agent, tenant) = (id.to_owned(), agent.to_owned(), tenant.map(str::to_owned));
        self.ask(id, |reply| SessionCommand::Open {
            id: id_,
            agent,
            tenant,
            reply,
        })
        .await
        .map(drop)
    }

    /// Journals a user turn and hands it to the session's agent; refused
    /// with [`AgentError::Busy`] while a turn is in progress. Follow the
    /// answer with [`Sessions::subscribe`], or wait for it with
    /// [`crate::AgentSystem::answer`].
    pub async fn post(&self, id: &str, text: &str) -> Result<Posted, AgentError> {
        self.post_with(id, text, Vec::new(), Dispatch::Now).await
    }

    /// Posts a user turn with attachments (at most [`MAX_ATTACHMENTS`]):
    /// blobs already in the blob store, referenced by the turn's event and
    /// kept as long as it is. `dispatch` says whether the session's agent is
    /// told now.
    pub async fn post_with(
        &self,
        id: &str,
        text: &str,
        attachments: Vec<troupe_journal::BlobRef>,
        dispatch: Dispatch,
    ) -> Result<Posted, AgentError> {
        self.post_keyed(id, text, attachments, dispatch, None).await
    }

    /// Posts a user turn under an idempotency key: posted again with the
    /// same key (among the session's latest [`MAX_KEYED_TURNS`] keyed
    /// turns), the same message gets its first turn back
    /// ([`Posted::repeated`], nothing posted or dispatched again) and
    /// another message [`AgentError::KeyReused`]. The key is journaled in
    /// the turn's own event, so a retry after a crash is recognized too.
    pub async fn post_keyed(
        &self,
        id: &str,
        text: &str,
        attachments: Vec<troupe_journal::BlobRef>,
        dispatch: Dispatch,
        key: Option<String>,
    ) -> Result<Posted, AgentError> {
        let text = text.to_owned();
        let (posted, agent) = self
            .ask(id, |reply| SessionCommand::Post {
                text,
                attachments,
                key,
                reply,
            })
            .await?;
        if dispatch == Dispatch::Now
            && !posted.repeated
            && let Some(d) = self.dispatcher.get().and_then(|w| w.upgrade())
        {
            d.dispatch(id.to_owned(), agent, posted.turn).await;
        }
        Ok(posted)
    }

    /// Hands turn `turn` of `id` to `agent` (see [`SessionEvent::HandedOff`]).
    pub async fn hand_off(&self, id: &str, turn: u32, agent: &str) -> Result<u64, AgentError> {
        let agent = agent.to_owned();
        self.ask(id, |reply| SessionCommand::HandOff { turn, agent, reply })
            .await
    }

    /// Ends turn `turn` of `id` as failed if it is still pending, whatever
    /// its attempt; returns whether it was.
    pub async fn fail_pending(
        &self,
        id: &str,
        turn: u32,
        error: &AgentError,
    ) -> Result<bool, AgentError> {
        let (error, retry_after_ms) = (
            error.to_string(),
            error.retry_after().map(|d| d.as_millis() as u64),
        );
        self.ask(id, |reply| SessionCommand::FailPending {
            turn,
            error,
            retry_after_ms,
            reply,
        })
        .await
    }

    /// Starts an attempt at the pending turn (a new attempt voids an
    /// interrupted one).
    pub async fn begin(&self, id: &str, model: &str) -> Result<TurnRef, AgentError> {
        self.begin_turn(id, model).await.map(|(turn, _)| turn)
    }

    /// [`Sessions::begin`], also returning the session as the attempt
    /// begins (the model's context), in one exchange.
    pub async fn begin_turn(
        &self,
        id: &str,
        model: &str,
    ) -> Result<(TurnRef, SessionView), AgentError> {
        let model = model.to_owned();
        self.ask(id, |reply| SessionCommand::Begin { model, reply })
            .await
    }

    /// The turn in progress of `id` and who answers it, without reading the
    /// conversation.
    pub async fn pending(&self, id: &str) -> Result<Option<PendingTurn>, AgentError> {
        self.ask(id, |reply| SessionCommand::Pending { reply })
            .await
    }

    /// Journals reply events of an attempt; returns the last sequence.
    pub async fn append(
        &self,
        id: &str,
        turn: TurnRef,
        events: Vec<SessionEvent>,
    ) -> Result<u64, AgentError> {
        self.ask(id, |reply| SessionCommand::Append {
            turn,
            events,
            reply,
        })
        .await
    }

    /// Decides the approval of tool call `call_id`, waiting in the turn in
    /// progress of session `id` (see [tool approvals](self#tool-approvals)):
    /// the decision is journaled before this answers, and the waiting turn
    /// goes on. A call decided already (by someone, or by its deadline)
    /// gives [`AgentError::AlreadyDecided`]; an unknown call, or one whose
    /// turn has ended, [`AgentError::UnknownApproval`].
    pub async fn decide(
        &self,
        id: &str,
        call_id: &str,
        decision: Decision,
    ) -> Result<Decided, AgentError> {
        let pid = session_pid(id)?;
        if !self.entities.is_active(pid.key()) && self.journal.highest_seq(&pid).await? == 0 {
            return Err(AgentError::UnknownSession(id.to_owned()));
        }
        let call_id = call_id.to_owned();
        self.ask(id, |reply| SessionCommand::Decide {
            call_id,
            decision,
            reply,
        })
        .await
    }

    /// The session's state. An id that was never created is refused from
    /// the journal ([`AgentError::UnknownSession`]) without activating an
    /// entity, so a flood of made-up ids cannot fill the entity table.
    pub async fn view(&self, id: &str) -> Result<SessionView, AgentError> {
        let pid = session_pid(id)?;
        if !self.entities.is_active(pid.key()) && self.journal.highest_seq(&pid).await? == 0 {
            return Err(AgentError::UnknownSession(id.to_owned()));
        }
        self.ask(id, |reply| SessionCommand::View { reply }).await
    }

    /// The turn posted with idempotency key `key`, if the session
    /// remembers one, without posting anything; [`AgentError::KeyReused`]
    /// if that turn was another message than `text` and `attachments`.
    pub async fn keyed_turn(
        &self,
        id: &str,
        key: &str,
        text: &str,
        attachments: &[troupe_journal::BlobRef],
    ) -> Result<Option<Posted>, AgentError> {
        let (key, digest) = (key.to_owned(), message_digest(text, attachments));
        self.ask(id, |reply| SessionCommand::Keyed { key, digest, reply })
            .await
    }

    /// Closes the session (a turn in progress fails).
    pub async fn close(&self, id: &str, reason: &str) -> Result<u64, AgentError> {
        let reason = reason.to_owned();
        self.ask(id, |reply| SessionCommand::Close { reason, reply })
            .await
    }

    /// Every event of `id` with a sequence above `after`: journaled ones
    /// first, then live ones, each exactly once and in order (see the
    /// [module docs](self)). Unknown sessions are refused.
    pub async fn subscribe(&self, id: &str, after: u64) -> Result<SessionStream, AgentError> {
        let pid = session_pid(id)?;
        // Listen before reading the journal, so nothing falls in between.
        let mut live = self.hub.subscribe(id)?;
        if self.journal.highest_seq(&pid).await? == 0 {
            return Err(AgentError::UnknownSession(id.to_owned()));
        }
        let journal = self.journal.clone();
        let heartbeat = self.config.heartbeat;
        let (hub, id) = (self.hub.clone(), id.to_owned());
        Ok(async_stream::try_stream! {
            let mut last = after;
            // Journal phase, then live; `to` bounds gap fills.
            let mut catch_up = Some(u64::MAX);
            loop {
                if let Some(to) = catch_up.take() {
                    // `after` may be any u64, the largest included.
                    let mut replay = journal.replay(&pid, last.saturating_add(1), to);
                    while let Some(batch) = replay.next().await {
                        for rec in decode_batch(batch?)? {
                            if rec.seq > last {
                                last = rec.seq;
                                yield SessionItem::Event(rec);
                            }
                        }
                    }
                }
                let Some(rx) = live.rx.as_mut() else { break };
                match tokio::time::timeout(heartbeat, rx.recv()).await {
                    Err(_) => yield SessionItem::Heartbeat,
                    Ok(Ok(rec)) if rec.seq <= last => {}
                    Ok(Ok(rec)) if Some(rec.seq) == last.checked_add(1) => {
                        last = rec.seq;
                        yield SessionItem::Event(rec);
                    }
                    // A gap (published before we listened, or skipped):
                    // fill it from the journal, which has everything published.
                    Ok(Ok(rec)) => catch_up = Some(rec.seq),
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => catch_up = Some(u64::MAX),
                    Ok(Err(broadcast::error::RecvError::Closed)) => {
                        // Cannot happen while we hold a receiver; listen again.
                        live = hub.subscribe(&id)?;
                        catch_up = Some(u64::MAX);
                    }
                }
            }
        }
        .boxed())
    }

    /// Sessions in memory now.
    pub fn active_count(&self) -> usize {
        self.entities.active_count()
    }

    /// Sessions with live subscribers now.
    pub fn subscribed_count(&self) -> usize {
        self.hub.channel_count()
    }

    /// Passivates every session in memory (draining their mailboxes).
    pub async fn passivate_all(&self) {
        self.entities.passivate_all().await
    }

    /// Passivates the active sessions whose id matches `which`; returns how
    /// many. A cluster node calls it for sessions that moved elsewhere.
    pub async fn passivate_where(&self, which: impl Fn(&str) -> bool) -> usize {
        self.entities.passivate_where(which).await
    }
}

fn decode_batch(
    batch: Vec<troupe_journal::PersistedEvent>,
) -> Result<Vec<Arc<SessionRecord>>, AgentError> {
    batch
        .into_iter()
        .map(|ev| {
            Ok(Arc::new(SessionRecord {
                seq: ev.seq,
                event: ev.decode::<SessionEvent>()?,
            }))
        })
        .collect()
}

/// The persistence id of session `id`, or a typed error for a bad id.
pub fn session_pid(id: &str) -> Result<PersistenceId, AgentError> {
    PersistenceId::new(SESSION_KIND, id).map_err(|e| AgentError::Invalid {
        what: "session id".into(),
        message: e.to_string(),
    })
}

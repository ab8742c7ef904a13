//! The actor crate's error type.

use std::sync::Arc;
use std::time::Duration;

use troupe_journal::JournalError;

/// Everything that can go wrong sending to, running or supervising actors.
///
/// Cloneable so that one activation failure can be reported to every caller
/// that waited on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ActorError {
    /// The mailbox is full; `tell` fails fast rather than queue without bound.
    #[error(
        "mailbox of `{actor}` is full ({capacity} messages); retry later or use `send` to wait"
    )]
    Backpressure {
        /// Actor name.
        actor: String,
        /// Mailbox capacity.
        capacity: usize,
    },
    /// The actor is not running (stopped, or between a crash and its restart).
    #[error("actor `{actor}` is not running")]
    NotRunning {
        /// Actor name.
        actor: String,
    },
    /// `send` or `ask` did not complete in time.
    #[error("`{operation}` to `{actor}` timed out after {after:?}")]
    Timeout {
        /// Actor name.
        actor: String,
        /// `send` or `ask`.
        operation: &'static str,
        /// The time-out.
        after: Duration,
    },
    /// The actor dropped the reply port without answering: for a durable
    /// actor, its command's events were not (known to be) persisted.
    #[error(
        "`{actor}` dropped the reply: the command's outcome is unknown (its actor failed or stopped)"
    )]
    NoReply {
        /// Actor name.
        actor: String,
    },
    /// Recovery or persistence failed in the journal (the journal's own
    /// error is the source: [`ActorError::is_transient`] follows it).
    #[error("journal error in `{actor}`")]
    Journal {
        /// Actor (or persistence id).
        actor: String,
        /// What the journal said.
        #[source]
        source: Arc<JournalError>,
    },
    /// A keyed kind (entities, agent instances) has as many keys in memory
    /// as it may: the message for one more is refused.
    #[error(
        "`{kind}` has {limit} keys in memory, its limit: retry later, or passivate idle ones sooner"
    )]
    TooManyActive {
        /// The kind.
        kind: String,
        /// Its limit.
        limit: usize,
    },
    /// An actor could not be spawned.
    #[error("could not start `{actor}`: {message}")]
    Spawn {
        /// Actor name.
        actor: String,
        /// Why.
        message: String,
    },
    /// A supervisor gave up: more restarts than its intensity allows.
    #[error(
        "supervisor `{supervisor}` exceeded its restart intensity ({max_restarts} in {window:?}); failing to its parent"
    )]
    IntensityExceeded {
        /// Supervisor name.
        supervisor: String,
        /// Allowed restarts.
        max_restarts: u32,
        /// Within this window.
        window: Duration,
    },
    /// A key or configuration value the runtime refuses.
    #[error("invalid {what}: {message}")]
    Invalid {
        /// What was refused.
        what: &'static str,
        /// Why.
        message: String,
    },
    /// The system is shutting down.
    #[error("the actor system is shutting down")]
    ShuttingDown,
}

impl ActorError {
    /// A journal failure in `actor`, keeping the journal's error.
    pub fn journal(actor: impl Into<String>, e: JournalError) -> Self {
        ActorError::Journal {
            actor: actor.into(),
            source: Arc::new(e),
        }
    }

    /// Whether retrying the same operation later may succeed: a full
    /// mailbox or key table, a time-out, an actor between two
    /// incarnations, a transient journal failure.
    pub fn is_transient(&self) -> bool {
        match self {
            ActorError::Backpressure { .. }
            | ActorError::TooManyActive { .. }
            | ActorError::NotRunning { .. }
            | ActorError::Timeout { .. } => true,
            ActorError::Journal { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    /// When a retry has a fair chance, for the errors that are overloads
    /// (a full mailbox or key table): one second.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ActorError::Backpressure { .. } | ActorError::TooManyActive { .. } => {
                Some(Duration::from_secs(1))
            }
            _ => None,
        }
    }
}

/// A message a handle could not deliver, given back with the reason so the
/// caller can retry without having cloned it.
#[derive(thiserror::Error)]
#[error("{error}")]
pub struct Rejected<M> {
    /// Why it was not delivered.
    pub error: ActorError,
    /// The message, unsent.
    pub message: M,
}

impl<M> Rejected<M> {
    /// Drops the message, keeping the reason.
    pub fn into_error(self) -> ActorError {
        self.error
    }
}

impl<M> std::fmt::Debug for Rejected<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rejected")
            .field("error", &self.error)
            .field("message", &std::any::type_name::<M>())
            .finish()
    }
}

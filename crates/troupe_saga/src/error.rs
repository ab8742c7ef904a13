//! The saga crate's error type.

use std::sync::Arc;
use std::time::Duration;

use troupe_journal::JournalError;

/// Everything that can go wrong defining, starting or running sagas.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SagaError {
    /// A workflow definition that cannot run.
    #[error("invalid workflow `{definition}`: {message}")]
    InvalidDefinition {
        /// Workflow name.
        definition: String,
        /// What is wrong (names the steps involved).
        message: String,
    },
    /// No workflow registered under this name.
    #[error("unknown workflow `{0}`")]
    UnknownDefinition(String),
    /// A step names a handler nobody registered.
    #[error("workflow `{definition}` step `{step}` uses unregistered handler `{handler}`")]
    UnknownHandler {
        /// Workflow name.
        definition: String,
        /// Step name.
        step: String,
        /// Handler name.
        handler: String,
    },
    /// No saga with this id.
    #[error("unknown saga `{0}`")]
    UnknownSaga(String),
    /// A request body that does not parse.
    #[error("malformed saga request: {0}")]
    Malformed(String),
    /// The journal failed (its error is the source).
    #[error("saga journal: {0}")]
    Journal(#[source] Arc<JournalError>),
    /// A saga's journal does not fit its workflow (a step past its last).
    #[error("saga `{id}`: {message}")]
    Corrupt {
        /// Saga (or persistence) id.
        id: String,
        /// What does not fit.
        message: String,
    },
    /// The durable timer of a signal deadline could not be scheduled.
    #[error("saga `{id}`: cannot schedule its signal deadline: {message}")]
    Timer {
        /// Saga id.
        id: String,
        /// Why.
        message: String,
    },
    /// Too many sagas running: retry once some have ended.
    #[error("{running} sagas are running, the most allowed; retry once some end")]
    Overloaded {
        /// Sagas running.
        running: usize,
    },
    /// The saga actor is not running.
    #[error("saga `{0}` is not running")]
    NotRunning(String),
}

impl From<JournalError> for SagaError {
    fn from(e: JournalError) -> Self {
        SagaError::Journal(Arc::new(e))
    }
}

impl SagaError {
    /// Whether retrying later may succeed: too many sagas running, a saga
    /// between two incarnations, a transient journal failure.
    pub fn is_transient(&self) -> bool {
        match self {
            SagaError::Overloaded { .. } | SagaError::NotRunning(_) => true,
            SagaError::Journal(e) => e.is_transient(),
            _ => false,
        }
    }

    /// The retry hint of an overload (one second).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SagaError::Overloaded { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// Why one attempt of a step (or compensation) failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{message}")]
pub struct StepError {
    /// What went wrong.
    pub message: String,
    /// False when retrying cannot help (the step fails for good at once).
    pub retryable: bool,
}

impl StepError {
    /// A failure worth retrying.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure no retry will fix.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }
}

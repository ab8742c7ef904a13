//! The gateway's error type and its HTTP form.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use troupe_agent::AgentError;
use troupe_saga::SagaError;

/// Everything a request or the server can fail with. Each variant maps to
/// one HTTP status; the body is JSON: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// Malformed JSON, a missing or mistyped field (400).
    #[error("{0}")]
    BadRequest(String),
    /// No or unknown bearer token (401).
    #[error("missing or unknown bearer token")]
    Unauthorized,
    /// Unknown id, or another tenant's (404).
    #[error("no {kind} `{id}`")]
    NotFound {
        /// What was looked for.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// The request conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    /// The body is over the configured limit (413).
    #[error("body over the limit of {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Overload: a lease refused, a queue at its bound, degraded GPUs (429).
    #[error("overloaded: {reason}; retry after {retry_after:?}")]
    Overloaded {
        /// Why.
        reason: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// The server is starting or stopping (503).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A failure inside the server (500).
    #[error("internal error: {0}")]
    Internal(String),
    /// The configuration is invalid (at start-up).
    #[error("configuration: {0}")]
    Config(String),
}

impl GatewayError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::Unauthorized => StatusCode::UNAUTHORIZED,
            GatewayError::NotFound { .. } => StatusCode::NOT_FOUND,
            GatewayError::Conflict(_) => StatusCode::CONFLICT,
            GatewayError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Internal(_) | GatewayError::Config(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn code(&self) -> &'static str {
        match self {
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::Unauthorized => "unauthorized",
            GatewayError::NotFound { .. } => "not_found",
            GatewayError::Conflict(_) => "conflict",
            GatewayError::TooLarge { .. } => "too_large",
            GatewayError::Overloaded { .. } => "overloaded",
            GatewayError::Unavailable(_) => "unavailable",
            GatewayError::Internal(_) => "internal",
            GatewayError::Config(_) => "config",
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        if let GatewayError::Overloaded { retry_after, .. } = &self {
            body["error"]["retry_after_ms"] = json!(retry_after.as_millis() as u64);
        }
        metrics::counter!("troupe_gateway_errors_total", "code" => self.code()).increment(1);
        let mut resp = (status, Json(body)).into_response();
        if let GatewayError::Overloaded { retry_after, .. } = &self {
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<AgentError> for GatewayError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Overloaded {
                retry_after,
                reason,
            } => GatewayError::Overloaded {
                reason,
                retry_after,
            },
            AgentError::UnknownSession(id) => GatewayError::NotFound {
                kind: "session",
                id,
            },
            AgentError::Busy { .. } | AgentError::SessionClosed(_) => {
                GatewayError::Conflict(e.to_string())
            }
            AgentError::TooLarge { .. } | AgentError::Invalid { .. } => {
                GatewayError::BadRequest(e.to_string())
            }
            AgentError::Actor(troupe_actor::ActorError::Backpressure { .. }) => {
                GatewayError::Overloaded {
                    reason: e.to_string(),
                    retry_after: Duration::from_secs(1),
                }
            }
            other => GatewayError::Internal(other.to_string()),
        }
    }
}

impl From<SagaError> for GatewayError {
    fn from(e: SagaError) -> Self {
        match e {
            SagaError::UnknownDefinition(_) | SagaError::Malformed(_) => {
                GatewayError::BadRequest(e.to_string())
            }
            SagaError::UnknownSaga(id) => GatewayError::NotFound {
                kind: "workflow",
                id,
            },
            SagaError::Overloaded { .. } => GatewayError::Overloaded {
                reason: e.to_string(),
                retry_after: Duration::from_secs(1),
            },
            other => GatewayError::Internal(other.to_string()),
        }
    }
}

impl From<troupe_journal::JournalError> for GatewayError {
    fn from(e: troupe_journal::JournalError) -> Self {
        GatewayError::Internal(format!("journal: {e}"))
    }
}

impl From<troupe_actor::ActorError> for GatewayError {
    fn from(e: troupe_actor::ActorError) -> Self {
        match e {
            troupe_actor::ActorError::Backpressure { .. } => GatewayError::Overloaded {
                reason: e.to_string(),
                retry_after: Duration::from_secs(1),
            },
            other => GatewayError::Internal(other.to_string()),
        }
    }
}

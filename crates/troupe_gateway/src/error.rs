//! The gateway's error type and its HTTP form.
//!
//! | error | status |
//! |---|---|
//! | malformed input (names the field) | 400 |
//! | no bearer token, or an unknown one (with `WWW-Authenticate`) | 401 |
//! | an `Origin` or `Host` this server does not serve | 403 |
//! | unknown id, or another tenant's | 404 |
//! | conflicts with the current state (a busy session) | 409 |
//! | a body over the limit, an upload past the tenant's blob quota | 413 |
//! | an `Idempotency-Key` reused with another request | 422 |
//! | an overload: a lease refused, a queue at its bound, the degrade policy | 429 with `Retry-After` |
//! | a transient failure: the journal failing for now, an actor restarting, a model server down | 503 with `Retry-After` |
//! | anything else | 500; the cause is logged, not returned |
//!
//! Every error body also carries the request's id (`request_id`, the
//! `x-request-id` response header), and so do the web framework's own
//! rejections (a wrong method, a malformed path or query), which the
//! router rewrites into this form.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use troupe_agent::AgentError;
use troupe_saga::SagaError;

/// The cause kept inside a 503 or 500.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// Everything a request or the server can fail with. Each variant maps to
/// one HTTP status (see the [module docs](self)); the body is JSON:
/// `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// Malformed JSON, a missing or mistyped field (400).
    #[error("{0}")]
    BadRequest(String),
    /// No bearer token (401, with a `WWW-Authenticate: Bearer` challenge).
    #[error("a bearer token is needed (`Authorization: Bearer <token>`)")]
    Unauthorized,
    /// A bearer token that identifies no tenant (401, `invalid_token`).
    #[error("the bearer token identifies no tenant")]
    BadToken,
    /// A request from an origin or for a host this server does not serve
    /// (403).
    #[error("{0}")]
    Forbidden(String),
    /// An `Idempotency-Key` already used for another request (422).
    #[error("{0}")]
    KeyReused(String),
    /// A rejection made by the web framework itself (a wrong method, a
    /// malformed path or query), in the gateway's error form.
    #[error("{message}")]
    Rejected {
        /// Its HTTP status.
        status: u16,
        /// What the framework said.
        message: String,
    },
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
    /// A tenant's stored share is used up (blob bytes): retrying does not
    /// help until some of it is freed (413).
    #[error("{0}")]
    Quota(String),
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
    /// The server cannot serve this now: it is starting or stopping, or a
    /// part it needs failed for now (503).
    #[error("unavailable: {reason}")]
    Unavailable {
        /// What is unavailable.
        reason: String,
        /// When to retry.
        retry_after: Duration,
        /// The failure, when there is one.
        #[source]
        cause: Option<Cause>,
    },
    /// A failure inside the server (500); the body does not carry it.
    #[error("internal error: {message}")]
    Internal {
        /// What failed (logged).
        message: String,
        /// The failure.
        #[source]
        cause: Option<Cause>,
    },
    /// The configuration is invalid (at start-up).
    #[error("configuration: {0}")]
    Config(String),
}

/// Retry hint of a transient failure that carries none.
const TRANSIENT_RETRY: Duration = Duration::from_secs(1);

impl GatewayError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::Unauthorized | GatewayError::BadToken => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::KeyReused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            GatewayError::Rejected { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST)
            }
            GatewayError::NotFound { .. } => StatusCode::NOT_FOUND,
            GatewayError::Conflict(_) => StatusCode::CONFLICT,
            GatewayError::TooLarge { .. } | GatewayError::Quota(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Internal { .. } | GatewayError::Config(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn code(&self) -> &'static str {
        match self {
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::Unauthorized => "unauthorized",
            GatewayError::BadToken => "invalid_token",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::KeyReused(_) => "idempotency_key_reused",
            GatewayError::Rejected { status, .. } => match *status {
                400 => "bad_request",
                404 => "not_found",
                405 => "method_not_allowed",
                408 => "request_timeout",
                411 => "length_required",
                413 => "too_large",
                414 => "uri_too_long",
                415 => "unsupported_media_type",
                422 => "unprocessable",
                431 => "headers_too_large",
                s if s >= 500 => "internal",
                _ => "rejected",
            },
            GatewayError::NotFound { .. } => "not_found",
            GatewayError::Conflict(_) => "conflict",
            GatewayError::TooLarge { .. } => "too_large",
            GatewayError::Quota(_) => "quota_exceeded",
            GatewayError::Overloaded { .. } => "overloaded",
            GatewayError::Unavailable { .. } => "unavailable",
            GatewayError::Internal { .. } => "internal",
            GatewayError::Config(_) => "config",
        }
    }

    /// When a retry has a fair chance (429 and 503).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::Overloaded { retry_after, .. }
            | GatewayError::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Whether retrying later may succeed (429 and 503).
    pub fn is_transient(&self) -> bool {
        self.retry_after().is_some()
    }

    /// 503 for a reason with no underlying error.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        GatewayError::Unavailable {
            reason: reason.into(),
            retry_after: TRANSIENT_RETRY,
            cause: None,
        }
    }

    /// 500 for an unexpected error.
    pub fn internal(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        GatewayError::Internal {
            message: e.to_string(),
            cause: Some(Arc::new(e)),
        }
    }

    /// 503 or 500 for `e`, as its transient-ness says.
    fn failure(
        e: impl std::error::Error + Send + Sync + 'static,
        transient: bool,
        retry_after: Option<Duration>,
    ) -> Self {
        if transient {
            GatewayError::Unavailable {
                reason: e.to_string(),
                retry_after: retry_after.unwrap_or(TRANSIENT_RETRY),
                cause: Some(Arc::new(e)),
            }
        } else {
            Self::internal(e)
        }
    }

    /// The HTTP form of a system error.
    pub fn from_runtime(e: troupe_runtime::RuntimeError) -> Self {
        use troupe_runtime::RuntimeError as R;
        match e {
            R::Agent(e) => e.into(),
            R::Saga(e) => e.into(),
            R::Actor(e) => e.into(),
            R::Journal(e) => e.into(),
            R::Config(m) => GatewayError::Config(m),
            other => {
                let (t, r) = (other.is_transient(), other.retry_after());
                Self::failure(other, t, r)
            }
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            // The cause stays in the log: it may name files, hosts, queries.
            GatewayError::Internal { .. } => {
                tracing::error!(error = %self, cause = ?std::error::Error::source(&self), "internal error");
                "internal error (logged by the server)".to_owned()
            }
            GatewayError::Unavailable { reason, .. } => {
                tracing::warn!(error = %self, "unavailable");
                format!("unavailable: {reason}")
            }
            other => other.to_string(),
        };
        let mut body = json!({ "error": { "code": self.code(), "message": message } });
        if let Some(id) = crate::layers::request_id() {
            body["error"]["request_id"] = json!(id);
        }
        if let Some(retry_after) = self.retry_after() {
            body["error"]["retry_after_ms"] = json!(retry_after.as_millis() as u64);
        }
        metrics::counter!("troupe_gateway_errors_total", "code" => self.code()).increment(1);
        let mut resp = (status, Json(body)).into_response();
        // RFC 9110 section 11.6.1: a 401 carries a challenge (RFC 6750's
        // `invalid_token` when a token was sent and is not known).
        let challenge = match &self {
            GatewayError::Unauthorized => Some(r#"Bearer realm="troupe""#),
            GatewayError::BadToken => Some(r#"Bearer realm="troupe", error="invalid_token""#),
            _ => None,
        };
        if let Some(c) = challenge {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        if let Some(retry_after) = self.retry_after() {
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
            AgentError::KeyReused { .. } => GatewayError::KeyReused(e.to_string()),
            AgentError::UnknownApproval { call, .. } => GatewayError::NotFound {
                kind: "approval",
                id: call,
            },
            AgentError::Busy { .. }
            | AgentError::SessionClosed(_)
            | AgentError::AlreadyDecided { .. } => GatewayError::Conflict(e.to_string()),
            AgentError::TooLarge { .. }
            | AgentError::Invalid { .. }
            | AgentError::UnknownAgent(_) => GatewayError::BadRequest(e.to_string()),
            AgentError::Actor(a) => a.into(),
            other => {
                let (t, r) = (other.is_transient(), other.retry_after());
                Self::failure(other, t, r)
            }
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
            other => {
                let (t, r) = (other.is_transient(), other.retry_after());
                Self::failure(other, t, r)
            }
        }
    }
}

impl From<troupe_journal::JournalError> for GatewayError {
    fn from(e: troupe_journal::JournalError) -> Self {
        let t = e.is_transient();
        Self::failure(e, t, None)
    }
}

impl From<troupe_actor::ActorError> for GatewayError {
    fn from(e: troupe_actor::ActorError) -> Self {
        use troupe_actor::ActorError as A;
        match e {
            A::Backpressure { .. } | A::TooManyActive { .. } => GatewayError::Overloaded {
                reason: e.to_string(),
                retry_after: e.retry_after().unwrap_or(TRANSIENT_RETRY),
            },
            A::ShuttingDown => GatewayError::unavailable("the server is stopping"),
            other => {
                let (t, r) = (other.is_transient(), other.retry_after());
                Self::failure(other, t, r)
            }
        }
    }
}

//! The tower layers every route goes through, outermost first:
//!
//! | layer | what |
//! |---|---|
//! | request id (tower-http) | `x-request-id`: the client's if it is short and plain (at most 64 of `A-Z a-z 0-9 - _ .`), a fresh UUID otherwise; echoed on the response |
//! | [`envelope`] | the request id in every error body; the framework's own plain-text or empty rejections (405, a malformed path or query, 408, 413) rewritten as the gateway's JSON errors, their `Allow` header kept |
//! | CORS (tower-http) | only for `http.cors_origins` |
//! | panics (tower-http) | a handler that panics answers 500 in JSON; the process keeps serving |
//! | [`guard`] | `Host` must name this server (DNS rebinding), `Origin`, when sent, must be allowed (a web page cannot drive the API) |
//! | per class of route | ordinary routes: at most `http.max_requests` at once (429 past it, at once, not queued), each within `http.request_timeout_ms` (503 past it); blob transfers: `http.max_transfers`, `http.transfer_timeout_ms`; event streams: counted by their handler (`http.max_streams`, per tenant and per session) |

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{BoxError, ServiceBuilder};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};

use crate::AppState;
use crate::config::HttpSection;
use crate::error::GatewayError;

/// The request-id header.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest framework rejection body read back to be rewritten.
const MAX_REJECTION_BYTES: usize = 4 * 1024;

tokio::task_local! {
    static CURRENT: String;
}

/// The id of the request being handled (inside a handler or a layer under
/// [`envelope`]).
pub(crate) fn request_id() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

fn plain_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A client's `x-request-id` that is not short and plain is replaced (it
/// would end up in the logs).
async fn sanitize_id(mut req: Request, next: Next) -> Response {
    if req.headers().get(&REQUEST_ID).is_some_and(|v| !plain_id(v)) {
        req.headers_mut().remove(&REQUEST_ID);
    }
    next.run(req).await
}

/// Sets the request id for what runs inside, and gives every error
/// response the gateway's JSON form with that id.
pub(crate) async fn envelope(req: Request, next: Next) -> Response {
    let id = req
        .extensions()
        .get::<RequestId>()
        .and_then(|r| r.header_value().to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let method = req.method().clone();
    let resp = CURRENT.scope(id.clone(), next.run(req)).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, MAX_REJECTION_BYTES).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let message = if status.is_server_error() {
        tracing::error!(%status, request_id = %id, body = %text, "internal error");
        "internal error (logged by the server)".to_owned()
    } else if text.is_empty() {
        match status {
            StatusCode::METHOD_NOT_ALLOWED => format!("method {method} is not allowed here"),
            s => s.canonical_reason().unwrap_or("rejected").to_lowercase(),
        }
    } else {
        text
    };
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => GatewayError::Rejected {
            status: 413,
            message: format!("body over the limit: {message}"),
        },
        s => GatewayError::Rejected {
            status: s.as_u16(),
            message,
        },
    };
    let mut out = CURRENT.scope(id, async { error.into_response() }).await;
    for keep in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&keep) {
            out.headers_mut().insert(keep, v.clone());
        }
    }
    for (k, v) in parts.headers.iter() {
        if k.as_str().starts_with("access-control-") {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

/// The host names a `Host` header may carry, or `None` for any.
pub(crate) fn allowed_hosts(
    http: &HttpSection,
    listen: std::net::SocketAddr,
) -> Option<Vec<String>> {
    if !http.allowed_hosts.is_empty() {
        return Some(
            http.allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        );
    }
    listen.ip().is_loopback().then(|| {
        ["localhost", "127.0.0.1", "[::1]"]
            .map(str::to_owned)
            .to_vec()
    })
}

/// The host name of a `Host` value, without its port.
fn host_name(v: &str) -> &str {
    if v.starts_with('[') {
        return v.split_inclusive(']').next().unwrap_or(v);
    }
    v.rsplit_once(':').map_or(v, |(h, _)| h)
}

/// `Host` and `Origin` checks (see the [module docs](self)).
pub(crate) async fn guard(State(st): State<AppState>, req: Request, next: Next) -> Response {
    // RFC 9112 section 3.2: more than one Host is a bad request.
    if req.headers().get_all(header::HOST).iter().count() > 1 {
        return GatewayError::BadRequest("more than one `Host` header".into()).into_response();
    }
    if let Some(hosts) = &st.0.hosts {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .map(|h| host_name(h).to_ascii_lowercase());
        match host {
            Some(h) if hosts.contains(&h) => {}
            Some(h) => {
                return GatewayError::Forbidden(format!(
                    "host `{h}` is not served here (http.allowed_hosts)"
                ))
                .into_response();
            }
            None => {
                return GatewayError::BadRequest("a `Host` header is required".into())
                    .into_response();
            }
        }
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let allowed =
            st.0.config
                .http
                .cors_origins
                .iter()
                .any(|o| o.as_bytes() == origin.as_bytes());
        if !allowed {
            metrics::counter!("troupe_gateway_refused_total", "reason" => "origin").increment(1);
            return GatewayError::Forbidden(format!(
                "origin `{}` may not call this API (http.cors_origins)",
                String::from_utf8_lossy(origin.as_bytes())
            ))
            .into_response();
        }
    }
    next.run(req).await
}

fn cors(http: &HttpSection) -> CorsLayer {
    let origins: Vec<HeaderValue> = http
        .cors_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("idempotency-key"),
            REQUEST_ID,
        ])
        .expose_headers([header::LOCATION, header::RETRY_AFTER, REQUEST_ID])
        .max_age(Duration::from_secs(600))
}

/// What a class of routes may hold at once, and for how long.
#[derive(Clone)]
pub(crate) struct Bounds {
    slots: Arc<tokio::sync::Semaphore>,
    timeout: Duration,
    what: &'static str,
}

impl Bounds {
    pub fn new(slots: usize, timeout: Duration, what: &'static str) -> Self {
        Self {
            slots: Arc::new(tokio::sync::Semaphore::new(slots.max(1))),
            timeout,
            what,
        }
    }

    /// Wraps `route` in these bounds: refused at once (429) when every
    /// slot is taken, 503 past the time-out.
    pub fn apply(
        &self,
        route: axum::routing::MethodRouter<AppState>,
    ) -> axum::routing::MethodRouter<AppState> {
        let (what, timeout) = (self.what, self.timeout);
        route.layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(move |e: BoxError| async move {
                    bound_error(e, what, timeout)
                }))
                .load_shed()
                .layer(GlobalConcurrencyLimitLayer::with_semaphore(
                    self.slots.clone(),
                ))
                .timeout(timeout),
        )
    }
}

fn bound_error(e: BoxError, what: &'static str, timeout: Duration) -> GatewayError {
    if e.is::<tower::load_shed::error::Overloaded>() {
        metrics::counter!("troupe_gateway_refused_total", "reason" => what).increment(1);
        GatewayError::Overloaded {
            reason: format!("too many {what} in flight"),
            retry_after: Duration::from_secs(1),
        }
    } else if e.is::<tower::timeout::error::Elapsed>() {
        metrics::counter!("troupe_gateway_timeouts_total", "class" => what).increment(1);
        GatewayError::unavailable(format!("the request took longer than {timeout:?}"))
    } else {
        GatewayError::Internal {
            message: e.to_string(),
            cause: None,
        }
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    metrics::counter!("troupe_gateway_panics_total").increment(1);
    // Plain here; `envelope` (outside) gives it the JSON form and the id.
    (StatusCode::INTERNAL_SERVER_ERROR, "a handler panicked").into_response()
}

/// The layers of the whole router, around `routes`.
pub(crate) fn wrap(routes: axum::Router<AppState>, state: AppState) -> axum::Router {
    let http = state.0.config.http.clone();
    routes
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(cors(&http))
        .layer(axum::middleware::from_fn(envelope))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(axum::middleware::from_fn(sanitize_id))
        .with_state(state)
}

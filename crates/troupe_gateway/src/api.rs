//! The HTTP handlers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use troupe_agent::{SessionItem, SessionView};
use troupe_journal::{NewEvent, PersistenceId, Schema};

use crate::config::Quota;
use crate::error::GatewayError;
use crate::layers::Bounds;
use crate::tasks::{TaskKind, TaskState};
use crate::{ANONYMOUS_TENANT, AppState};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A tenant's bearer token (or none when no tenants are configured);
    /// ids are the tenant's own.
    Tenant,
    /// Anyone who reaches the server: liveness, readiness, metrics.
    Public,
}

/// One route of the router: what [`routes`] lists and the router is built
/// from, so a test can go over every route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// HTTP method.
    pub method: &'static str,
    /// Path, with `{name}` for its parameters.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
}

/// How a route is bounded (see [`crate::layers`]).
#[derive(Clone, Copy)]
enum Class {
    Ordinary,
    Transfer,
    Stream,
}

fn table() -> Vec<(Route, Class, MethodRouter<AppState>)> {
    use Access::{Public, Tenant};
    use Class::{Ordinary, Stream, Transfer};
    let r = |method, path, access| Route {
        method,
        path,
        access,
    };
    vec![
        (
            r("POST", "/v1/sessions", Tenant),
            Ordinary,
            post(create_session),
        ),
        (
            r("GET", "/v1/sessions/{id}", Tenant),
            Ordinary,
            get(get_session),
        ),
        (
            r("POST", "/v1/sessions/{id}/messages", Tenant),
            Ordinary,
            post(post_message),
        ),
        (
            r("GET", "/v1/sessions/{id}/events", Tenant),
            Stream,
            get(session_events),
        ),
        (
            r("POST", "/v1/sessions/{id}/approvals/{call}", Tenant),
            Ordinary,
            post(decide_approval),
        ),
        (
            r("POST", "/v1/sessions/{id}/tickets", Tenant),
            Ordinary,
            post(create_ticket),
        ),
        (r("POST", "/v1/tasks", Tenant), Ordinary, post(create_task)),
        (r("GET", "/v1/tasks/{id}", Tenant), Ordinary, get(get_task)),
        (
            r("DELETE", "/v1/tasks/{id}", Tenant),
            Ordinary,
            delete(cancel_task),
        ),
        (
            r("POST", "/v1/workflows", Tenant),
            Ordinary,
            post(create_workflow),
        ),
        (
            r("GET", "/v1/workflows/{id}", Tenant),
            Ordinary,
            get(get_workflow),
        ),
        (
            r("POST", "/v1/workflows/{id}/signals/{name}", Tenant),
            Ordinary,
            post(signal_workflow),
        ),
        (
            r("POST", "/v1/blobs", Tenant),
            Transfer,
            post(upload_blob).layer(DefaultBodyLimit::disable()),
        ),
        (
            r("GET", "/v1/blobs/{hash}", Tenant),
            Ordinary,
            get(download_blob),
        ),
        (r("GET", "/v1/gpus", Tenant), Ordinary, get(gpus)),
        (r("GET", "/v1/usage", Tenant), Ordinary, get(usage)),
        (r("GET", "/metrics", Public), Ordinary, get(metrics)),
        (
            r("GET", "/healthz", Public),
            Ordinary,
            get(|| async { Json(json!({ "status": "ok" })) }),
        ),
        (r("GET", "/readyz", Public), Ordinary, get(readyz)),
    ]
}

/// Every route of the router, in the order it is built.
pub fn routes() -> Vec<Route> {
    table().into_iter().map(|(r, _, _)| r).collect()
}

pub(crate) fn router(state: AppState) -> Router {
    let c = &state.0.config;
    let limit = c.body_limit_bytes;
    let ordinary = Bounds::new(
        c.http.max_requests,
        Duration::from_millis(c.http.request_timeout_ms),
        "requests",
    );
    let transfers = Bounds::new(
        c.http.max_transfers,
        Duration::from_millis(c.http.transfer_timeout_ms),
        "transfers",
    );
    let mut routes = Router::new();
    for (route, class, handler) in table() {
        let handler = match class {
            Class::Ordinary => ordinary.apply(handler),
            Class::Transfer => transfers.apply(handler),
            // Counted by the handler, for as long as the stream lasts.
            Class::Stream => handler,
        };
        routes = routes.route(route.path, handler);
    }
    let routes = routes
        .fallback(|| async {
            GatewayError::NotFound {
                kind: "route",
                id: String::new(),
            }
        })
        .layer(DefaultBodyLimit::max(limit));
    crate::layers::wrap(routes, state)
}

/// SHA-256 of a token: what the router keeps and compares.
pub(crate) fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Per-key counts under a bound (streams per tenant, tasks per tenant).
#[derive(Default, Clone)]
pub(crate) struct Counts(Arc<Mutex<HashMap<String, usize>>>);

impl Counts {
    /// One more for `key` unless it holds `max` already.
    pub fn take(&self, key: &str, max: usize) -> Option<CountGuard> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.to_owned()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(CountGuard {
            counts: self.clone(),
            key: key.to_owned(),
        })
    }

    /// Counts held for `key` now.
    pub fn get(&self, key: &str) -> usize {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(key).copied().unwrap_or(0)
    }

    fn give_back(&self, key: &str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(key);
            }
        }
    }
}

/// One count held; given back on drop.
pub(crate) struct CountGuard {
    counts: Counts,
    key: String,
}

impl Drop for CountGuard {
    fn drop(&mut self) {
        self.counts.give_back(&self.key);
    }
}

/// Most stream tickets alive at once.
pub const MAX_TICKETS: usize = 10_000;

struct Ticket {
    tenant: String,
    session: String,
    expires: tokio::time::Instant,
}

/// One-use tickets that open one session's event stream without a bearer
/// token (a browser's `EventSource` cannot send one, and a token in a URL
/// ends up in logs and histories). In memory: a restart voids them.
#[derive(Default)]
pub(crate) struct Tickets(Mutex<HashMap<[u8; 32], Ticket>>);

impl Tickets {
    fn issue(&self, tenant: &str, session: &str, ttl: Duration) -> Result<String, GatewayError> {
        let now = tokio::time::Instant::now();
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, t| t.expires > now);
        if m.len() >= MAX_TICKETS {
            return Err(GatewayError::Overloaded {
                reason: format!("{MAX_TICKETS} stream tickets are outstanding"),
                retry_after: ttl,
            });
        }
        let ticket = format!(
            "{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        );
        m.insert(
            digest(&ticket),
            Ticket {
                tenant: tenant.to_owned(),
                session: session.to_owned(),
                expires: now + ttl,
            },
        );
        Ok(ticket)
    }

    /// The tenant of `ticket` if it opens `session` now; used up either way.
    fn redeem(&self, ticket: &str, session: &str) -> Option<String> {
        let t = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&digest(ticket))?;
        (t.session == session && t.expires > tokio::time::Instant::now()).then_some(t.tenant)
    }
}

/// The tenant of the request's bearer token, and its quota.
pub(crate) struct TenantName(String, Quota);

/// The token of an `Authorization` header (RFC 9110 section 11.6.2: the
/// scheme is case-insensitive; RFC 6750: `Bearer` and a token68).
fn bearer(value: &[u8]) -> Result<&str, GatewayError> {
    let v = std::str::from_utf8(value).map_err(|_| GatewayError::BadToken)?;
    let (scheme, rest) = v.split_once(' ').ok_or(GatewayError::Unauthorized)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(GatewayError::Unauthorized);
    }
    let token = rest.trim_matches(' ');
    let token68 = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
    if token.is_empty() || !token.chars().all(token68) {
        return Err(GatewayError::BadToken);
    }
    Ok(token)
}

impl AppState {
    /// The tenant a token identifies: every tenant's digest is compared,
    /// in constant time, whatever matches.
    fn tenant_of(&self, token: &str) -> Result<TenantName, GatewayError> {
        let d = digest(token);
        let mut hit = None;
        for (i, t) in self.0.tenants.iter().enumerate() {
            if bool::from(t.digest.ct_eq(&d)) {
                hit = Some(i);
            }
        }
        let t = &self.0.tenants[hit.ok_or(GatewayError::BadToken)?];
        Ok(TenantName(t.name.clone(), t.quota.clone()))
    }
}

impl FromRequestParts<AppState> for TenantName {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, GatewayError> {
        if state.0.tenants.is_empty() {
            return Ok(TenantName(
                ANONYMOUS_TENANT.into(),
                state.0.config.quota.clone(),
            ));
        }
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or(GatewayError::Unauthorized)?;
        let r = state.tenant_of(bearer(value.as_bytes())?);
        if r.is_err() {
            metrics::counter!("troupe_gateway_refused_total", "reason" => "bad_token").increment(1);
        }
        r
    }
}

/// JSON bodies with the gateway's error format (400 naming the field, 413).
pub(crate) struct ApiJson<T>(T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = GatewayError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, GatewayError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(GatewayError::TooLarge {
                limit: state.0.config.body_limit_bytes,
            }),
            Err(JsonRejection::JsonDataError(e)) => Err(GatewayError::BadRequest(e.body_text())),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(GatewayError::BadRequest(e.body_text())),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(GatewayError::BadRequest(
                "expected a JSON body with `Content-Type: application/json`".into(),
            )),
            Err(other) => Err(GatewayError::BadRequest(other.body_text())),
        }
    }
}

fn accepted(location: String, body: Value) -> Response {
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response()
}

impl AppState {
    async fn session(&self, tenant: &str, id: &str) -> Result<SessionView, GatewayError> {
        let not_found = || GatewayError::NotFound {
            kind: "session",
            id: id.to_owned(),
        };
        if troupe_agent::session::session_pid(id).is_err() {
            return Err(not_found());
        }
        // Unknown ids are refused from the journal, activating nothing.
        match self.0.troupe.sessions().view(id).await {
            Ok(v) if v.tenant.as_deref() == Some(tenant) => Ok(v),
            Ok(_) | Err(troupe_agent::AgentError::UnknownSession(_)) => Err(not_found()),
            Err(e) => Err(e.into()),
        }
    }

    /// The degrade policy: refuse low priorities early when the GPUs are busy.
    async fn admit(&self, priority: u8) -> Result<(), GatewayError> {
        let d = &self.0.config.degrade;
        let util = self.0.utilization.load(Ordering::Relaxed);
        let top = (troupe_gpu::scheduler::PRIORITIES - 1) as u8;
        let refused = (util > d.top_only_above_pct && priority < top)
            || (util > d.refuse_lowest_above_pct && priority == 0);
        if refused {
            metrics::counter!("troupe_gateway_refused_total", "reason" => "degraded").increment(1);
            return Err(GatewayError::Overloaded {
                reason: format!(
                    "GPUs at {util}% utilization: priority {priority} refused by the degrade policy"
                ),
                retry_after: Duration::from_secs(2),
            });
        }
        Ok(())
    }

    /// Whether `tenant` uploaded the blob `hash` (storage is shared and
    /// deduplicated; access is per tenant).
    async fn owns_blob(&self, tenant: &str, hash: &str) -> Result<bool, GatewayError> {
        Ok(self
            .owner("blob", &format!("{tenant}.{hash}"))
            .await?
            .as_deref()
            == Some(tenant))
    }

    async fn owner(&self, kind: &str, id: &str) -> Result<Option<String>, GatewayError> {
        Ok(self.owner_record(kind, id).await?.map(|o| o.tenant))
    }

    async fn owner_record(&self, kind: &str, id: &str) -> Result<Option<Owner>, GatewayError> {
        let Ok(pid) = PersistenceId::new("owner", &format!("{kind}.{id}")) else {
            return Ok(None);
        };
        let events = self.0.journal().replay(&pid, 1, 1).collect_all().await?;
        Ok(events.first().and_then(|e| e.decode::<Owner>().ok()))
    }
}

#[derive(serde::Serialize, Deserialize)]
struct Owner {
    tenant: String,
    /// SHA-256 of the request that created it, when it came with an
    /// `Idempotency-Key` (a retry must send the same request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request: Option<String>,
}

/// Longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// The request's `Idempotency-Key`, if any (printable ASCII, at most
/// [`MAX_IDEMPOTENCY_KEY`] bytes).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, GatewayError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let b = v.as_bytes();
    if b.is_empty() || b.len() > MAX_IDEMPOTENCY_KEY || !b.iter().all(|c| c.is_ascii_graphic()) {
        return Err(GatewayError::BadRequest(format!(
            "`Idempotency-Key` must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
        )));
    }
    Ok(Some(String::from_utf8_lossy(b).into_owned()))
}

/// A stable id for what `tenant` created under `key` (`what` apart).
fn keyed_id(what: &str, tenant: &str, key: &str) -> String {
    hex24(&keyed_digest(what, tenant, key))
}

fn keyed_digest(what: &str, tenant: &str, key: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [what, tenant, key] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

fn hex24(bytes: &[u8]) -> String {
    bytes[..12].iter().map(|b| format!("{b:02x}")).collect()
}

impl Schema for Owner {
    const TYPE_NAME: &'static str = "gateway.Owner";
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewSession {
    /// The agent that answers it (the configured session agent if absent).
    agent: Option<String>,
}

/// `POST /v1/sessions`. With an `Idempotency-Key`, the session id derives
/// from the tenant and the key: a retry opens the same session (201 with
/// the same id); the same key for another agent is 422.
async fn create_session(
    State(st): State<AppState>,
    TenantName(tenant, _): TenantName,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, GatewayError> {
    let key = idempotency_key(&headers)?;
    let body: NewSession = if body.iter().all(u8::is_ascii_whitespace) {
        NewSession::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| GatewayError::BadRequest(e.to_string()))?
    };
    let agent = body
        .agent
        .unwrap_or_else(|| st.0.config.session_agent.clone());
    if !st.0.troupe.agents().agents().contains(&agent) {
        return Err(GatewayError::BadRequest(format!(
            "no agent named `{agent}` answers sessions here"
        )));
    }
    let sessions = st.0.troupe.sessions();
    let id = match key {
        None => sessions.create(&agent, Some(&tenant)).await?,
        Some(k) => {
            // 32 hex digits, as a fresh id has.
            let id: String = keyed_digest("session", &tenant, &k)[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            match sessions.open(&id, &agent, Some(&tenant)).await {
                Ok(()) => id,
                Err(troupe_agent::AgentError::Invalid { .. }) => {
                    return Err(GatewayError::KeyReused(format!(
                        "this `Idempotency-Key` opened session `{id}` for another agent"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/sessions/{id}"))],
        Json(json!({ "id": id, "events": format!("/v1/sessions/{id}/events") })),
    )
        .into_response())
}

async fn get_session(
    State(st): State<AppState>,
    TenantName(tenant, _): TenantName,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, GatewayError> {
    Ok(Json(st.session(&tenant, &id).await?))
}

/// The body of `POST /v1/sessions/{id}/approvals/{call}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalBody {
    /// Whether the call may run.
    approve: bool,
    /// Why (the model is told on a rejection).
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /v1/sessions/{id}/approvals/{call}`: decides a tool call that
/// waits for approval. The decision is journaled before the 200; the
/// first one stands and any other gets 409, as does one after the deadline.
async fn decide_approval(
    State(st): State<AppState>,
    TenantName(tenant, _): TenantName,
    Path((id, call)): Path<(String, String)>,
    ApiJson(body): ApiJson<ApprovalBody>,
) -> Result<Json<Value>, GatewayError> {
    st.session(&tenant, &id).await?;
    let mut decision = if body.approve {
        troupe_agent::Decision::approve()
    } else {
        troupe_agent::Decision::reject(body.reason.clone().unwrap_or_default())
    };
    decision = decision.by(tenant);
    if let Some(why) = body.reason.filter(|_| body.approve) {
        decision = decision.reason(why);
    }
    let decided = st.0.troupe.sessions().decide(&id, &call, decision).await?;
    Ok(Json(json!({
        "session": id,
        "call_id": call,
        "approved": decided.approved,
        "by": decided.by,
        "reason": decided.reason,
        "seq": decided.seq,
    })))
}

#[derive(Deserialize)]
struct NewMessage {
    content: String,
    /// Blobs uploaded with `POST /v1/blobs`, sent with the message.
    #[serde(default)]
    attachments: Vec<troupe_journal::BlobRef>,
}

/// `POST /v1/sessions/{id}/messages`. With an `Idempotency-Key`, the task
/// id derives from the key and the key is journaled in the turn's own
/// event: the same message sent again gets the first answer (while its
/// turn runs, after it ended, after a restart), another message 422.
async fn post_message(
    State(st): State<AppState>,
    TenantName(tenant, quota): TenantName,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<NewMessage>,
) -> Result<Response, GatewayError> {
    let key = idempotency_key(&headers)?.map(|k| keyed_id("message", &tenant, &k));
    let view = st.session(&tenant, &id).await?;
    let answer = |task_id: &str, posted: troupe_agent::Posted| {
        accepted(
            format!("/v1/tasks/{task_id}"),
            json!({ "task_id": task_id, "turn": posted.turn, "seq": posted.seq }),
        )
    };
    // A retry: its task exists (the task is journaled before the turn).
    if let Some(task_id) = &key
        && let Some(task) = st.0.tasks.kind_of(&tenant, task_id).await?
    {
        let reused = || {
            GatewayError::KeyReused(format!(
                "this `Idempotency-Key` was used for another request (task `{task_id}`)"
            ))
        };
        if !matches!(&task, TaskKind::SessionTurn { session, .. } if *session == id) {
            return Err(reused());
        }
        return match st
            .0
            .troupe
            .sessions()
            .keyed_turn(&id, task_id, &body.content, &body.attachments)
            .await?
        {
            Some(posted) => Ok(answer(task_id, posted)),
            None => Err(GatewayError::Conflict(format!(
                "the first request with this `Idempotency-Key` has not posted its turn: it is \
                 still in flight, or it failed before (task `{task_id}` says which)"
            ))),
        };
    }
    // A busy session refuses before any attachment is looked up.
    if let Some(p) = view.pending {
        return Err(GatewayError::Conflict(format!(
            "session `{id}` is busy with turn {}; wait for it to finish",
            p.turn
        )));
    }
    if !body.attachments.is_empty() {
        let blobs = st.0.troupe.tiered().map(|t| t.blobs()).ok_or_else(|| {
            GatewayError::BadRequest("`attachments` need blob storage (a [storage] section)".into())
        })?;
        if body.attachments.len() > troupe_agent::MAX_ATTACHMENTS {
            return Err(GatewayError::BadRequest(format!(
                "at most {} attachments per message",
                troupe_agent::MAX_ATTACHMENTS
            )));
        }
        for a in &body.attachments {
            // Another tenant's blob is as absent as one never uploaded.
            let size = if st.owns_blob(&tenant, &a.hash.to_string()).await? {
                blobs.size_of(&a.hash).await?
            } else {
                None
            };
            match size {
                Some(size) if size == a.size => {}
                Some(size) => {
                    return Err(GatewayError::BadRequest(format!(
                        "attachment {} has {size} bytes, not {}",
                        a.hash, a.size
                    )));
                }
                None => {
                    return Err(GatewayError::BadRequest(format!(
                        "attachment {} is not stored (upload it with POST /v1/blobs first)",
                        a.hash
                    )));
                }
            }
        }
    }
    st.admit(st.0.config.session_priority).await?;
    let permit = st.0.tasks.reserve()?;
    // The task first, then the turn, then the queue: a crash in between
    // leaves a task that finds its turn never posted, never a posted turn
    // that nobody answers.
    let task = TaskKind::SessionTurn {
        session: id.clone(),
        turn: view.turns + 1,
    };
    let (task_id, created) =
        st.0.tasks
            .journal_new(&tenant, quota.max_tasks, key.clone(), task)
            .await?;
    if !created {
        // The same request, concurrently: its first copy posts the turn.
        return Err(GatewayError::Conflict(format!(
            "a request with this `Idempotency-Key` is in flight (task `{task_id}`)"
        )));
    }
    // The task's worker hands the turn to the session's agent.
    let posted = match st
        .0
        .troupe
        .sessions()
        .post_keyed(
            &id,
            &body.content,
            body.attachments,
            troupe_agent::Dispatch::Later,
            key,
        )
        .await
    {
        Ok(p) if p.turn == view.turns + 1 && !p.repeated => p,
        Ok(p) => {
            // Another request posted in between; this turn is not ours.
            st.0.tasks
                .abandon(
                    &task_id,
                    format!("turn {} was taken by another message", p.turn),
                )
                .await?;
            return Err(GatewayError::Conflict(format!(
                "session `{id}` took another message first"
            )));
        }
        Err(e) => {
            st.0.tasks.abandon(&task_id, e.to_string()).await?;
            return Err(e.into());
        }
    };
    st.0.tasks.enqueue(permit, task_id.clone());
    Ok(answer(&task_id, posted))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct After {
    after: Option<u64>,
    /// A stream ticket (`POST /v1/sessions/{id}/tickets`) instead of a
    /// bearer token.
    ticket: Option<String>,
}

async fn session_events(
    State(st): State<AppState>,
    caller: Result<TenantName, GatewayError>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<After>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, GatewayError> {
    let TenantName(tenant, quota) = match (&q.ticket, caller) {
        (Some(ticket), _) => {
            let tenant =
                st.0.tickets
                    .redeem(ticket, &id)
                    .ok_or(GatewayError::BadToken)?;
            let quota =
                st.0.tenants
                    .iter()
                    .find(|t| t.name == tenant)
                    .map_or_else(|| st.0.config.quota.clone(), |t| t.quota.clone());
            TenantName(tenant, quota)
        }
        (None, caller) => caller?,
    };
    st.session(&tenant, &id).await?;
    let after = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                GatewayError::BadRequest("`Last-Event-ID` must be a sequence number".into())
            })?,
        None => q.after.unwrap_or(0),
    };
    let http = &st.0.config.http;
    let overloaded = |reason: String| {
        metrics::counter!("troupe_gateway_refused_total", "reason" => "streams").increment(1);
        GatewayError::Overloaded {
            reason,
            retry_after: Duration::from_secs(1),
        }
    };
    // Held for as long as the stream lasts.
    let global = st.0.streams.clone().try_acquire_owned().map_err(|_| {
        overloaded(format!(
            "{} event streams are open (http.max_streams)",
            http.max_streams
        ))
    })?;
    let own =
        st.0.tenant_streams
            .take(&tenant, quota.max_streams)
            .ok_or_else(|| {
                overloaded(format!(
                    "tenant `{tenant}` has {} event streams open (quota.max_streams)",
                    quota.max_streams
                ))
            })?;
    let stream = st.0.troupe.sessions().subscribe(&id, after).await?;
    let id_ = id.clone();
    let open = metrics::gauge!("troupe_gateway_streams");
    open.increment(1.0);
    let held = StreamHold {
        _slot: global,
        _tenant: own,
        open,
    };
    let events = stream
        .take_while(move |item| {
            if let Err(e) = item {
                tracing::warn!(session = %id_, error = %e, "session stream ended");
            }
            std::future::ready(item.is_ok())
        })
        .filter_map(move |item| {
            let _held = &held;
            std::future::ready(match item {
                Ok(SessionItem::Event(rec)) => {
                    let data = serde_json::to_value(&rec.event).unwrap_or(Value::Null);
                    let kind = data["type"].as_str().unwrap_or("event").to_owned();
                    Some(Ok(Event::default()
                        .id(rec.seq.to_string())
                        .event(kind)
                        .data(data.to_string())))
                }
                Ok(SessionItem::Heartbeat) => Some(Ok(Event::default().comment("heartbeat"))),
                Err(_) => None,
            })
        });
    Ok(Sse::new(events))
}

/// What an open event stream holds: its global slot, its tenant's count,
/// its place in `troupe_gateway_streams`.
struct StreamHold {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _tenant: CountGuard,
    open: metrics::Gauge,
}

impl Drop for StreamHold {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

/// `POST /v1/sessions/{id}/tickets`: a one-use ticket that opens this
/// session's event stream within `http.ticket_ttl_ms`, for a browser's
/// `EventSource` (`GET .../events?ticket=...`), which cannot send a
/// bearer token.
async fn create_ticket(
    State(st): State<AppState>,
    TenantName(tenant, _): TenantName,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    st.session(&tenant, &id).await?;
    let ttl = Duration::from_millis(st.0.config.http.ticket_ttl_ms);
    let ticket = st.0.tickets.issue(&tenant, &id, ttl)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "ticket": ticket,
            "expires_in_ms": ttl.as_millis() as u64,
            "events": format!("/v1/sessions/{id}/events?ticket={ticket}"),
        })),
    )
        .into_response())
}

#[derive(Deserialize)]
struct NewTask {
    prompt: String,
    #[serde(default = "default_priority")]
    priority: u8,
    max_tokens: Option<u32>,
}

fn default_priority() -> u8 {
    1
}

fn task_json(id: &str, t: &TaskState) -> Value {
    json!({
        "id": id,
        "task": t.task,
        "state": t.status,
        "attempts": t.attempts,
        "submitted_ms": t.submitted_ms,
        "ended_ms": t.ended_ms,
    })
}

async fn create_task(
    State(st): State<AppState>,
    TenantName(tenant, quota): TenantName,
    headers: HeaderMap,
    ApiJson(body): ApiJson<NewTask>,
) -> Result<Response, GatewayError> {
    let key = idempotency_key(&headers)?;
    if body.priority > quota.max_priority {
        return Err(GatewayError::BadRequest(format!(
            "`priority` must be 0 to {} for this tenant (quota.max_priority)",
            quota.max_priority
        )));
    }
    if body.prompt.is_empty() {
        return Err(GatewayError::BadRequest(
            "`prompt` must not be empty".into(),
        ));
    }
    let max_tokens = match body.max_tokens {
        Some(n) if n > quota.max_tokens || n == 0 => {
            return Err(GatewayError::BadRequest(format!(
                "`max_tokens` must be 1 to {} for this tenant (quota.max_tokens)",
                quota.max_tokens
            )));
        }
        Some(n) => n,
        None => quota.max_tokens,
    };
    let task = TaskKind::Inference {
        prompt: body.prompt,
        priority: body.priority,
        max_tokens: Some(max_tokens),
    };
    let answer = |id: &str| {
        accepted(
            format!("/v1/tasks/{id}"),
            json!({ "task_id": id, "state": { "status": "queued" } }),
        )
    };
    // A retry of a request that was accepted gets the first answer, even
    // when the server is busy now.
    let id = key.as_deref().map(|k| keyed_id("task", &tenant, k));
    if let Some(id) = &id
        && st.0.tasks.same_request(&tenant, id, &task).await?
    {
        return Ok(answer(id));
    }
    st.admit(body.priority).await?;
    let permit = st.0.tasks.reserve()?;
    let id =
        st.0.tasks
            .submit(permit, &tenant, quota.max_tasks, id, task)
            .await?;
    Ok(answer(&id))
}

async fn get_task(
    State(st): State<AppState>,
    TenantName(tenant, _): TenantName,
    Path(id): Path<String>,
) -> Result<Json<Value>, GatewayError> {
    let t = st.0.tasks.get(&tenant, &id).await?;
    Ok(Json(task_json(&id, &t)))
}

async fn cancel_task(
    State(st): State<AppState>,
    TenantName(tenant, _): TenantName,
    Path(id): Path<String>,
) -> Result<Json<Value>, GatewayError> {
    let t =
        st.0.tasks
            .cancel(&tenant, &id, st.0.troupe.agents())
            .await?;
    Ok(Json(task_json(&id, &t)))
}

#[derive(Deserialize)]
struct NewWorkflow {
    definition: String,
    #[serde(default)]
    input: Value,
}

async fn create_workflow(
    State(st): State<AppState>,
    TenantName(tenant, quota): TenantName,
    headers: HeaderMap,
    ApiJson(body): ApiJson<NewWorkflow>,
) -> Result<Response, GatewayError> {
    let key = idempotency_key(&headers)?;
    let sagas = st.0.troupe.sagas();
    if !sagas.has_definition(&body.definition) {
        return Err(troupe_saga::SagaError::UnknownDefinition(body.definition).into());
    }
    let answer = |id: &str| accepted(format!("/v1/workflows/{id}"), json!({ "workflow_id": id }));
    let request = key.as_ref().map(|_| {
        let bytes = serde_json::to_vec(&json!([&body.definition, &body.input])).unwrap_or_default();
        hex24(&Sha256::digest(&bytes))
    });
    let id = match &key {
        Some(k) => format!("{}-k{}", body.definition, keyed_id("workflow", &tenant, k)),
        None => sagas.new_id(&body.definition, ""),
    };
    let pid = PersistenceId::new("owner", &format!("workflow.{id}"))?;
    let owner = Owner {
        tenant: tenant.clone(),
        request: request.clone(),
    };
    // A retry: the first answer, once the workflow has surely started.
    if key.is_some()
        && let Some(first) = st.owner_record("workflow", &id).await?
    {
        return if first.tenant == tenant && first.request == request {
            start_once(&st, &tenant, quota.max_workflows, &id, &body).await?;
            Ok(answer(&id))
        } else {
            Err(GatewayError::KeyReused(format!(
                "this `Idempotency-Key` was used for another request (workflow `{id}`)"
            )))
        };
    }
    // The draft step's inference runs at the default lease priority.
    st.admit(crate::lease(&st.0.config).priority).await?;
    // Counted before its owner is written: a workflow refused by the
    // quota leaves nothing behind.
    take_workflow(&st, &tenant, quota.max_workflows, &id)?;
    // The owner first: a crash before the start leaves an owner whose
    // retry starts it; never a workflow nobody can see.
    let written =
        st.0.journal()
            .append(&pid, 0, vec![NewEvent::new(&owner)?])
            .await;
    if written.is_err() {
        st.0.workflows.forget(&tenant, &id);
    }
    match written {
        Ok(_) => {}
        // A concurrent retry with the same key wrote it first.
        Err(troupe_journal::JournalError::SeqConflict { .. }) if key.is_some() => {
            return match st.owner_record("workflow", &id).await? {
                Some(first) if first.tenant == tenant && first.request == request => {
                    start_once(&st, &tenant, quota.max_workflows, &id, &body).await?;
                    Ok(answer(&id))
                }
                _ => Err(GatewayError::KeyReused(format!(
                    "this `Idempotency-Key` was used for another request (workflow `{id}`)"
                ))),
            };
        }
        Err(e) => return Err(e.into()),
    }
    start_once(&st, &tenant, quota.max_workflows, &id, &body).await?;
    Ok(answer(&id))
}

/// Starts workflow `id` unless it has started already, counted against
/// `tenant`'s `quota.max_workflows` while it runs.
async fn start_once(
    st: &AppState,
    tenant: &str,
    max_workflows: usize,
    id: &str,
    body: &NewWorkflow,
) -> Result<(), GatewayError> {
    let pid = PersistenceId::new("saga", id)?;
    if st.0.journal().highest_seq(&pid).await? > 0 {
        return Ok(());
    }
    take_workflow(st, tenant, max_workflows, id)?;
    let started =
        st.0.troupe
            .sagas()
            .start_with_id(id, &body.definition, body.input.clone())
            .await;
    match started {
        Ok(()) => {}
        Err(troupe_saga::SagaError::Journal(e))
            if matches!(*e, troupe_journal::JournalError::SeqConflict { .. }) => {}
        Err(e) => {
            st.0.workflows.forget(tenant, id);
            return Err(e.into());
        }
    }
    st.0.workflows.started(tenant, id);
    Ok(())
}

/// Counts workflow `id` against `tenant` (429 past `quota.max_workflows`).
fn take_workflow(
    st: &AppState,
    tenant: &str,
    max_workflows: usize,
    id: &str,
) -> Result<(), GatewayError> {
    let sagas = st.0.troupe.sagas();
    st.0.workflows
        .take(tenant, id, max_workflows, |w| sagas.is_running(w))
        .map_err(|n| {
            metrics::counter!("troupe_gateway_refused_total", "reason" => "tenant_workflows")
                .increment(1);
            GatewayError::Overloaded {
                reason: format!(
                    "tenant `{tenant}` has {n} workflows running (quota.max_workflows)"
                ),
                retry_after: Duration::from_secs(1),
            }
        })
}

/// Counts the workflows a restart resumed against their tenants (read
/// from their owner records; one without is nobody's).
pub(crate) async fn count_resumed_workflows(st: &AppState) -> Result<usize, GatewayError> {
    let mut n = 0;
    for id in st.0.troupe.sagas().running_ids() {
        if let Some(tenant) = st.owner("workflow", &id).await? {
            // Accepted before the restart: counted past the quota if need be.
            let _ = st.0.workflows.take(&tenant, &id, usize::MAX, |_| true);
            st.0.workflows.started(&tenant, &id);
            n += 1;
        }
    }
    Ok(n)
}

async fn check_workflow(st: &AppState, tenant: &str, id: &str) -> Result<(), GatewayError> {
    if st.owner("workflow", id).await?.as_deref() == Some(tenant) {
        Ok(())
    } else {
        Err(GatewayError::NotFound {
            kind: "workflow",
            id: id.to_owned(),
        })
    }
}

async fn get_workflow(
    State(st): State<AppState>,
    TenantName(tenant, _): TenantName,
    Path(id): Path<String>,
) -> Result<Json<Value>, GatewayError> {
    check_workflow(&st, &tenant, &id).await?;
    let s = st.0.troupe.sagas().status(&id).await?;
    let steps: Vec<Value> = s
        .steps
        .iter()
        .map(|(name, state)| json!({ "name": name, "state": state }))
        .collect();
    Ok(Json(json!({
        "id": s.id,
        "definition": s.definition,
        "phase": s.phase,
        "steps": steps,
        "error": s.error,
    })))
}

async fn signal_workflow(
    State(st): State<AppState>,
    TenantName(tenant, _): TenantName,
    Path((id, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Response, GatewayError> {
    check_workflow(&st, &tenant, &id).await?;
    let payload = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| GatewayError::BadRequest(format!("signal payload: {e}")))?
    };
    let sagas = st.0.troupe.sagas();
    let delivered = match sagas.signal(&id, &name, payload).await {
        Ok(d) => d,
        // Not running here: finished (409), or starting again (503).
        Err(troupe_saga::SagaError::NotRunning(_))
            if sagas.status(&id).await.is_ok_and(|s| s.phase.is_final()) =>
        {
            return Err(GatewayError::Conflict(format!(
                "workflow `{id}` has finished; it waits for no signal"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    if delivered {
        Ok(accepted(
            format!("/v1/workflows/{id}"),
            json!({ "delivered": true }),
        ))
    } else {
        Err(GatewayError::Conflict(format!(
            "workflow `{id}` is not waiting for signal `{name}`"
        )))
    }
}

/// `GET /v1/usage`: the caller's share of each per-tenant quota, used and
/// allowed.
async fn usage(
    State(st): State<AppState>,
    TenantName(tenant, quota): TenantName,
) -> Result<Json<Value>, GatewayError> {
    let blob_bytes = match st.0.troupe.tiered().map(|t| t.blobs()) {
        Some(blobs) => {
            st.0.blob_usage
                .tenant(&tenant, st.0.journal().as_ref(), blobs)
                .await?
                .used()
        }
        None => 0,
    };
    let sagas = st.0.troupe.sagas();
    let share = |used: u64, max: u64| json!({ "used": used, "max": max });
    Ok(Json(json!({
        "tenant": tenant,
        "tasks": share(st.0.tasks.tenant_count(&tenant) as u64, quota.max_tasks as u64),
        "streams": share(st.0.tenant_streams.get(&tenant) as u64, quota.max_streams as u64),
        "uploads": share(st.0.tenant_uploads.get(&tenant) as u64, quota.max_uploads as u64),
        "blob_bytes": share(blob_bytes, quota.max_blob_bytes),
        "workflows": share(
            st.0.workflows.count(&tenant, |w| sagas.is_running(w)) as u64,
            quota.max_workflows as u64,
        ),
        "max_priority": quota.max_priority,
        "max_tokens": quota.max_tokens,
        "max_lease_hold_ms": quota.max_lease_hold_ms,
    })))
}

async fn gpus(State(st): State<AppState>, _t: TenantName) -> Result<Json<Value>, GatewayError> {
    let Some(gpu) = st.0.troupe.gpu() else {
        return Ok(Json(json!({ "devices": [] })));
    };
    let status = gpu.status().await.map_err(|e| GatewayError::Unavailable {
        reason: "the GPU supervisor".into(),
        retry_after: e.retry_after().unwrap_or(Duration::from_secs(1)),
        cause: Some(std::sync::Arc::new(e)),
    })?;
    let devices: Vec<Value> = status
        .iter()
        .map(|s| {
            json!({
                "index": s.device.index,
                "healthy": s.device.healthy,
                "memory_bytes": s.device.memory,
                "compute_pct": s.device.compute,
                "leased_memory_bytes": s.leased.0,
                "leased_compute_pct": s.leased.1,
                "utilization_pct": s.utilization_pct,
                // Fields the device refused to report (a MIG instance
                // refuses utilization): unknown, not a failure.
                "refused": s.refused.iter()
                    .map(|(field, reason)| json!({ "field": field, "reason": reason }))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "devices": devices })))
}

/// `GET /metrics`: Prometheus text; with `http.metrics_token` set, only
/// for a request bearing that token (a tenant's token is not enough).
async fn metrics(State(st): State<AppState>, headers: HeaderMap) -> Result<Response, GatewayError> {
    if let Some(want) = &st.0.metrics_token {
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(GatewayError::Unauthorized)?;
        let got = digest(bearer(value.as_bytes())?);
        if !bool::from(want.ct_eq(&got)) {
            metrics::counter!("troupe_gateway_refused_total", "reason" => "bad_token").increment(1);
            return Err(GatewayError::BadToken);
        }
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.0.metrics.render(),
    )
        .into_response())
}

async fn readyz(State(st): State<AppState>) -> Response {
    let parts = st.0.troupe.readiness();
    if !st.0.ready.load(Ordering::SeqCst) {
        GatewayError::unavailable("starting or stopping").into_response()
    } else if !parts.is_ready() {
        let what = if parts.gpus == Some(false) {
            "the GPU supervisor is restarting"
        } else {
            "the durable timers are restarting"
        };
        GatewayError::unavailable(what).into_response()
    } else {
        Json(json!({ "status": "ready" })).into_response()
    }
}

fn blob_store(st: &AppState) -> Result<&troupe_journal::BlobStore, GatewayError> {
    st.0.troupe
        .tiered()
        .map(|t| t.blobs())
        .ok_or_else(|| GatewayError::NotFound {
            kind: "route",
            id: "/v1/blobs (blob storage is not configured: add a [storage] section)".into(),
        })
}

fn blob_error(e: troupe_journal::JournalError) -> GatewayError {
    use troupe_journal::JournalError as J;
    match e {
        J::BlobTooLarge { limit, .. } => GatewayError::TooLarge {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
        },
        J::InvalidName { .. } | J::BlobUpload { .. } => GatewayError::BadRequest(e.to_string()),
        J::BlobMissing { hash } => GatewayError::NotFound {
            kind: "blob",
            id: hash,
        },
        other => other.into(),
    }
}

/// `POST /v1/blobs`: the body is stored as it arrives (never held whole);
/// its `Content-Type` is the media type. 201 with the reference. The
/// bytes are stored once whoever uploads them; the reference is the
/// uploading tenant's, and so is the charge against its
/// `quota.max_blob_bytes` (413 past it) and `quota.max_uploads` (429).
async fn upload_blob(
    State(st): State<AppState>,
    TenantName(tenant, quota): TenantName,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, GatewayError> {
    let blobs = blob_store(&st)?;
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or("application/octet-stream")
        .to_owned();
    let _slot =
        st.0.tenant_uploads
            .take(&tenant, quota.max_uploads)
            .ok_or_else(|| {
                metrics::counter!("troupe_gateway_refused_total", "reason" => "tenant_uploads")
                    .increment(1);
                GatewayError::Overloaded {
                    reason: format!(
                        "tenant `{tenant}` has {} blob uploads in flight (quota.max_uploads)",
                        quota.max_uploads
                    ),
                    retry_after: Duration::from_secs(1),
                }
            })?;
    let ledger =
        st.0.blob_usage
            .tenant(&tenant, st.0.journal().as_ref(), blobs)
            .await?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let over = |ledger: &crate::quota::TenantBlobs| {
        ledger.used().saturating_add(declared.max(1)) > quota.max_blob_bytes
    };
    // Near the quota: blobs the collector removed count no more.
    if over(&ledger) {
        ledger.reconcile(blobs).await?;
    }
    let quota_error = |used: u64| {
        metrics::counter!("troupe_gateway_refused_total", "reason" => "tenant_blob_bytes")
            .increment(1);
        GatewayError::Quota(format!(
            "tenant `{tenant}` holds {used} bytes of blobs; this upload would pass its \
             {} (quota.max_blob_bytes)",
            quota.max_blob_bytes
        ))
    };
    if over(&ledger) {
        return Err(quota_error(ledger.used()));
    }
    // Every part is charged as it arrives: uploads in flight together
    // cannot pass the quota.
    let charge = Arc::new(crate::quota::Charge::new(
        ledger.clone(),
        quota.max_blob_bytes,
    ));
    let charged = {
        let charge = charge.clone();
        body.into_data_stream().map(move |part| {
            let part = part.map_err(|e| e.to_string())?;
            if charge.add(part.len() as u64) {
                Ok(part)
            } else {
                Err("over the tenant's blob quota".to_owned())
            }
        })
    };
    let blob = match blobs.put_stream(&media_type, charged).await {
        Ok(blob) => blob,
        Err(_) if charge.exceeded() => return Err(quota_error(ledger.used())),
        Err(e) => return Err(blob_error(e)),
    };
    let pid = PersistenceId::new("owner", &format!("blob.{tenant}.{}", blob.hash))?;
    let owner = Owner {
        tenant: tenant.clone(),
        request: None,
    };
    match st
        .0
        .journal()
        .append(&pid, 0, vec![NewEvent::new(&owner)?])
        .await
    {
        // Uploaded by this tenant before.
        Ok(_) | Err(troupe_journal::JournalError::SeqConflict { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    charge.keep(blob.hash, blob.size);
    let location = format!("/v1/blobs/{}", blob.hash);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(json!(blob)),
    )
        .into_response())
}

/// `GET /v1/blobs/{hash}`: streams one of the tenant's blobs, checking its
/// hash on the way (a mismatch cuts the response short). At most
/// `http.max_transfers` at once, each cut at `http.transfer_timeout_ms`.
async fn download_blob(
    State(st): State<AppState>,
    TenantName(tenant, _): TenantName,
    Path(hash): Path<String>,
) -> Result<Response, GatewayError> {
    let blobs = blob_store(&st)?;
    let parsed: troupe_journal::BlobHash = hash
        .parse()
        .map_err(|e: troupe_journal::JournalError| GatewayError::BadRequest(e.to_string()))?;
    let not_found = || GatewayError::NotFound {
        kind: "blob",
        id: hash.clone(),
    };
    if !st.owns_blob(&tenant, &parsed.to_string()).await? {
        return Err(not_found());
    }
    let size = blobs.size_of(&parsed).await?.ok_or_else(not_found)?;
    let slot = st.0.downloads.clone().try_acquire_owned().map_err(|_| {
        metrics::counter!("troupe_gateway_refused_total", "reason" => "transfers").increment(1);
        GatewayError::Overloaded {
            reason: "too many blob downloads in flight (http.max_transfers)".into(),
            retry_after: Duration::from_secs(1),
        }
    })?;
    let blob = troupe_journal::BlobRef {
        hash: parsed,
        size,
        media_type: "application/octet-stream".into(),
    };
    let stream = blobs.get_stream(&blob).await.map_err(blob_error)?;
    let deadline = tokio::time::sleep(Duration::from_millis(st.0.config.http.transfer_timeout_ms));
    let body = axum::body::Body::from_stream(
        stream
            .map(move |r| {
                let _slot = &slot;
                r.map_err(std::io::Error::other)
            })
            .take_until(deadline),
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        body,
    )
        .into_response())
}

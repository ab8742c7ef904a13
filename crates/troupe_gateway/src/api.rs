//! The HTTP handlers.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use troupe_agent::{SessionItem, SessionView};
use troupe_journal::{NewEvent, PersistenceId, Schema};

use crate::AppState;
use crate::error::GatewayError;
use crate::tasks::{TaskKind, TaskState};

pub(crate) fn router(state: AppState) -> Router {
    let limit = state.0.config.body_limit_bytes;
    Router::new()
        .route("/v1/sessions", post(create_session))
        .route("/v1/sessions/{id}", get(get_session))
        .route("/v1/sessions/{id}/messages", post(post_message))
        .route("/v1/sessions/{id}/events", get(session_events))
        .route("/v1/tasks", post(create_task))
        .route("/v1/tasks/{id}", get(get_task).delete(cancel_task))
        .route("/v1/workflows", post(create_workflow))
        .route("/v1/workflows/{id}", get(get_workflow))
        .route("/v1/workflows/{id}/signals/{name}", post(signal_workflow))
        .route(
            "/v1/blobs",
            post(upload_blob).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/blobs/{hash}", get(download_blob))
        .route("/v1/gpus", get(gpus))
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .fallback(|| async {
            GatewayError::NotFound {
                kind: "route",
                id: String::new(),
            }
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The tenant of the request's bearer token.
pub(crate) struct TenantName(String);

impl FromRequestParts<AppState> for TenantName {
    type Rejection = GatewayError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, GatewayError> {
        if state.0.tokens.is_empty() {
            return Ok(TenantName("default".into()));
        }
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(GatewayError::Unauthorized)?;
        state
            .0
            .tokens
            .get(token.trim())
            .map(|t| TenantName(t.clone()))
            .ok_or(GatewayError::Unauthorized)
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

    async fn owner(&self, kind: &str, id: &str) -> Result<Option<String>, GatewayError> {
        let Ok(pid) = PersistenceId::new("owner", &format!("{kind}.{id}")) else {
            return Ok(None);
        };
        let events = self.0.journal().replay(&pid, 1, 1).collect_all().await?;
        Ok(events
            .first()
            .and_then(|e| e.decode::<Owner>().ok())
            .map(|o| o.tenant))
    }
}

#[derive(serde::Serialize, Deserialize)]
struct Owner {
    tenant: String,
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

async fn create_session(
    State(st): State<AppState>,
    TenantName(tenant): TenantName,
    body: axum::body::Bytes,
) -> Result<Response, GatewayError> {
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
    let id = st.0.troupe.sessions().create(&agent, Some(&tenant)).await?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/sessions/{id}"))],
        Json(json!({ "id": id, "events": format!("/v1/sessions/{id}/events") })),
    )
        .into_response())
}

async fn get_session(
    State(st): State<AppState>,
    TenantName(tenant): TenantName,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, GatewayError> {
    Ok(Json(st.session(&tenant, &id).await?))
}

#[derive(Deserialize)]
struct NewMessage {
    content: String,
    /// Blobs uploaded with `POST /v1/blobs`, sent with the message.
    #[serde(default)]
    attachments: Vec<troupe_journal::BlobRef>,
}

async fn post_message(
    State(st): State<AppState>,
    TenantName(tenant): TenantName,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<NewMessage>,
) -> Result<Response, GatewayError> {
    let view = st.session(&tenant, &id).await?;
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
            match blobs.size_of(&a.hash).await? {
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
    let task_id = st.0.tasks.journal_new(&tenant, task).await?;
    // The task's worker hands the turn to the session's agent.
    let posted = match st
        .0
        .troupe
        .sessions()
        .post_with(
            &id,
            &body.content,
            body.attachments,
            troupe_agent::Dispatch::Later,
        )
        .await
    {
        Ok(p) if p.turn == view.turns + 1 => p,
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
    Ok(accepted(
        format!("/v1/tasks/{task_id}"),
        json!({ "task_id": task_id, "turn": posted.turn, "seq": posted.seq }),
    ))
}

#[derive(Deserialize)]
struct After {
    after: Option<u64>,
}

async fn session_events(
    State(st): State<AppState>,
    TenantName(tenant): TenantName,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<After>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, GatewayError> {
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
    let stream = st.0.troupe.sessions().subscribe(&id, after).await?;
    let id_ = id.clone();
    let events = stream
        .take_while(move |item| {
            if let Err(e) = item {
                tracing::warn!(session = %id_, error = %e, "session stream ended");
            }
            std::future::ready(item.is_ok())
        })
        .filter_map(|item| {
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
    TenantName(tenant): TenantName,
    ApiJson(body): ApiJson<NewTask>,
) -> Result<Response, GatewayError> {
    if body.priority as usize >= troupe_gpu::scheduler::PRIORITIES {
        return Err(GatewayError::BadRequest(format!(
            "`priority` must be 0 to {}",
            troupe_gpu::scheduler::PRIORITIES - 1
        )));
    }
    if body.prompt.is_empty() {
        return Err(GatewayError::BadRequest(
            "`prompt` must not be empty".into(),
        ));
    }
    st.admit(body.priority).await?;
    let permit = st.0.tasks.reserve()?;
    let task = TaskKind::Inference {
        prompt: body.prompt,
        priority: body.priority,
        max_tokens: body.max_tokens,
    };
    let id = st.0.tasks.submit(permit, &tenant, task).await?;
    Ok(accepted(
        format!("/v1/tasks/{id}"),
        json!({ "task_id": id, "state": { "status": "queued" } }),
    ))
}

async fn get_task(
    State(st): State<AppState>,
    TenantName(tenant): TenantName,
    Path(id): Path<String>,
) -> Result<Json<Value>, GatewayError> {
    let t = st.0.tasks.get(&tenant, &id).await?;
    Ok(Json(task_json(&id, &t)))
}

async fn cancel_task(
    State(st): State<AppState>,
    TenantName(tenant): TenantName,
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
    TenantName(tenant): TenantName,
    ApiJson(body): ApiJson<NewWorkflow>,
) -> Result<Response, GatewayError> {
    let id =
        st.0.troupe
            .sagas()
            .start(&body.definition, body.input)
            .await?;
    let pid = PersistenceId::new("owner", &format!("workflow.{id}"))?;
    let event = NewEvent::new(&Owner { tenant })?;
    st.0.journal().append(&pid, 0, vec![event]).await?;
    Ok(accepted(
        format!("/v1/workflows/{id}"),
        json!({ "workflow_id": id }),
    ))
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
    TenantName(tenant): TenantName,
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
    TenantName(tenant): TenantName,
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
    if st.0.troupe.sagas().signal(&id, &name, payload).await? {
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

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.0.metrics.render(),
    )
        .into_response()
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
/// its `Content-Type` is the media type. 201 with the reference.
async fn upload_blob(
    State(st): State<AppState>,
    TenantName(_tenant): TenantName,
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
    let blob = blobs
        .put_stream(&media_type, body.into_data_stream())
        .await
        .map_err(blob_error)?;
    let location = format!("/v1/blobs/{}", blob.hash);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(json!(blob)),
    )
        .into_response())
}

/// `GET /v1/blobs/{hash}`: streams the blob, checking its hash on the way
/// (a mismatch cuts the response short).
async fn download_blob(
    State(st): State<AppState>,
    TenantName(_tenant): TenantName,
    Path(hash): Path<String>,
) -> Result<Response, GatewayError> {
    let blobs = blob_store(&st)?;
    let parsed: troupe_journal::BlobHash = hash
        .parse()
        .map_err(|e: troupe_journal::JournalError| GatewayError::BadRequest(e.to_string()))?;
    let size = blobs
        .size_of(&parsed)
        .await?
        .ok_or(GatewayError::NotFound {
            kind: "blob",
            id: hash,
        })?;
    let blob = troupe_journal::BlobRef {
        hash: parsed,
        size,
        media_type: "application/octet-stream".into(),
    };
    let stream = blobs.get_stream(&blob).await.map_err(blob_error)?;
    let body = axum::body::Body::from_stream(stream.map(|r| r.map_err(std::io::Error::other)));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        body,
    )
        .into_response())
}

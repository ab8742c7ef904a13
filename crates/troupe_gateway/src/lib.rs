//! # troupe_gateway: Troupe over HTTP
//!
//! AI work does not fit request/response: an inference holds a connection
//! for seconds to minutes and a dropped connection loses it. The gateway
//! accepts work at once (`202 Accepted` with a task id and a `Location`,
//! *after* the work is journaled), lets clients poll or stream, and lets a
//! dropped stream resume from the exact event it last received.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/sessions` | `201`, a new session |
//! | `POST /v1/sessions/{id}/messages` | `202`, the user turn journaled and a task answering it |
//! | `GET /v1/sessions/{id}` | the session's state |
//! | `GET /v1/sessions/{id}/events` | SSE: every event after `Last-Event-ID` (or `?after=N`), then live, `id:` = sequence, heartbeat comments |
//! | `POST /v1/tasks`, `GET /v1/tasks/{id}`, `DELETE /v1/tasks/{id}` | one-off inference tasks: submit (`202`), status, cancel (frees the lease) |
//! | `POST /v1/workflows`, `GET /v1/workflows/{id}`, `POST /v1/workflows/{id}/signals/{name}` | sagas |
//! | `GET /v1/gpus` | devices, utilization, leases |
//! | `GET /metrics`, `GET /healthz`, `GET /readyz` | Prometheus text, liveness, readiness |
//!
//! Every id is scoped to the tenant of the bearer token that created it;
//! another tenant's id answers 404. Errors are JSON
//! (`{"error": {"code", "message"}}`): 400 for malformed input (naming the
//! field), 401, 404, 409, 413 past the body limit, 429 with `Retry-After`
//! on overload (a lease refused, the task queue at its bound, the degrade
//! policy). Internal failures answer 500 with a request-free generic
//! message (the cause is logged); a transient one (a journal that failed
//! for now, an actor restarting, a model server down) answers 503 with
//! `Retry-After`.
//!
//! ## Two ways to run it
//!
//! | you have | use |
//! |---|---|
//! | a `troupe.toml` (or nothing: every field has a default) | [`Server::start`] builds the whole system from a [`GatewayConfig`] and listens: what `troupe serve` runs |
//! | your own [`Troupe`] (your agents, backends, workflows) and maybe your own axum app | [`Gateway::new`] over it, then [`Gateway::router`]: a plain `axum::Router` to serve with [`serve`] or to `merge`/`nest` into yours |
//!
//! A router mounted in your own server gets what a router carries (body
//! limits, tenants, JSON errors with request ids, request time-outs and
//! concurrency, stream caps, `Host` and `Origin` checks, CORS); the
//! connection cap, the header-read time-out and the write time-out belong
//! to the server that runs it: serve it with [`serve`], or give yours the
//! same three bounds (the book's gateway chapter shows hyper's settings).

#![warn(missing_docs)]

mod api;
mod catalogue;
mod config;
mod error;
mod layers;
mod quota;
mod server;
pub mod tasks;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use troupe_agent::{
    Agent, AgentKey, AgentOptions, Inference, LeaseSpec, LocalBackend, ModelBackend, OpenAiBackend,
    OpenAiConfig, SessionConfig,
};
use troupe_gpu::probe::{GpuProbe, SimulatedProbe};
use troupe_journal::{Durability, Journal, JournalConfig};
use troupe_runtime::{Troupe, TroupeBuilder};
use troupe_saga::{RetryPolicy, SagaDefinition, StepContext, StepDef, StepError};

pub use api::{Access, Route, routes};
pub use config::{
    DegradeSection, GatewayConfig, GpuSection, HttpSection, LogFormat, MIN_TOKEN_LEN, ModelConfig,
    PostgresSection, Quota, Tenant,
};
pub use error::GatewayError;
pub use layers::REQUEST_ID;
pub use server::{MAX_HEADER_BYTES, ServeLimits, fit_open_files, serve};
pub use tasks::{TaskKind, TaskState, TaskStatus, Tasks};

/// Buckets of the `inference_latency_seconds` histogram.
pub const INFERENCE_BUCKETS: [f64; 6] = [0.1, 0.5, 1.0, 2.0, 5.0, 10.0];

/// Buckets of `gen_ai_client_token_usage`, as the OpenTelemetry GenAI
/// conventions advise.
pub const GEN_AI_TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

/// Buckets of `gen_ai_client_operation_duration_seconds` (the GenAI
/// conventions' advice).
pub const GEN_AI_DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];

/// Buckets of `gen_ai_client_operation_time_to_first_chunk_seconds` (the
/// GenAI conventions' advice for time to first token).
pub const GEN_AI_FIRST_CHUNK_BUCKETS: [f64; 16] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The Prometheus recorder (installed once per process).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("inference_latency_seconds".into()),
                    &INFERENCE_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("gen_ai_client_token_usage".into()),
                        &GEN_AI_TOKEN_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("gen_ai_client_operation_duration_seconds".into()),
                        &GEN_AI_DURATION_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("gen_ai_client_operation_time_to_first_chunk_seconds".into()),
                        &GEN_AI_FIRST_CHUNK_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_seconds".into()),
                        &[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0],
                    )
                })
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was already installed; /metrics shows only ours"
                );
            }
            catalogue::describe();
            handle
        })
        .clone()
}

/// The tenant of requests when no tenants are configured (a configured
/// tenant may not take this name: it would inherit their data).
pub const ANONYMOUS_TENANT: &str = "default";

/// A tenant as the router knows it: the SHA-256 of its token (compared in
/// constant time), its name and quota.
pub(crate) struct TenantAuth {
    pub digest: [u8; 32],
    pub name: String,
    pub quota: Quota,
}

pub(crate) struct Shared {
    pub config: GatewayConfig,
    pub tenants: Vec<TenantAuth>,
    /// Host names `Host` may carry (`None`: any).
    pub hosts: Option<Vec<String>>,
    /// Open event streams, over all tenants.
    pub streams: Arc<tokio::sync::Semaphore>,
    /// Open event streams per tenant.
    pub tenant_streams: api::Counts,
    /// Blob downloads in flight (uploads are bounded by their route).
    pub downloads: Arc<tokio::sync::Semaphore>,
    /// Stream tickets for browsers' `EventSource`.
    pub tickets: api::Tickets,
    /// Blob uploads in flight per tenant.
    pub tenant_uploads: api::Counts,
    /// Blob bytes per tenant.
    pub blob_usage: quota::BlobUsage,
    /// Workflows running per tenant.
    pub workflows: quota::Workflows,
    /// SHA-256 of the token `/metrics` requires, if any.
    pub metrics_token: Option<[u8; 32]>,
    pub troupe: Arc<Troupe>,
    pub tasks: Tasks,
    pub metrics: PrometheusHandle,
    pub ready: AtomicBool,
    /// GPU utilization (percent), refreshed every [`UTILIZATION_REFRESH`].
    pub utilization: AtomicU32,
}

impl Shared {
    pub fn journal(&self) -> Arc<dyn Journal> {
        self.troupe.journal()
    }
}

/// How often the degrade policy's view of GPU utilization is refreshed.
pub const UTILIZATION_REFRESH: Duration = Duration::from_millis(100);

/// Utilization as the degrade policy sees it: the larger of the leased
/// compute share across healthy GPUs and the busiest GPU's own reading.
async fn utilization(gpu: &troupe_gpu::GpuSupervisorHandle) -> Option<u32> {
    let status = gpu.status().await.ok()?;
    let (mut used, mut total, mut probe) = (0u64, 0u64, 0u32);
    for s in status.iter().filter(|s| s.device.healthy) {
        used += u64::from(s.leased.1);
        total += u64::from(s.device.compute);
        probe = probe.max(s.utilization_pct.unwrap_or(0));
    }
    let leased = (used * 100).checked_div(total).unwrap_or(100) as u32;
    Some(leased.max(probe))
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct AppState(pub Arc<Shared>);

/// The agent `troupe serve` answers sessions with, unless a request names
/// another.
pub const SESSION_AGENT: &str = "assistant";

/// The `assistant` agent of `troupe serve`: answers each turn with the
/// configured model (the default turn of every agent).
pub struct Assistant;

impl Agent for Assistant {
    type State = ();
}

/// The key of [`Assistant`].
pub const ASSISTANT: AgentKey<Assistant> = AgentKey::new(SESSION_AGENT);

/// The backend name and model name of a model section.
pub fn backend_names(model: &ModelConfig) -> (String, String) {
    match model {
        ModelConfig::Local { .. } => ("local".into(), "local".into()),
        ModelConfig::Openai { model, .. } => ("openai".into(), model.clone()),
    }
}

fn backend(config: &GatewayConfig) -> Result<Arc<dyn ModelBackend>, GatewayError> {
    Ok(match &config.model {
        ModelConfig::Local { words, chunk_ms } => {
            let d = Duration::from_millis(*chunk_ms);
            Arc::new(LocalBackend::default().words(*words, 2).latency(d, d))
        }
        ModelConfig::Openai {
            base_url,
            api_key_env,
            priority_field,
            ..
        } => {
            let mut c = OpenAiConfig::new(base_url);
            c.priority_field = priority_field.clone();
            if let Some(var) = api_key_env {
                let key = std::env::var(var).map_err(|_| {
                    GatewayError::Config(format!("environment variable `{var}` is not set"))
                })?;
                c = c.api_key(key);
            }
            Arc::new(OpenAiBackend::new(c).map_err(|e| GatewayError::Config(e.to_string()))?)
        }
    })
}

/// The lease each inference of the gateway takes (priority set per task).
pub fn lease(config: &GatewayConfig) -> LeaseSpec {
    LeaseSpec {
        memory: config.gpus.lease_memory_mib << 20,
        compute: config.gpus.lease_compute_pct,
        wait: Duration::from_millis(config.gpus.lease_wait_ms),
        max_hold: Duration::from_millis(config.gpus.lease_max_hold_ms.max(1)),
        ..LeaseSpec::default()
    }
}

/// The built-in workflow of `troupe serve`, `review`: `draft` (an
/// inference under a lease), then a human `approve` signal (within an
/// hour), then `publish`; a failure after the draft discards it.
fn workflows(
    builder: TroupeBuilder,
    inference: Arc<OnceLock<Inference>>,
    config: &GatewayConfig,
) -> TroupeBuilder {
    let (backend, model) = backend_names(&config.model);
    let lease = lease(config);
    builder
        .step("draft", move |ctx: StepContext| {
            let (inference, backend, model, lease) = (
                inference.get().cloned(),
                backend.clone(),
                model.clone(),
                lease.clone(),
            );
            async move {
                let inference =
                    inference.ok_or_else(|| StepError::retryable("the system is starting"))?;
                let topic = ctx.input["input"]["topic"]
                    .as_str()
                    .unwrap_or("something")
                    .to_owned();
                let request = troupe_agent::ChatRequest::new(
                    model,
                    vec![troupe_agent::ChatMessage::user(format!(
                        "write about {topic}"
                    ))],
                );
                let holder = troupe_agent::Holder {
                    name: ctx.idempotency_key(),
                    actor: None,
                };
                let mut stream = inference
                    .stream(&backend, request, &lease, &holder)
                    .await
                    .map_err(|e| StepError::retryable(e.to_string()))?;
                let mut text = String::new();
                while let Some(c) = futures::StreamExt::next(&mut stream).await {
                    if let troupe_agent::Chunk::Text(t) =
                        c.map_err(|e| StepError::retryable(e.to_string()))?
                    {
                        text.push_str(&t);
                    }
                }
                Ok(json!({ "draft": text }))
            }
        })
        .step("discard", |_ctx: StepContext| async { Ok(json!(null)) })
        .step("publish", |ctx: StepContext| async move {
            Ok(json!({ "published": ctx.input["draft"]["draft"] }))
        })
        .workflow(
            SagaDefinition::new(
                "review",
                vec![
                    StepDef::new("draft", "draft")
                        .compensate_with("discard")
                        .retry(RetryPolicy::immediate(2)),
                    StepDef::signal("approve", "approve", Duration::from_secs(3600))
                        .after(&["draft"]),
                    StepDef::new("publish", "publish").after(&["approve"]),
                ],
            )
            .expect("the built-in workflow is valid"),
        )
}

/// The system `troupe serve` runs for `config`: its journal (RocksDB,
/// tiered, or PostgreSQL), its GPUs (NVML, or simulated ones), its model,
/// the `assistant` agent and the `review` workflow. Turns and sagas are
/// resumed by the gateway, not by the builder.
pub async fn troupe_for(config: &GatewayConfig) -> Result<Troupe, GatewayError> {
    config.validate()?;
    let mut builder = Troupe::builder()
        .data_dir(&config.data_dir)
        .durability(config.durability)
        .resume(false)
        .sessions(SessionConfig {
            heartbeat: config.heartbeat(),
            max_subscribers: config.http.streams_per_session,
            ..SessionConfig::default()
        });
    if let Some(storage) = &config.storage {
        builder = builder.storage(storage.clone());
    }
    if let Some(pg) = &config.postgres {
        let pg_config = troupe_postgres::PgConfig {
            pool_size: pg.pool_size,
            ..troupe_postgres::PgConfig::new(pg.url.clone()).schema(pg.schema.clone())
        };
        let journal = troupe_postgres::PgJournal::open(pg_config)
            .await
            .map_err(|e| GatewayError::Config(format!("postgres journal: {e}")))?;
        // Lease decisions stay local: they belong to this server's GPUs.
        let leases = JournalConfig {
            data_dir: config.data_dir.join("leases"),
            durability: match config.durability {
                Durability::InMemory => Durability::InMemory,
                _ => Durability::Buffered,
            },
            tiers: None,
        }
        .open()
        .map_err(|e| GatewayError::Config(format!("lease journal: {e}")))?;
        builder = builder.journal(Arc::new(journal)).lease_journal(leases);
    }
    let simulated = SimulatedProbe::new(config.gpus.simulated, config.gpus.memory_gib << 30);
    let probe: Arc<dyn GpuProbe> = if config.gpus.force_simulated {
        Arc::new(simulated)
    } else {
        troupe_gpu::probe::detect(simulated)
    };
    let (backend_name, model_name) = backend_names(&config.model);
    builder = builder
        .gpus(probe)
        .shared_backend(&backend_name, backend(config)?);
    let options = AgentOptions::default()
        .model(backend_name, model_name)
        .lease(LeaseSpec {
            priority: config.session_priority,
            ..lease(config)
        })
        .concurrency(config.task_workers.max(1), Duration::from_secs(30));
    builder = builder.agent(&ASSISTANT, Assistant, options);
    // The draft step runs under the system's own leases, known once built.
    let inference = Arc::new(OnceLock::new());
    builder = workflows(builder, inference.clone(), config);
    let troupe = builder.build().await.map_err(GatewayError::from_runtime)?;
    let _ = inference.set(troupe.inference().clone());
    Ok(troupe)
}

/// The gateway over a running [`Troupe`]: the task workers, the routes,
/// the degrade policy. See the [crate docs](crate).
pub struct Gateway {
    state: AppState,
    refresher: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// The gateway over `troupe`, with the HTTP settings of `config`
    /// (tenants, limits, task queue and workers, degrade policy; the
    /// system's own settings in it are not read). Starts the task workers
    /// and resumes the tasks and workflows an earlier run left unfinished.
    pub async fn new(troupe: Arc<Troupe>, config: GatewayConfig) -> Result<Self, GatewayError> {
        config.validate()?;
        let metrics = metrics_handle();
        let (backend, model) = backend_names(&config.model);
        // Each tenant's longest lease hold, for its tasks and its sessions'
        // turns alike (`quota.max_lease_hold_ms`).
        let holds: Arc<HashMap<String, Duration>> = Arc::new(
            config
                .tenants
                .iter()
                .map(|t| (t.name.clone(), t.quota.max_lease_hold_ms))
                .chain([(ANONYMOUS_TENANT.to_owned(), config.quota.max_lease_hold_ms)])
                .map(|(t, ms)| (t, Duration::from_millis(ms)))
                .collect(),
        );
        {
            let holds = holds.clone();
            troupe
                .agents()
                .set_tenant_lease_hold(move |tenant| holds.get(tenant).copied());
        }
        let tasks = Tasks::start(
            &troupe,
            config.task_queue,
            config.task_workers,
            tasks::Runner {
                inference: troupe.inference().clone(),
                agents: troupe.agents().clone(),
                backend: (backend, model),
                lease: lease(&config),
                holds: holds.clone(),
            },
        );
        let mut tenants = Vec::with_capacity(config.tenants.len());
        for t in &config.tenants {
            let token = match t.resolve_token() {
                Ok(token) => token,
                Err(e) => {
                    tasks.stop();
                    return Err(e);
                }
            };
            tenants.push(TenantAuth {
                digest: api::digest(&token),
                name: t.name.clone(),
                quota: t.quota.clone(),
            });
        }
        let h = &config.http;
        let metrics_token = match h.resolve_metrics_token() {
            Ok(t) => t.as_deref().map(api::digest),
            Err(e) => {
                tasks.stop();
                return Err(e);
            }
        };
        let state = AppState(Arc::new(Shared {
            hosts: layers::allowed_hosts(h, config.listen),
            streams: Arc::new(tokio::sync::Semaphore::new(h.max_streams)),
            tenant_streams: api::Counts::default(),
            downloads: Arc::new(tokio::sync::Semaphore::new(h.max_transfers)),
            tickets: api::Tickets::default(),
            tenant_uploads: api::Counts::default(),
            blob_usage: quota::BlobUsage::default(),
            workflows: quota::Workflows::default(),
            metrics_token,
            tenants,
            config,
            troupe: troupe.clone(),
            tasks: tasks.clone(),
            metrics,
            ready: AtomicBool::new(false),
            utilization: AtomicU32::new(0),
        }));
        let refresher = {
            let weak = Arc::downgrade(&state.0);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(UTILIZATION_REFRESH);
                loop {
                    tick.tick().await;
                    let Some(s) = weak.upgrade() else { return };
                    let Some(gpu) = s.troupe.gpu() else { continue };
                    if let Some(u) = utilization(gpu).await {
                        s.utilization.store(u, Ordering::Relaxed);
                        metrics::gauge!("troupe_gateway_gpu_utilization_percent").set(f64::from(u));
                    }
                }
            })
        };
        // Unfinished work from before a restart. A task record that cannot
        // be read is reported and skipped, not fatal.
        let resumed = async {
            let tasks = tasks.resume(troupe.journal().as_ref()).await?;
            let sagas = troupe.sagas().resume_all().await?;
            api::count_resumed_workflows(&state).await?;
            Ok::<_, GatewayError>((tasks, sagas))
        }
        .await;
        let (resumed_tasks, resumed_sagas) = match resumed {
            Ok(r) => r,
            Err(e) => {
                // Nothing of this gateway keeps running: its workers hold
                // the journal the caller is about to close.
                tasks.stop();
                refresher.abort();
                return Err(e);
            }
        };
        state.0.ready.store(true, Ordering::SeqCst);
        tracing::info!(resumed_tasks, resumed_sagas, "gateway ready");
        Ok(Self { state, refresher })
    }

    /// The routes, as a plain `axum::Router`: serve it with [`serve`], or
    /// merge or nest it into your own app.
    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// The system it serves.
    pub fn troupe(&self) -> &Arc<Troupe> {
        &self.state.0.troupe
    }

    /// Its tasks.
    pub fn tasks(&self) -> &Tasks {
        &self.state.0.tasks
    }

    /// Stops the task workers (their tasks stay journaled: the next start
    /// resumes them) and reports not ready. The system is the caller's to
    /// shut down.
    pub fn shutdown(&self) {
        self.state.0.ready.store(false, Ordering::SeqCst);
        self.state.0.tasks.stop();
        self.refresher.abort();
    }
}

/// The whole server of `troupe serve`: the system built from a
/// [`GatewayConfig`], the gateway over it, listening.
pub struct Server {
    addr: SocketAddr,
    gateway: Gateway,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    archiver: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Builds the system ([`troupe_for`]), the gateway over it, and listens
    /// on `config.listen`.
    pub async fn start(config: GatewayConfig) -> Result<Self, GatewayError> {
        // The port first: a server that cannot listen starts nothing.
        let listen = config.listen;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| GatewayError::Config(format!("cannot listen on {listen}: {e}")))?;
        let addr = listener.local_addr().map_err(GatewayError::internal)?;
        let troupe = Arc::new(troupe_for(&config).await?);
        let archiver = troupe.tiered().and_then(|t| {
            t.policy()
                .interval_s
                .map(|s| t.spawn_archiver(Duration::from_secs(s)))
        });
        let gateway = match Gateway::new(troupe.clone(), config).await {
            Ok(g) => g,
            Err(e) => {
                if let Some(a) = &archiver {
                    a.abort();
                }
                let _ = troupe.shutdown().await;
                return Err(e);
            }
        };
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let limits = ServeLimits::from(&gateway.state.0.config.http);
        fit_open_files(limits.max_connections);
        let server = tokio::spawn(serve(listener, gateway.router(), limits, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        tracing::info!(%addr, "gateway listening");
        Ok(Self {
            addr,
            gateway,
            stop,
            server,
            archiver,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The system it serves (agents, sessions, sagas, GPUs).
    pub fn troupe(&self) -> &Arc<Troupe> {
        self.gateway.troupe()
    }

    /// The gateway.
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// Stops accepting, lets in-flight requests finish (up to the
    /// configured grace), stops the task workers, then shuts the system
    /// down in order.
    pub async fn shutdown(self) -> Result<(), GatewayError> {
        let grace = Duration::from_millis(self.gateway.state.0.config.shutdown_grace_ms);
        self.gateway.state.0.ready.store(false, Ordering::SeqCst);
        let _ = self.stop.send(true);
        // SSE streams never end on their own: past the grace, cut them
        // (aborting the server drops every connection it holds).
        let abort = self.server.abort_handle();
        if tokio::time::timeout(grace, self.server).await.is_err() {
            tracing::warn!("in-flight requests still open after {grace:?}; closing them");
            abort.abort();
        }
        self.gateway.shutdown();
        if let Some(a) = self.archiver {
            a.abort();
        }
        let troupe = self.gateway.troupe().clone();
        troupe.shutdown().await.map_err(GatewayError::from_runtime)
    }
}

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
//! policy). Start one with [`Gateway::start`]; `troupe serve` does that
//! from a [`GatewayConfig`].

#![warn(missing_docs)]

mod api;
mod config;
mod error;
pub mod tasks;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use troupe_actor::SupervisorHandle;
use troupe_agent::{
    AgentOptions, AgentSystem, Inference, LeaseSpec, LocalBackend, OpenAiBackend, OpenAiConfig,
    SessionConfig, Sessions,
};
use troupe_gpu::probe::{GpuProbe, SimulatedProbe};
use troupe_gpu::{GpuArgs, GpuConfig, GpuSupervisorHandle};
use troupe_journal::{Durability, Journal, JournalConfig, TieredJournal};
use troupe_saga::{Handlers, RetryPolicy, SagaDefinition, Sagas, StepContext, StepDef, StepError};

pub use config::{
    DegradeSection, GatewayConfig, GpuSection, LogFormat, ModelConfig, PostgresSection, Tenant,
};
pub use error::GatewayError;
pub use tasks::{TaskKind, TaskState, TaskStatus, Tasks};

/// Buckets of the `inference_latency_seconds` histogram.
pub const INFERENCE_BUCKETS: [f64; 6] = [0.1, 0.5, 1.0, 2.0, 5.0, 10.0];

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
            handle
        })
        .clone()
}

pub(crate) struct Shared {
    pub config: GatewayConfig,
    pub tokens: HashMap<String, String>,
    pub journal: Arc<dyn Journal>,
    pub sessions: Sessions,
    pub agents: AgentSystem,
    pub tasks: Tasks,
    pub sagas: Sagas,
    pub gpu: GpuSupervisorHandle,
    pub metrics: PrometheusHandle,
    pub ready: AtomicBool,
    /// GPU utilization (percent), refreshed every [`UTILIZATION_REFRESH`].
    pub utilization: AtomicU32,
    pub lease_journal: Arc<dyn Journal>,
    /// The tiered journal, when `[storage]` is configured (blobs live there).
    pub tiered: Option<TieredJournal>,
}

/// How often the degrade policy's view of GPU utilization is refreshed.
pub const UTILIZATION_REFRESH: Duration = Duration::from_millis(100);

/// Utilization as the degrade policy sees it: the larger of the leased
/// compute share across healthy GPUs and the busiest GPU's own reading.
async fn utilization(gpu: &GpuSupervisorHandle) -> Option<u32> {
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

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    state: AppState,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    agents_sup: SupervisorHandle,
    archiver: Option<tokio::task::JoinHandle<()>>,
}

/// The agent that answers sessions.
pub const SESSION_AGENT: &str = "assistant";

/// What the `assistant` agent is sent: a session to answer and where the
/// outcome goes.
pub struct AssistantMsg {
    /// The session to answer.
    pub session: String,
    /// Where the outcome goes.
    pub reply: ractor::RpcReplyPort<Result<troupe_agent::TurnOutcome, troupe_agent::AgentError>>,
}

#[cfg(feature = "cluster")]
impl ractor::Message for AssistantMsg {}

/// The `assistant` agent. The gateway's task workers answer sessions
/// through its context (cancellable with the task); other agents may also
/// hand it a session by name. Each turn runs in a task of its own, so one
/// agent serves many sessions at once.
struct Assistant;

#[async_trait::async_trait]
impl troupe_agent::Agent for Assistant {
    type Msg = AssistantMsg;
    async fn handle(
        &mut self,
        ctx: &troupe_agent::AgentContext,
        AssistantMsg { session, reply }: AssistantMsg,
    ) -> Result<(), troupe_agent::AgentError> {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _ = reply.send(ctx.reply(&session).await);
        });
        Ok(())
    }
}

fn model(config: &GatewayConfig) -> Result<(Inference, String, String), GatewayError> {
    Ok(match &config.model {
        ModelConfig::Local { words, chunk_ms } => {
            let d = Duration::from_millis(*chunk_ms);
            let b = LocalBackend::default().words(*words, 2).latency(d, d);
            (
                Inference::new().with_backend(b),
                "local".into(),
                "local".into(),
            )
        }
        ModelConfig::Openai {
            base_url,
            model,
            api_key_env,
        } => {
            let mut c = OpenAiConfig::new(base_url);
            if let Some(var) = api_key_env {
                let key = std::env::var(var).map_err(|_| {
                    GatewayError::Config(format!("environment variable `{var}` is not set"))
                })?;
                c = c.api_key(key);
            }
            let b = OpenAiBackend::new(c).map_err(|e| GatewayError::Config(e.to_string()))?;
            (
                Inference::new().with_backend(b),
                "openai".into(),
                model.clone(),
            )
        }
    })
}

/// The built-in workflow of `troupe serve`: `draft` (an inference under a
/// lease), then a human `approve` signal (within an hour), then `publish`;
/// a failure after the draft discards it.
fn workflows(
    inference: Inference,
    backend: (String, String),
    lease: LeaseSpec,
) -> (Handlers, SagaDefinition) {
    let mut h = Handlers::default();
    h.register("draft", move |ctx: StepContext| {
        let (inference, backend, lease) = (inference.clone(), backend.clone(), lease.clone());
        async move {
            let topic = ctx.input["input"]["topic"]
                .as_str()
                .unwrap_or("something")
                .to_owned();
            let request = troupe_agent::ChatRequest::new(
                backend.1.clone(),
                vec![troupe_agent::ChatMessage::user(format!(
                    "write about {topic}"
                ))],
            );
            let holder = troupe_agent::Holder {
                name: ctx.idempotency_key(),
                actor: None,
            };
            let mut stream = inference
                .stream(&backend.0, request, &lease, &holder)
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
    });
    h.register("discard", |_ctx: StepContext| async { Ok(json!(null)) });
    h.register("publish", |ctx: StepContext| async move {
        Ok(json!({ "published": ctx.input["draft"]["draft"] }))
    });
    let def = SagaDefinition::new(
        "review",
        vec![
            StepDef::new("draft", "draft")
                .compensate_with("discard")
                .retry(RetryPolicy::immediate(2)),
            StepDef::signal("approve", "approve", Duration::from_secs(3600)).after(&["draft"]),
            StepDef::new("publish", "publish").after(&["approve"]),
        ],
    )
    .expect("the built-in workflow is valid");
    (h, def)
}

impl Gateway {
    /// Opens the journal, starts the GPU supervisor, the agents, the task
    /// workers and the sagas, resumes unfinished work, then listens.
    pub async fn start(config: GatewayConfig) -> Result<Self, GatewayError> {
        config.validate()?;
        let metrics = metrics_handle();
        let journal_config = JournalConfig {
            data_dir: config.data_dir.join("journal"),
            durability: config.durability,
            tiers: config.storage.clone(),
        };
        let tiered = journal_config
            .open_tiered()
            .map_err(|e| GatewayError::Config(format!("journal: {e}")))?;
        let journal: Arc<dyn Journal> = match (&tiered, &config.postgres) {
            (Some(t), _) => Arc::new(t.clone()),
            (None, Some(pg)) => {
                let pg_config = troupe_postgres::PgConfig {
                    pool_size: pg.pool_size,
                    ..troupe_postgres::PgConfig::new(pg.url.clone()).schema(pg.schema.clone())
                };
                Arc::new(
                    troupe_postgres::PgJournal::open(pg_config)
                        .await
                        .map_err(|e| GatewayError::Config(format!("postgres journal: {e}")))?,
                )
            }
            (None, None) => journal_config
                .open()
                .map_err(|e| GatewayError::Config(format!("journal: {e}")))?,
        };
        let archiver = tiered.as_ref().and_then(|t| {
            t.policy()
                .interval_s
                .map(|s| t.spawn_archiver(Duration::from_secs(s)))
        });
        let probe: Arc<dyn GpuProbe> = if config.gpus.force_simulated {
            Arc::new(SimulatedProbe::new(
                config.gpus.simulated,
                config.gpus.memory_gib << 30,
            ))
        } else {
            troupe_gpu::probe::detect(SimulatedProbe::new(
                config.gpus.simulated,
                config.gpus.memory_gib << 30,
            ))
        };
        // Lease decisions in a journal of their own, buffered: a process
        // crash ends every in-process holder anyway (see the leases chapter),
        // and an fsync per decision would serialize admission.
        let lease_journal = JournalConfig {
            data_dir: config.data_dir.join("leases"),
            durability: match config.durability {
                Durability::InMemory => Durability::InMemory,
                _ => Durability::Buffered,
            },
            tiers: None,
        }
        .open()
        .map_err(|e| GatewayError::Config(format!("lease journal: {e}")))?;
        let gpu = GpuSupervisorHandle::spawn(
            GpuArgs {
                probe,
                journal: lease_journal.clone(),
                config: GpuConfig::default(),
            },
            None,
        )
        .await
        .map_err(|e| GatewayError::Config(e.to_string()))?;
        let (inference, backend, model_name) = model(&config)?;
        let inference = inference.with_gpu(gpu.clone());
        let lease = LeaseSpec {
            memory: config.gpus.lease_memory_mib << 20,
            compute: config.gpus.lease_compute_pct,
            wait: Duration::from_millis(config.gpus.lease_wait_ms),
            ..LeaseSpec::default()
        };
        let sessions = Sessions::new(
            journal.clone(),
            SessionConfig {
                heartbeat: config.heartbeat(),
                ..SessionConfig::default()
            },
        );
        let agents = AgentSystem::new(sessions.clone(), inference.clone());
        let options = AgentOptions::default()
            .model(backend.clone(), model_name.clone())
            .lease(LeaseSpec {
                priority: config.session_priority,
                ..lease.clone()
            });
        let (child, _) = agents
            .agent(SESSION_AGENT, options, || Assistant)
            .map_err(|e| GatewayError::Config(e.to_string()))?;
        let agents_sup = SupervisorHandle::spawn(
            troupe_actor::SupervisorSpec::new("gateway-agents").child(child),
        )
        .await
        .map_err(|e| GatewayError::Config(e.to_string()))?;
        let tasks = Tasks::start(
            journal.clone(),
            config.task_queue,
            config.task_workers,
            tasks::Runner {
                inference: inference.clone(),
                agents: agents.clone(),
                session_agent: SESSION_AGENT.into(),
                backend: (backend.clone(), model_name.clone()),
                lease: lease.clone(),
            },
        );
        let (handlers, review) = workflows(inference, (backend, model_name), lease);
        let sagas = Sagas::new(journal.clone(), handlers);
        sagas.register(review)?;
        let tokens = config
            .tenants
            .iter()
            .map(|t| (t.token.clone(), t.name.clone()))
            .collect();
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| {
                GatewayError::Config(format!("cannot listen on {}: {e}", config.listen))
            })?;
        let addr = listener
            .local_addr()
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        let state = AppState(Arc::new(Shared {
            config,
            tokens,
            journal: journal.clone(),
            sessions,
            agents,
            tasks: tasks.clone(),
            sagas: sagas.clone(),
            gpu,
            metrics,
            ready: AtomicBool::new(false),
            utilization: AtomicU32::new(0),
            lease_journal,
            tiered,
        }));
        {
            let weak = Arc::downgrade(&state.0);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(UTILIZATION_REFRESH);
                loop {
                    tick.tick().await;
                    let Some(s) = weak.upgrade() else { return };
                    if let Some(u) = utilization(&s.gpu).await {
                        s.utilization.store(u, Ordering::Relaxed);
                        metrics::gauge!("troupe_gateway_gpu_utilization_percent").set(f64::from(u));
                    }
                }
            });
        }
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let app = api::router(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        // Unfinished work from before a restart.
        let resumed_tasks = tasks.resume(journal.as_ref()).await?;
        let resumed_sagas = sagas.resume_all().await?;
        state.0.ready.store(true, Ordering::SeqCst);
        tracing::info!(%addr, resumed_tasks, resumed_sagas, "gateway listening");
        Ok(Self {
            addr,
            state,
            stop,
            server,
            agents_sup,
            archiver,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The agents (the `assistant` agent, its sessions and models): for
    /// programs that embed the gateway and talk to agents in-process.
    pub fn agents(&self) -> &AgentSystem {
        &self.state.0.agents
    }

    /// The tiered journal, when `[storage]` is configured (archive runs,
    /// blob collection, figures per tier).
    pub fn tiered(&self) -> Option<&TieredJournal> {
        self.state.0.tiered.as_ref()
    }

    /// Stops accepting, lets in-flight requests finish (up to the
    /// configured grace), stops sagas, agents and the GPU supervisor, and
    /// flushes the journal.
    pub async fn shutdown(self) -> Result<(), GatewayError> {
        let s = &self.state.0;
        s.ready.store(false, Ordering::SeqCst);
        let _ = self.stop.send(true);
        let grace = Duration::from_millis(s.config.shutdown_grace_ms);
        // SSE streams never end on their own: past the grace, cut them.
        let server = self.server;
        if tokio::time::timeout(grace, server).await.is_err() {
            tracing::warn!("in-flight requests still open after {grace:?}; closing them");
        }
        s.tasks.stop();
        s.sagas.stop_all().await;
        self.agents_sup.stop(Duration::from_secs(5)).await;
        s.gpu.stop().await;
        if let Some(a) = self.archiver {
            a.abort();
        }
        s.journal.flush().await?;
        s.lease_journal.flush().await?;
        Ok(())
    }
}

//! Inference under GPU leases.
//!
//! [`Inference`] routes a request to a named [`ModelBackend`] and, when a
//! [`GpuSupervisorHandle`] is configured, runs it under a lease:
//!
//! 1. acquire a lease for the request's memory, compute share and priority,
//!    waiting at most [`LeaseSpec::wait`]: a refusal (or a request still
//!    waiting at its deadline) reaches the caller as
//!    [`AgentError::Overloaded`] with a retry hint, before any model work
//!    starts;
//! 2. renew it every third of its TTL while chunks stream;
//! 3. release it once the backend says `Done`, *before* the caller sees
//!    `Done`; or, if the stream is dropped early, right after; and, if the
//!    holding actor dies, the supervisor frees it on its own.
//!
//! A preemption notice lets the stream run until its grace deadline; a
//! lease that ends before the answer does ends the stream with
//! [`AgentError::LeaseLost`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::BoxStream;
use ractor::ActorCell;
use tokio::sync::mpsc;
use troupe_gpu::scheduler::{Lease, LeaseRequest};
use troupe_gpu::{GpuSupervisorHandle, LeaseNotice};
use troupe_journal::now_ms;

use crate::error::AgentError;
use crate::model::{ChatRequest, Chunk, ModelBackend};

/// What one inference asks of the GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseSpec {
    /// Device memory, in bytes.
    pub memory: u64,
    /// Compute share, in percent of one device.
    pub compute: u32,
    /// 0 (lowest) to `PRIORITIES - 1` (highest; see [`troupe_gpu::scheduler::PRIORITIES`]).
    pub priority: u8,
    /// Longest wait for the lease: with `expected`, it sets the time the
    /// inference must be done by (asked + `wait` + `expected`), which is
    /// what the GPU supervisor admits against.
    pub wait: Duration,
    /// Lease lifetime between renewals.
    pub ttl: Duration,
    /// How long the inference is expected to hold the lease (for the
    /// supervisor's wait estimates): the model's time plus the journal
    /// writes of the chunks between, which the lease also covers. Passed
    /// as the caller's estimate: the supervisor learns how far off it is.
    pub expected: Duration,
    /// What kind of work it is, for the run times the supervisor learns
    /// (empty: the model's name is used).
    pub kind: String,
    /// Longest the lease is held, renewals included: past it the
    /// inference ends with [`AgentError::LeaseLost`] and the lease is
    /// released (one stream that never ends cannot keep a GPU share for
    /// good).
    pub max_hold: Duration,
}

impl Default for LeaseSpec {
    /// 4 GiB, 25 % of a device, priority 1, wait up to 5 s, TTL 30 s,
    /// expected 2 s, held at most 10 minutes.
    fn default() -> Self {
        Self {
            memory: 4 << 30,
            compute: 25,
            priority: 1,
            wait: Duration::from_secs(5),
            ttl: Duration::from_secs(30),
            expected: Duration::from_secs(2),
            kind: String::new(),
            max_hold: Duration::from_secs(600),
        }
    }
}

/// Who holds a lease: a name, and the actor whose death frees it.
#[derive(Debug, Clone)]
pub struct Holder {
    /// Name (an agent, a task id).
    pub name: String,
    /// The actor watched for death.
    pub actor: Option<ActorCell>,
}

/// A stream of chunks under a lease; ends after `Done` or at the first error.
pub type InferenceStream = BoxStream<'static, Result<Chunk, AgentError>>;

/// Bound on the notices queued for one lease.
const NOTICE_BUFFER: usize = 8;

/// Model backends by name, and the GPU supervisor they run under. Cheap to clone.
#[derive(Clone, Default)]
pub struct Inference {
    backends: HashMap<String, Arc<dyn ModelBackend>>,
    gpu: Option<GpuSupervisorHandle>,
}

impl Inference {
    /// No backends, no GPUs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a backend under its own name.
    pub fn with_backend(mut self, backend: impl ModelBackend) -> Self {
        self.backends
            .insert(backend.name().to_owned(), Arc::new(backend));
        self
    }

    /// Adds a shared backend under `name`.
    pub fn with_shared_backend(mut self, name: &str, backend: Arc<dyn ModelBackend>) -> Self {
        self.backends.insert(name.to_owned(), backend);
        self
    }

    /// Runs every inference under a lease of `gpu`.
    pub fn with_gpu(mut self, gpu: GpuSupervisorHandle) -> Self {
        self.gpu = Some(gpu);
        self
    }

    /// The GPU supervisor, if leases are taken.
    pub fn gpu(&self) -> Option<&GpuSupervisorHandle> {
        self.gpu.as_ref()
    }

    /// The backend named `name`.
    pub fn backend(&self, name: &str) -> Result<Arc<dyn ModelBackend>, AgentError> {
        self.backends
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::UnknownModel(name.to_owned()))
    }

    /// Streams `request` from backend `model` under a lease (see the
    /// [module docs](self)).
    pub async fn stream(
        &self,
        model: &str,
        request: ChatRequest,
        lease: &LeaseSpec,
        holder: &Holder,
    ) -> Result<InferenceStream, AgentError> {
        let backend = self.backend(model)?;
        let started = Instant::now();
        let labels = [("model", model.to_owned())];
        let mut request = request;
        if request.priority.is_none() {
            request.priority = Some(lease.priority);
        }
        let mut gen_ai = GenAiMetrics::new(model, &request.model);
        let guard = match &self.gpu {
            Some(gpu) => match LeaseGuard::acquire(gpu, lease, holder, model).await {
                Ok(g) => Some(g),
                Err(e) => {
                    metrics::counter!("troupe_inference_refused_total", &labels).increment(1);
                    return Err(e);
                }
            },
            None => None,
        };
        let inner = match backend.stream(request).await {
            Ok(s) => s,
            Err(e) => {
                gen_ai.failed(&e);
                if let Some(g) = guard {
                    g.release().await;
                }
                return Err(e);
            }
        };
        let latency = metrics::histogram!("inference_latency_seconds", &labels);
        let max_hold = lease.max_hold;
        let hold_until = tokio::time::Instant::now() + max_hold;
        Ok(async_stream::try_stream! {
            let mut guard = guard;
            let mut inner = inner;
            let mut grace: Option<tokio::time::Instant> = None;
            loop {
                let lease_id = guard.as_ref().and_then(|g| g.lease.as_ref()).map_or(0, |l| l.id);
                let holding = guard.is_some();
                let notice = async {
                    match guard.as_mut() {
                        Some(g) => g.notices.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let deadline = async {
                    match grace {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                let held = async {
                    if holding {
                        tokio::time::sleep_until(hold_until).await
                    } else {
                        std::future::pending().await
                    }
                };
                let step = tokio::select! {
                    biased;
                    n = notice => Step::Notice(n),
                    _ = deadline => Step::GraceOver,
                    _ = held => Step::HoldOver,
                    chunk = inner.next() => Step::Chunk(chunk),
                };
                match step {
                    Step::Notice(Some(LeaseNotice::Preempt { grace_until, .. })) => {
                        let now = guard.as_ref().map_or_else(now_ms, |g| g.gpu.now_ms());
                        let left = grace_until.saturating_sub(now);
                        grace = Some(tokio::time::Instant::now() + Duration::from_millis(left));
                    }
                    Step::Notice(Some(LeaseNotice::Ended { reason, .. })) => {
                        let e = AgentError::LeaseLost { lease: lease_id, reason: format!("{reason:?}") };
                        gen_ai.failed(&e);
                        Err(e)?;
                    }
                    // The supervisor dropped our notice channel: no more notices.
                    Step::Notice(None) => {
                        if let Some(g) = guard.as_mut() {
                            g.notices = mpsc::channel(1).1;
                        }
                    }
                    Step::GraceOver => {
                        let e = AgentError::LeaseLost { lease: lease_id, reason: "preempted".into() };
                        gen_ai.failed(&e);
                        Err(e)?;
                    }
                    Step::HoldOver => {
                        if let Some(g) = guard.take() {
                            g.release().await;
                        }
                        let e = AgentError::LeaseLost {
                            lease: lease_id,
                            reason: format!("held past its maximum of {max_hold:?}"),
                        };
                        gen_ai.failed(&e);
                        Err(e)?;
                    }
                    Step::Chunk(Some(Ok(c @ Chunk::Done { .. }))) => {
                        if let Some(g) = guard.take() {
                            g.release().await;
                        }
                        latency.record(started.elapsed().as_secs_f64());
                        if let Chunk::Done { usage, .. } = &c {
                            gen_ai.done(*usage);
                        }
                        yield c;
                        break;
                    }
                    Step::Chunk(Some(Ok(c))) => {
                        gen_ai.chunk(&c);
                        yield c;
                    }
                    Step::Chunk(Some(Err(e))) => {
                        gen_ai.failed(&e);
                        Err(e)?;
                    }
                    Step::Chunk(None) => break,
                }
            }
        }
        .boxed())
    }
}

/// The OpenTelemetry GenAI client metrics of one model call, under their
/// Prometheus names: `gen_ai_client_operation_duration_seconds`,
/// `gen_ai_client_operation_time_to_first_chunk_seconds` and
/// `gen_ai_client_token_usage` (by `gen_ai_token_type`, `input` or
/// `output`). Timed from the request to the backend, after the lease.
///
/// Token counts are the server's `usage`; a server that reports none gets
/// its output counted as one token per streamed text chunk (what servers
/// that stream token by token send; `source="chunks"`), and no input count
/// (none can be had without the model's tokenizer).
struct GenAiMetrics {
    labels: [(&'static str, String); 3],
    asked: Instant,
    first: bool,
    chunks: u64,
    recorded: bool,
}

impl GenAiMetrics {
    fn new(backend: &str, model: &str) -> Self {
        Self {
            labels: [
                ("gen_ai_operation_name", "chat".to_owned()),
                ("gen_ai_provider_name", backend.to_owned()),
                ("gen_ai_request_model", model.to_owned()),
            ],
            asked: Instant::now(),
            first: true,
            chunks: 0,
            recorded: false,
        }
    }

    fn chunk(&mut self, chunk: &Chunk) {
        if self.first {
            self.first = false;
            metrics::histogram!(
                "gen_ai_client_operation_time_to_first_chunk_seconds",
                &self.labels
            )
            .record(self.asked.elapsed().as_secs_f64());
        }
        if matches!(chunk, Chunk::Text(_)) {
            self.chunks += 1;
        }
    }

    fn done(&mut self, usage: Option<crate::Usage>) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        metrics::histogram!("gen_ai_client_operation_duration_seconds", &self.labels)
            .record(self.asked.elapsed().as_secs_f64());
        let [op, provider, model] = self.labels.clone();
        let tokens = |kind: &'static str, source: &'static str, n: u64| {
            metrics::histogram!(
                "gen_ai_client_token_usage",
                &[
                    op.clone(),
                    provider.clone(),
                    model.clone(),
                    ("gen_ai_token_type", kind.to_owned()),
                    ("source", source.to_owned()),
                ]
            )
            .record(n as f64);
        };
        match usage {
            Some(u) => {
                tokens("input", "server", u64::from(u.prompt_tokens));
                tokens("output", "server", u64::from(u.completion_tokens));
            }
            None => tokens("output", "chunks", self.chunks),
        }
    }

    fn failed(&mut self, error: &AgentError) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let [op, provider, model] = self.labels.clone();
        metrics::histogram!(
            "gen_ai_client_operation_duration_seconds",
            &[
                op,
                provider,
                model,
                ("error_type", error_type(error).to_owned())
            ]
        )
        .record(self.asked.elapsed().as_secs_f64());
    }
}

/// The `error.type` of a failed model call: a low-cardinality class.
fn error_type(error: &AgentError) -> &'static str {
    match error {
        AgentError::Overloaded { .. } => "overloaded",
        AgentError::Backend { .. } => "http_error",
        AgentError::Transport { .. } => "transport",
        AgentError::MalformedChunk { .. } => "malformed_chunk",
        AgentError::StreamClosed { .. } => "stream_closed",
        AgentError::Timeout { .. } => "timeout",
        AgentError::TooLarge { .. } => "too_large",
        AgentError::LeaseLost { .. } => "lease_lost",
        _ => "_OTHER",
    }
}

enum Step {
    Notice(Option<LeaseNotice>),
    GraceOver,
    HoldOver,
    Chunk(Option<Result<Chunk, AgentError>>),
}

/// A held lease: renewed in the background, released on drop.
struct LeaseGuard {
    gpu: GpuSupervisorHandle,
    lease: Option<Lease>,
    notices: mpsc::Receiver<LeaseNotice>,
    renew: tokio::task::JoinHandle<()>,
}

impl LeaseGuard {
    async fn acquire(
        gpu: &GpuSupervisorHandle,
        spec: &LeaseSpec,
        holder: &Holder,
        model: &str,
    ) -> Result<Self, AgentError> {
        let (tx, notices) = mpsc::channel(NOTICE_BUFFER);
        let ttl_ms = spec.ttl.as_millis().max(1) as u64;
        let expected = spec.expected.as_millis() as u64;
        // It may wait `wait` and is expected to run `expected`: it must be
        // done by then. The supervisor decides on what it has learned of
        // this kind's run times, not on `expected` alone.
        let req = LeaseRequest {
            holder: holder.name.clone(),
            kind: if spec.kind.is_empty() {
                model.to_owned()
            } else {
                spec.kind.clone()
            },
            memory: spec.memory,
            compute: spec.compute,
            priority: spec.priority,
            deadline_ms: gpu.now_ms() + spec.wait.as_millis() as u64 + expected,
            ttl_ms,
            estimate_ms: Some(expected),
            resumable: false,
            durable: false,
        };
        let asked = Instant::now();
        let lease = gpu.acquire(req, holder.actor.clone(), Some(tx)).await;
        metrics::histogram!("troupe_lease_wait_seconds").record(asked.elapsed().as_secs_f64());
        let lease = match lease {
            Ok(lease) => lease,
            // Queued but not granted within `wait` (or past its deadline on
            // arrival): as much an overload as a refusal up front.
            Err(troupe_gpu::GpuError::Expired { holder }) => {
                return Err(AgentError::Overloaded {
                    retry_after: spec.expected.max(Duration::from_millis(1)),
                    reason: format!(
                        "GPU lease for `{holder}` not granted within {:?}",
                        spec.wait
                    ),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let renew = {
            let (gpu, lease) = (gpu.clone(), lease.clone());
            tokio::spawn(async move {
                let period = Duration::from_millis((ttl_ms / 3).max(1));
                loop {
                    tokio::time::sleep(period).await;
                    if gpu.renew(&lease, ttl_ms).await.is_err() {
                        return; // ended: the notice says why
                    }
                }
            })
        };
        Ok(Self {
            gpu: gpu.clone(),
            lease: Some(lease),
            notices,
            renew,
        })
    }

    async fn release(mut self) {
        self.renew.abort();
        if let Some(lease) = self.lease.take() {
            let _ = self.gpu.release(&lease).await;
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.renew.abort();
        if let Some(lease) = self.lease.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let gpu = self.gpu.clone();
            rt.spawn(async move {
                let _ = gpu.release(&lease).await;
            });
        }
    }
}

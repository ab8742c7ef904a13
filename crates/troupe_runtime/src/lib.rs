//! # troupe_runtime: one builder, one root, an orderly shutdown
//!
//! [`Troupe::builder()`] is the one place that configures a Troupe system:
//!
//! | part | builder methods | default |
//! |---|---|---|
//! | the journal | [`data_dir`](TroupeBuilder::data_dir), [`durability`](TroupeBuilder::durability), [`storage`](TroupeBuilder::storage), or your own [`journal`](TroupeBuilder::journal) | RocksDB in `./troupe-data/journal`, fsync |
//! | GPUs and leases | [`gpus`](TroupeBuilder::gpus) (a probe: NVML, simulated), [`gpu_config`](TroupeBuilder::gpu_config), [`lease_journal`](TroupeBuilder::lease_journal) | none: inference takes no lease |
//! | model backends | [`backend`](TroupeBuilder::backend) | none |
//! | agents | [`agent`](TroupeBuilder::agent) | none |
//! | sessions | [`sessions`](TroupeBuilder::sessions) | [`SessionConfig::default`] |
//! | sagas | [`step`](TroupeBuilder::step), [`workflow`](TroupeBuilder::workflow) | none |
//! | your own actors | [`child`](TroupeBuilder::child) | none |
//!
//! [`TroupeBuilder::build`] opens the journal and starts, under one root
//! supervisor, the durable timers and the GPU supervisor (each restarted
//! if it fails, and reported by [`Troupe::readiness`]) and your children;
//! then it registers the agents and workflows and resumes what an earlier
//! run left unfinished: sagas, and session turns that were being answered.
//! [`Troupe::shutdown`] stops everything in order within a bounded grace:
//! agents (their turns drain), sessions, sagas, the root's children (GPUs,
//! timers, yours), then the journal is flushed and closed.
//!
//! ```no_run
//! use troupe_agent::{Agent, AgentKey, LocalBackend, AgentOptions};
//! use troupe_runtime::Troupe;
//!
//! struct Concierge;
//! impl Agent for Concierge {
//!     type State = ();
//! }
//! const CONCIERGE: AgentKey<Concierge> = AgentKey::new("concierge");
//!
//! # async fn run() -> Result<(), troupe_runtime::RuntimeError> {
//! let troupe = Troupe::builder()
//!     .data_dir("troupe-data")
//!     .backend(LocalBackend::default())
//!     .agent(&CONCIERGE, Concierge, AgentOptions::default())
//!     .build()
//!     .await?;
//! let session = troupe.sessions().create(CONCIERGE.name(), None).await?;
//! troupe.sessions().post(&session, "hello").await?; // the concierge answers
//! troupe.shutdown().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use troupe_actor::{
    ActorError, ChildSpec, Entities, EntityConfig, EventSourced, SupervisorHandle, SupervisorSpec,
    TimerConfig, Timers,
};
use troupe_agent::{
    Agent, AgentError, AgentKey, AgentKind, AgentOptions, AgentSystem, Inference, ModelBackend,
    SessionConfig, Sessions, SystemConfig,
};
use troupe_gpu::probe::GpuProbe;
use troupe_gpu::{GpuArgs, GpuConfig, GpuError, GpuSupervisorHandle};
use troupe_journal::{
    Durability, InMemoryJournal, Journal, JournalConfig, JournalError, TierConfig, TieredJournal,
};
use troupe_saga::{Handlers, SagaDefinition, SagaError, Sagas, StepHandler};

/// Everything that can go wrong building, running or stopping a system.
/// Each variant keeps its crate's error, so [`RuntimeError::is_transient`]
/// and [`RuntimeError::retry_after`] still answer.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The journal could not be opened, flushed or closed.
    #[error("journal: {0}")]
    Journal(#[from] JournalError),
    /// An actor or supervisor could not start or stop.
    #[error(transparent)]
    Actor(#[from] ActorError),
    /// An agent could not be registered, or its work failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A workflow could not be registered or resumed.
    #[error(transparent)]
    Saga(#[from] SagaError),
    /// The GPU supervisor could not start.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The builder was given settings that do not go together.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl RuntimeError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            RuntimeError::Journal(e) => e.is_transient(),
            RuntimeError::Actor(e) => e.is_transient(),
            RuntimeError::Agent(e) => e.is_transient(),
            RuntimeError::Saga(e) => e.is_transient(),
            RuntimeError::Gpu(e) => e.is_transient(),
            RuntimeError::Config(_) => false,
        }
    }

    /// The retry hint, for the errors that carry one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RuntimeError::Actor(e) => e.retry_after(),
            RuntimeError::Agent(e) => e.retry_after(),
            RuntimeError::Saga(e) => e.retry_after(),
            RuntimeError::Gpu(e) => e.retry_after(),
            _ => None,
        }
    }
}

type Drain = Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;
type Registration =
    Box<dyn FnOnce(AgentSystem) -> BoxFuture<'static, Result<(), AgentError>> + Send>;

/// Builds a [`Troupe`]. See the [crate docs](crate).
pub struct TroupeBuilder {
    data_dir: PathBuf,
    durability: Durability,
    storage: Option<TierConfig>,
    journal: Option<Arc<dyn Journal>>,
    lease_journal: Option<Arc<dyn Journal>>,
    gpus: Option<Arc<dyn GpuProbe>>,
    gpu_config: GpuConfig,
    backends: Vec<(String, Arc<dyn ModelBackend>)>,
    agents: Vec<Registration>,
    sessions: SessionConfig,
    handlers: Handlers,
    workflows: Vec<SagaDefinition>,
    max_sagas: Option<usize>,
    root: SupervisorSpec,
    timers: TimerConfig,
    ask_timeout: Duration,
    shutdown_timeout: Duration,
    resume: bool,
}

impl Default for TroupeBuilder {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("troupe-data"),
            durability: Durability::Fsync,
            storage: None,
            journal: None,
            lease_journal: None,
            gpus: None,
            gpu_config: GpuConfig::default(),
            backends: Vec::new(),
            agents: Vec::new(),
            sessions: SessionConfig::default(),
            handlers: Handlers::default(),
            workflows: Vec::new(),
            max_sagas: None,
            root: SupervisorSpec::new("root"),
            timers: TimerConfig::default(),
            ask_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            resume: true,
        }
    }
}

impl TroupeBuilder {
    /// Data directory: the journal goes in `DIR/journal`, the lease journal
    /// in `DIR/leases`. Default `./troupe-data`.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = dir.into();
        self
    }

    /// Journal durability. Default [`Durability::Fsync`]; with
    /// [`Durability::InMemory`] nothing touches the disk.
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// Storage tiers (hot tail, cold segments, blobs) around the RocksDB
    /// journal.
    pub fn storage(mut self, tiers: TierConfig) -> Self {
        self.storage = Some(tiers);
        self
    }

    /// Your own journal (PostgreSQL, a fault-injecting wrapper...), instead
    /// of one opened under the data directory. Leases then go to an
    /// in-memory journal unless [`TroupeBuilder::lease_journal`] says
    /// otherwise.
    pub fn journal(mut self, journal: Arc<dyn Journal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// GPUs read through `probe` (NVML with `troupe_gpu::probe::detect`, or
    /// a `SimulatedProbe`): every inference then holds a lease.
    pub fn gpus(mut self, probe: Arc<dyn GpuProbe>) -> Self {
        self.gpus = Some(probe);
        self
    }

    /// Settings of the GPU supervisor.
    pub fn gpu_config(mut self, config: GpuConfig) -> Self {
        self.gpu_config = config;
        self
    }

    /// Where lease decisions are journaled. Default: a RocksDB journal of
    /// its own under `DIR/leases`, buffered (a process crash ends every
    /// in-process holder anyway, and an fsync per decision would serialize
    /// admission); in memory when the main journal is.
    pub fn lease_journal(mut self, journal: Arc<dyn Journal>) -> Self {
        self.lease_journal = Some(journal);
        self
    }

    /// Adds a model backend under its own name.
    pub fn backend(mut self, backend: impl ModelBackend) -> Self {
        let name = backend.name().to_owned();
        self.backends.push((name, Arc::new(backend)));
        self
    }

    /// Adds a shared model backend under `name`.
    pub fn shared_backend(mut self, name: &str, backend: Arc<dyn ModelBackend>) -> Self {
        self.backends.push((name.to_owned(), backend));
        self
    }

    /// Registers agent kind `key`: `agent` is shared by its instances, one
    /// per session that names it.
    pub fn agent<A: Agent>(mut self, key: &AgentKey<A>, agent: A, options: AgentOptions) -> Self {
        let key = *key;
        self.agents.push(Box::new(move |system: AgentSystem| {
            Box::pin(async move { system.register(&key, agent, options).await.map(drop) })
        }));
        self
    }

    /// Settings of the sessions.
    pub fn sessions(mut self, config: SessionConfig) -> Self {
        self.sessions = config;
        self
    }

    /// Registers saga step handler `name`.
    pub fn step(mut self, name: &str, handler: impl StepHandler) -> Self {
        self.handlers.register(name, handler);
        self
    }

    /// Registers a workflow (its handlers must be registered too).
    pub fn workflow(mut self, definition: SagaDefinition) -> Self {
        self.workflows.push(definition);
        self
    }

    /// Most sagas running at once.
    pub fn max_sagas(mut self, n: usize) -> Self {
        self.max_sagas = Some(n);
        self
    }

    /// The root supervisor (strategy, intensity, backoff, children).
    pub fn root(mut self, spec: SupervisorSpec) -> Self {
        self.root = spec;
        self
    }

    /// Adds a child to the root supervisor.
    pub fn child(mut self, child: ChildSpec) -> Self {
        self.root = self.root.child(child);
        self
    }

    /// Settings of the durable timers.
    pub fn timers(mut self, config: TimerConfig) -> Self {
        self.timers = config;
        self
    }

    /// Default time-out of `send` and `ask` on agent handles. Default 30 s.
    pub fn ask_timeout(mut self, t: Duration) -> Self {
        self.ask_timeout = t;
        self
    }

    /// Most time `shutdown` waits for each stage. Default 30 s.
    pub fn shutdown_timeout(mut self, t: Duration) -> Self {
        self.shutdown_timeout = t;
        self
    }

    /// Whether `build` resumes unfinished sagas and session turns. Default
    /// true; a server that resumes them itself says false.
    pub fn resume(mut self, resume: bool) -> Self {
        self.resume = resume;
        self
    }

    /// Opens the journal, starts everything under the root supervisor and
    /// resumes unfinished work (see the [crate docs](crate)).
    pub async fn build(self) -> Result<Troupe, RuntimeError> {
        let (journal, tiered): (Arc<dyn Journal>, Option<TieredJournal>) = match &self.journal {
            Some(j) => (j.clone(), None),
            None => {
                let config = JournalConfig {
                    data_dir: self.data_dir.join("journal"),
                    durability: self.durability,
                    tiers: self.storage.clone(),
                };
                match config.open_tiered()? {
                    Some(t) => (Arc::new(t.clone()), Some(t)),
                    None => (config.open()?, None),
                }
            }
        };
        let in_memory = self.journal.is_none() && self.durability == Durability::InMemory;
        let (timer_child, timers) = Timers::child("system", journal.clone(), self.timers)?;
        // The caller's spec keeps its strategy and intensity; Troupe's own
        // children come first, so they start before (and stop after) yours.
        let mut root = self.root;
        let mut lease_journal = None;
        let gpu = match self.gpus {
            Some(probe) => {
                let leases: Arc<dyn Journal> = match (self.lease_journal, in_memory, &self.journal)
                {
                    (Some(j), _, _) => j,
                    (None, true, _) | (None, false, Some(_)) => Arc::new(InMemoryJournal::new()),
                    (None, false, None) => JournalConfig {
                        data_dir: self.data_dir.join("leases"),
                        durability: Durability::Buffered,
                        tiers: None,
                    }
                    .open()?,
                };
                lease_journal = Some(leases.clone());
                let config = self.gpu_config;
                let (child, handle) = GpuSupervisorHandle::child("gpus", move || GpuArgs {
                    probe: probe.clone(),
                    journal: leases.clone(),
                    config: config.clone(),
                });
                root = root.prepend(child);
                Some(handle)
            }
            None => None,
        };
        let root = SupervisorHandle::spawn(root.prepend(timer_child)).await?;
        let mut inference = Inference::new();
        for (name, backend) in self.backends {
            inference = inference.with_shared_backend(&name, backend);
        }
        if let Some(g) = &gpu {
            inference = inference.with_gpu(g.clone());
        }
        let sessions = Sessions::new(journal.clone(), self.sessions);
        let agents = AgentSystem::with_config(
            sessions.clone(),
            inference,
            SystemConfig {
                timers: Some(timers.clone()),
                ask_timeout: Some(self.ask_timeout),
                blobs: tiered.as_ref().map(|t| t.blobs().clone()),
            },
        );
        let mut sagas = Sagas::new(journal.clone(), self.handlers).with_timers(timers.clone());
        if let Some(n) = self.max_sagas {
            sagas = sagas.with_max_running(n);
        }
        let registered = async {
            for register in self.agents {
                register(agents.clone()).await?;
            }
            for w in self.workflows {
                sagas.register(w)?;
            }
            Ok::<_, RuntimeError>(())
        }
        .await;
        let troupe = Troupe {
            journal,
            tiered,
            lease_journal,
            root,
            gpu,
            timers,
            agents,
            sagas,
            drains: Mutex::new(Vec::new()),
            shutdown_timeout: self.shutdown_timeout,
        };
        // A system that cannot start is stopped again (its actors, the
        // journal's lock) before the error is returned: a retry in the same
        // process finds nothing left over.
        let started = async {
            registered?;
            if self.resume {
                let sagas = troupe.sagas.resume_all().await?;
                let turns = troupe.agents.resume_turns().await?;
                if sagas + turns > 0 {
                    tracing::info!(sagas, turns, "resumed unfinished work");
                }
            }
            Ok::<_, RuntimeError>(())
        }
        .await;
        match started {
            Ok(()) => Ok(troupe),
            Err(e) => {
                if let Err(stop) = troupe.shutdown().await {
                    tracing::warn!(error = %stop, "stopping a system that failed to start");
                }
                Err(e)
            }
        }
    }
}

/// What is running, for a readiness probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// The durable timers.
    pub timers: bool,
    /// The GPU supervisor (None: the system has no GPUs).
    pub gpus: Option<bool>,
}

impl Readiness {
    /// Everything configured is running.
    pub fn is_ready(&self) -> bool {
        self.timers && self.gpus != Some(false)
    }
}

/// A running Troupe system. See the [crate docs](crate).
pub struct Troupe {
    journal: Arc<dyn Journal>,
    tiered: Option<TieredJournal>,
    lease_journal: Option<Arc<dyn Journal>>,
    root: SupervisorHandle,
    gpu: Option<GpuSupervisorHandle>,
    timers: Timers,
    agents: AgentSystem,
    sagas: Sagas,
    drains: Mutex<Vec<Drain>>,
    shutdown_timeout: Duration,
}

impl Troupe {
    /// A builder with the defaults.
    pub fn builder() -> TroupeBuilder {
        TroupeBuilder::default()
    }

    /// The system's journal.
    pub fn journal(&self) -> Arc<dyn Journal> {
        self.journal.clone()
    }

    /// The tiered journal, when storage tiers are configured.
    pub fn tiered(&self) -> Option<&TieredJournal> {
        self.tiered.as_ref()
    }

    /// The journal of lease decisions, when the system has GPUs.
    pub fn lease_journal(&self) -> Option<&Arc<dyn Journal>> {
        self.lease_journal.as_ref()
    }

    /// The root supervisor.
    pub fn root(&self) -> &SupervisorHandle {
        &self.root
    }

    /// The agents (and the sessions, models, topics and timers they share).
    pub fn agents(&self) -> &AgentSystem {
        &self.agents
    }

    /// The agent kind registered under `key`.
    pub fn agent<A: Agent>(&self, key: &AgentKey<A>) -> Result<AgentKind<A>, AgentError> {
        self.agents.agent(key)
    }

    /// The sessions.
    pub fn sessions(&self) -> &Sessions {
        self.agents.sessions()
    }

    /// The models.
    pub fn inference(&self) -> &Inference {
        self.agents.inference()
    }

    /// The sagas.
    pub fn sagas(&self) -> &Sagas {
        &self.sagas
    }

    /// The GPU supervisor, when the system has GPUs.
    pub fn gpu(&self) -> Option<&GpuSupervisorHandle> {
        self.gpu.as_ref()
    }

    /// The durable timers.
    pub fn timers(&self) -> &Timers {
        &self.timers
    }

    /// What is running now.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            timers: self.timers.is_running(),
            gpus: self.gpu.as_ref().map(|g| g.is_running()),
        }
    }

    /// A registry of durable entities of type `E`, passivated on shutdown.
    pub fn entities<E: EventSourced>(&self, entity: E, config: EntityConfig) -> Entities<E> {
        let entities = Entities::new(entity, self.journal.clone(), config);
        let e = entities.clone();
        let drain: Drain = Box::new(move || {
            let e = e.clone();
            Box::pin(async move { e.passivate_all().await })
        });
        self.drains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(drain);
        entities
    }

    /// Stops everything in order (agents, sessions, sagas and entities,
    /// the root's children: your actors, the GPU supervisor, the timers)
    /// and makes every acknowledged event durable, then closes the journal.
    /// Each stage waits at most the shutdown time-out. Call it once; the
    /// system takes no work after it.
    pub async fn shutdown(&self) -> Result<(), RuntimeError> {
        let grace = self.shutdown_timeout;
        let stage = |what: &'static str| {
            move |r: Result<(), tokio::time::error::Elapsed>| {
                if r.is_err() {
                    tracing::warn!("{what} did not stop within {grace:?}; going on");
                }
            }
        };
        stage("agents")(tokio::time::timeout(grace, self.agents.stop()).await);
        stage("sessions")(tokio::time::timeout(grace, self.sessions().passivate_all()).await);
        let drains = std::mem::take(&mut *self.drains.lock().unwrap_or_else(|p| p.into_inner()));
        let entities = async {
            futures::future::join_all(drains.iter().map(|d| d())).await;
            self.sagas.stop_all().await;
        };
        stage("sagas and entities")(tokio::time::timeout(grace, entities).await);
        self.root.stop(grace).await;
        // Both journals are flushed and closed whatever the other did; the
        // first failure is returned.
        let mut result = self.journal.flush().await;
        self.journal.close().await;
        if let Some(l) = &self.lease_journal {
            let leases = l.flush().await;
            l.close().await;
            result = result.and(leases);
        }
        result?;
        tracing::info!("troupe shut down");
        Ok(())
    }

    /// Waits for Ctrl-C (SIGINT), then shuts down.
    pub async fn run_until_ctrl_c(&self) -> Result<(), RuntimeError> {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C; shutting down now");
        }
        self.shutdown().await
    }
}

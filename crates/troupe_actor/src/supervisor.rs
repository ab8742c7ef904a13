//! Supervision in the OTP mould, on ractor links.
//!
//! ractor delivers a supervision event to an actor's parent when the actor
//! fails or stops, and leaves the rest to us. A Troupe [`Supervisor`] starts
//! its children from [`ChildSpec`]s, in order, linked to itself, and when one
//! ends it decides by the child's [`Restart`] policy and its own
//! [`Strategy`] what to restart, waiting a [`Backoff`] delay first. Past its
//! [`Intensity`] (N restarts in a window) it stops its children and fails to
//! its own parent, which then applies *its* policy: supervisors nest.
//!
//! ## Restart policy against exit cause
//!
//! | policy | child fails (error or panic) | child stops normally |
//! |---|---|---|
//! | `Permanent` | restarted | restarted |
//! | `Transient` | restarted | stays stopped |
//! | `Temporary` | stays stopped | stays stopped |
//!
//! ## Strategies
//!
//! | strategy | when child *k* is restarted | pick it when |
//! |---|---|---|
//! | `OneForOne` | only *k* | children are independent (the default) |
//! | `OneForAll` | every child, in start order | children share state and must restart together |
//! | `RestForOne` | *k* and every child started after it | later children depend on earlier ones |
//!
//! A restarted durable actor recovers from its journal in `pre_start`, so
//! restarting loses nothing that was acknowledged. A child whose start fails
//! (its recovery found the journal unavailable, say) counts as another
//! failure: it is retried after a longer backoff, within the intensity.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rand::Rng;

use crate::error::ActorError;
use crate::mailbox::{self, ActorHandle};

/// When a child is restarted (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Restart {
    /// Always restarted.
    #[default]
    Permanent,
    /// Restarted only after a failure.
    Transient,
    /// Never restarted.
    Temporary,
}

/// Which children restart together (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Only the child that ended.
    #[default]
    OneForOne,
    /// Every child.
    OneForAll,
    /// The child that ended and every child started after it.
    RestForOne,
}

/// At most `max_restarts` restarts within `window`; one more and the
/// supervisor fails to its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    /// Restarts allowed in the window.
    pub max_restarts: u32,
    /// The sliding window.
    pub window: Duration,
}

impl Default for Intensity {
    /// OTP's default: 3 restarts in 5 seconds.
    fn default() -> Self {
        Self {
            max_restarts: 3,
            window: Duration::from_secs(5),
        }
    }
}

/// Delay before a restart: `min * 2^(n-1)` for the n-th recent restart of a
/// child, capped at `max`, then scaled by a random factor in
/// `[1 - jitter, 1 + jitter]` so that many children do not restart in step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// First delay.
    pub min: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Relative jitter, 0 to 1.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(10),
            max: Duration::from_secs(5),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// No delay at all (tests).
    pub fn none() -> Self {
        Self {
            min: Duration::ZERO,
            max: Duration::ZERO,
            jitter: 0.0,
        }
    }

    /// The delay before the `n`-th recent restart (n >= 1).
    pub fn delay(&self, n: u32) -> Duration {
        let exp = n.saturating_sub(1).min(30);
        let base = self.min.saturating_mul(1u32 << exp).min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 || base.is_zero() {
            return base;
        }
        let factor = rand::rng().random_range((1.0 - jitter)..=(1.0 + jitter));
        base.mul_f64(factor).min(self.max)
    }
}

type StartFn = Arc<
    dyn Fn(ActorCell) -> Pin<Box<dyn Future<Output = Result<ActorCell, ActorError>> + Send>>
        + Send
        + Sync,
>;

/// How to start (and restart) one child.
#[derive(Clone)]
pub struct ChildSpec {
    name: String,
    restart: Restart,
    start: StartFn,
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("restart", &self.restart)
            .finish()
    }
}

impl ChildSpec {
    /// A child from a start function that spawns it linked to the given
    /// supervisor cell and returns its cell.
    pub fn from_fn<F, Fut>(name: impl Into<String>, restart: Restart, start: F) -> Self
    where
        F: Fn(ActorCell) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ActorCell, ActorError>> + Send + 'static,
    {
        Self {
            name: name.into(),
            restart,
            start: Arc::new(move |sup| Box::pin(start(sup))),
        }
    }

    /// A ractor actor with a bounded mailbox. `make` builds the actor and
    /// its arguments afresh for every incarnation. Returns the spec and a
    /// handle that stays valid across restarts.
    pub fn actor<A, F>(
        name: impl Into<String>,
        restart: Restart,
        mailbox_capacity: usize,
        make: F,
    ) -> (Self, ActorHandle<A::Msg>)
    where
        A: ractor::Actor,
        F: Fn() -> (A, A::Arguments) + Send + Sync + 'static,
    {
        let name = name.into();
        let handle = ActorHandle::detached(name.clone(), mailbox_capacity);
        let h = handle.clone();
        let make = Arc::new(make);
        let spec = Self::from_fn(name, restart, move |sup| {
            let (h, make) = (h.clone(), make.clone());
            async move {
                let (actor, args) = make();
                mailbox::start_into(&h, actor, args, Some(sup)).await
            }
        });
        (spec, handle)
    }

    /// A nested supervisor.
    pub fn supervisor(spec: SupervisorSpec, restart: Restart) -> (Self, SupervisorHandle) {
        let handle = SupervisorHandle::detached(&spec.name);
        let h = handle.clone();
        let name = spec.name.clone();
        let spec = Arc::new(spec);
        let child = Self::from_fn(name, restart, move |sup| {
            let (h, spec) = (h.clone(), spec.clone());
            async move { h.start((*spec).clone(), Some(sup)).await }
        });
        (child, handle)
    }

    /// The child's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A supervisor's configuration: its children, in start order, and how it
/// restarts them.
#[derive(Clone, Debug)]
pub struct SupervisorSpec {
    name: String,
    strategy: Strategy,
    intensity: Intensity,
    backoff: Backoff,
    children: Vec<ChildSpec>,
}

impl SupervisorSpec {
    /// A one-for-one supervisor with OTP's default intensity (3 in 5 s)
    /// and a 10 ms to 5 s backoff.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            strategy: Strategy::default(),
            intensity: Intensity::default(),
            backoff: Backoff::default(),
            children: Vec::new(),
        }
    }

    /// Sets the strategy.
    pub fn strategy(mut self, s: Strategy) -> Self {
        self.strategy = s;
        self
    }

    /// Sets the restart intensity.
    pub fn intensity(mut self, max_restarts: u32, window: Duration) -> Self {
        self.intensity = Intensity {
            max_restarts,
            window,
        };
        self
    }

    /// Sets the backoff between restarts.
    pub fn backoff(mut self, b: Backoff) -> Self {
        self.backoff = b;
        self
    }

    /// Adds a child before the others (started first, stopped last).
    pub fn prepend(mut self, c: ChildSpec) -> Self {
        self.children.insert(0, c);
        self
    }

    /// Adds a child (started after those added before it).
    pub fn child(mut self, c: ChildSpec) -> Self {
        self.children.push(c);
        self
    }
}

/// What a supervisor reports about one child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildInfo {
    /// Child name.
    pub name: String,
    /// Running now.
    pub running: bool,
    /// Restarts since the supervisor started.
    pub restarts: u32,
}

/// Messages a supervisor takes.
pub enum SupervisorMsg {
    /// (internal) restart these children after a backoff.
    #[doc(hidden)]
    Restart(Vec<usize>, u64),
    /// Reports every child's status.
    Children(RpcReplyPort<Vec<ChildInfo>>),
}

#[cfg(feature = "cluster")]
impl ractor::Message for SupervisorMsg {}

enum Status {
    Running(ActorCell),
    /// Waiting for a scheduled restart.
    Pending,
    Stopped,
}

struct Slot {
    spec: ChildSpec,
    status: Status,
    restarts: u32,
    recent: VecDeque<Instant>,
}

/// The supervisor actor. Spawn it through [`SupervisorHandle::start`] or as
/// a child with [`ChildSpec::supervisor`].
pub struct Supervisor;

/// The running state of a [`Supervisor`].
pub struct SupervisorState {
    spec: SupervisorSpec,
    slots: Vec<Slot>,
    restarts: VecDeque<Instant>,
    /// Children we stopped ourselves (for a group restart): their
    /// termination events are expected, not failures.
    stopping: HashSet<ActorId>,
    generation: u64,
}

impl ractor::Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorSpec;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        spec: SupervisorSpec,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut slots = Vec::with_capacity(spec.children.len());
        for child in &spec.children {
            match (child.start)(myself.get_cell()).await {
                Ok(cell) => slots.push(Slot {
                    spec: child.clone(),
                    status: Status::Running(cell),
                    restarts: 0,
                    recent: VecDeque::new(),
                }),
                Err(e) => {
                    // OTP: a child that cannot start fails the supervisor's start.
                    for s in slots.iter().rev() {
                        if let Status::Running(cell) = &s.status {
                            cell.stop(Some("supervisor start failed".into()));
                        }
                    }
                    return Err(Box::new(e));
                }
            }
        }
        tracing::debug!(supervisor = %spec.name, children = slots.len(), "supervisor started");
        Ok(SupervisorState {
            spec,
            slots,
            restarts: VecDeque::new(),
            stopping: HashSet::new(),
            generation: 0,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Stop children in reverse start order.
        for slot in state.slots.iter().rev() {
            if let Status::Running(cell) = &slot.status {
                let _ = cell
                    .stop_and_wait(
                        Some("supervisor stopped".into()),
                        Some(Duration::from_secs(5)),
                    )
                    .await;
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Children(reply) => {
                let info = state
                    .slots
                    .iter()
                    .map(|s| ChildInfo {
                        name: s.spec.name.clone(),
                        running: matches!(s.status, Status::Running(_)),
                        restarts: s.restarts,
                    })
                    .collect();
                let _ = reply.send(info);
            }
            SupervisorMsg::Restart(indices, generation) => {
                if generation != state.generation {
                    return Ok(()); // superseded by a later group restart
                }
                for idx in indices {
                    if !matches!(state.slots[idx].status, Status::Pending) {
                        continue;
                    }
                    match (state.slots[idx].spec.start)(myself.get_cell()).await {
                        Ok(cell) => {
                            let slot = &mut state.slots[idx];
                            slot.status = Status::Running(cell);
                            slot.restarts += 1;
                            metrics::counter!("troupe_supervisor_restarts_total", "child" => slot.spec.name.clone())
                                .increment(1);
                            tracing::info!(supervisor = %state.spec.name, child = %slot.spec.name, "child restarted");
                        }
                        Err(e) => {
                            tracing::warn!(supervisor = %state.spec.name, child = %state.slots[idx].spec.name, error = %e, "restart failed");
                            // A failed start is another failure of that child.
                            self.on_child_exit(&myself, state, idx, true).await?;
                            return Ok(());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, abnormal, why) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, true, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let abnormal = reason.as_deref().is_some_and(|r| r != "normal");
                (cell, abnormal, reason.unwrap_or_else(|| "normal".into()))
            }
            _ => return Ok(()),
        };
        let id = cell.get_id();
        if state.stopping.remove(&id) {
            return Ok(());
        }
        let Some(idx) = state
            .slots
            .iter()
            .position(|s| matches!(&s.status, Status::Running(c) if c.get_id() == id))
        else {
            return Ok(());
        };
        tracing::info!(supervisor = %state.spec.name, child = %state.slots[idx].spec.name, abnormal, reason = %why, "child ended");
        self.on_child_exit(&myself, state, idx, abnormal).await
    }
}

impl Supervisor {
    async fn on_child_exit(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
        idx: usize,
        abnormal: bool,
    ) -> Result<(), ActorProcessingErr> {
        let restart = match state.slots[idx].spec.restart {
            Restart::Permanent => true,
            Restart::Transient => abnormal,
            Restart::Temporary => false,
        };
        if !restart {
            state.slots[idx].status = Status::Stopped;
            return Ok(());
        }
        let now = Instant::now();
        let window = state.spec.intensity.window;
        state.restarts.push_back(now);
        while state
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            state.restarts.pop_front();
        }
        if state.restarts.len() as u32 > state.spec.intensity.max_restarts {
            tracing::error!(supervisor = %state.spec.name, "restart intensity exceeded; failing upward");
            state.slots[idx].status = Status::Stopped;
            for slot in state.slots.iter_mut().rev() {
                if let Status::Running(cell) = &slot.status {
                    state.stopping.insert(cell.get_id());
                    let _ = cell
                        .stop_and_wait(
                            Some("supervisor giving up".into()),
                            Some(Duration::from_secs(5)),
                        )
                        .await;
                }
                slot.status = Status::Stopped;
            }
            return Err(Box::new(ActorError::IntensityExceeded {
                supervisor: state.spec.name.clone(),
                max_restarts: state.spec.intensity.max_restarts,
                window,
            }));
        }
        let affected: Vec<usize> = match state.spec.strategy {
            Strategy::OneForOne => vec![idx],
            Strategy::OneForAll => (0..state.slots.len()).collect(),
            Strategy::RestForOne => (idx..state.slots.len()).collect(),
        };
        // Stop the others in reverse start order, then restart all in order.
        for &i in affected.iter().rev() {
            if let Status::Running(cell) = &state.slots[i].status {
                state.stopping.insert(cell.get_id());
                let _ = cell
                    .stop_and_wait(Some("sibling restart".into()), Some(Duration::from_secs(5)))
                    .await;
            }
        }
        let mut to_restart = Vec::new();
        for &i in &affected {
            let slot = &mut state.slots[i];
            let stopped_for_good = matches!(slot.status, Status::Stopped) && i != idx;
            if !stopped_for_good {
                slot.status = Status::Pending;
                to_restart.push(i);
            }
        }
        let slot = &mut state.slots[idx];
        slot.recent.push_back(now);
        while slot
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            slot.recent.pop_front();
        }
        let delay = state.spec.backoff.delay(slot.recent.len() as u32);
        state.generation += 1;
        let msg = SupervisorMsg::Restart(to_restart, state.generation);
        if delay.is_zero() {
            myself
                .cast(msg)
                .map_err(|e| format!("supervisor mailbox closed: {e}"))?;
        } else {
            myself.send_after(delay, move || msg);
        }
        Ok(())
    }
}

/// A stable handle on a supervisor: ask it for its children's status, or
/// stop it (its children stop first, in reverse start order).
#[derive(Clone)]
pub struct SupervisorHandle {
    name: String,
    current: Arc<arc_swap::ArcSwapOption<ActorRef<SupervisorMsg>>>,
}

impl SupervisorHandle {
    fn detached(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            current: Arc::default(),
        }
    }

    /// Starts a supervisor from `spec`, linked to `parent` if given.
    pub async fn start(
        &self,
        spec: SupervisorSpec,
        parent: Option<ActorCell>,
    ) -> Result<ActorCell, ActorError> {
        let name = spec.name.clone();
        let spawned = match parent {
            Some(p) => ractor::Actor::spawn_linked(None, Supervisor, spec, p).await,
            None => ractor::Actor::spawn(None, Supervisor, spec).await,
        };
        let (actor, _) = spawned.map_err(|e| ActorError::Spawn {
            actor: name,
            message: e.to_string(),
        })?;
        let cell = actor.get_cell();
        self.current.store(Some(Arc::new(actor)));
        Ok(cell)
    }

    /// Starts a top-level supervisor.
    pub async fn spawn(spec: SupervisorSpec) -> Result<Self, ActorError> {
        let h = Self::detached(&spec.name);
        h.start(spec, None).await?;
        Ok(h)
    }

    /// The supervisor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current incarnation's cell.
    pub fn cell(&self) -> Option<ActorCell> {
        self.current.load().as_ref().map(|a| a.get_cell())
    }

    /// Every child's status.
    pub async fn children(&self, timeout: Duration) -> Result<Vec<ChildInfo>, ActorError> {
        let actor = self
            .current
            .load_full()
            .ok_or_else(|| ActorError::NotRunning {
                actor: self.name.clone(),
            })?;
        match actor.call(SupervisorMsg::Children, Some(timeout)).await {
            Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
            Ok(ractor::rpc::CallResult::Timeout) => Err(ActorError::Timeout {
                actor: self.name.clone(),
                operation: "ask",
                after: timeout,
            }),
            _ => Err(ActorError::NotRunning {
                actor: self.name.clone(),
            }),
        }
    }

    /// Stops the supervisor and its children, waiting up to `timeout`.
    pub async fn stop(&self, timeout: Duration) {
        if let Some(actor) = self.current.load_full() {
            let _ = actor
                .stop_and_wait(Some("shutdown".into()), Some(timeout))
                .await;
        }
    }
}

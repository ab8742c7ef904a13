//! Agents: one instance per session, typed messages, durable state.
//!
//! An agent *kind* is registered once, under a typed [`AgentKey`]; every
//! session (or any other key) that names it gets an *instance* of its own:
//! an actor activated on demand (its state loaded from the journal),
//! passivated when idle, handling its messages one at a time. So N sessions
//! of one kind are answered concurrently, each with state that needs no
//! lock, bounded by the kind's [`AgentOptions::max_concurrent_turns`] and
//! by GPU leases, never by one mailbox.
//!
//! ```
//! use troupe_agent::{Agent, AgentError, AgentKey, Context, Handles};
//!
//! /// Answers with the model and its tools; counts the questions it got.
//! struct Concierge;
//!
//! /// The kind's typed key: the name sessions are opened with.
//! const CONCIERGE: AgentKey<Concierge> = AgentKey::new("concierge");
//!
//! impl Agent for Concierge {
//!     /// What the instance of one session remembers (journaled).
//!     type State = u32;
//!
//!     async fn on_turn(&self, asked: &mut u32, ctx: &mut Context<Self>) -> Result<(), AgentError> {
//!         *asked += 1;
//!         ctx.reply().await?; // the model, its tools, every chunk journaled
//!         Ok(())
//!     }
//! }
//!
//! /// A message of its own, with a typed reply.
//! struct HowMany;
//!
//! impl Handles<HowMany> for Concierge {
//!     type Reply = u32;
//!     async fn handle(&self, asked: &mut u32, _: HowMany, _: &mut Context<Self>) -> u32 {
//!         *asked
//!     }
//! }
//! ```
//!
//! ## What an instance receives
//!
//! | message | handled by | comes from |
//! |---|---|---|
//! | the session's pending user turn | [`Agent::on_turn`] (default: [`Context::reply`]) | [`Sessions::post`](crate::Sessions::post), [`Context::hand_off`], [`AgentSystem::answer`], a resume after a restart |
//! | any `M` the agent [`Handles`] | [`Handles::handle`], answering `Reply` | [`AgentRef::tell`], [`AgentRef::send`], [`AgentRef::ask`] |
//! | a durable timer | [`Agent::on_timer`] | [`Context::schedule_at`], after restarts too |
//!
//! ## State, failures, restarts
//!
//! The instance's [`Agent::State`] is journaled (as JSON, under
//! `agent.<kind>/<key>`) after every message that changed it, before an
//! `ask` is answered, and loaded again when the instance is activated. A
//! handler that returns an error or panics restarts its instance alone:
//! the state goes back to what was last journaled, the turn it was
//! answering is journaled as failed, an `ask` gets the error, and every
//! other instance carries on. A kind whose state is `()` (or any type of
//! size zero) never touches the journal for it.
//!
//! One caveat, by design: the state is journaled after the turn's own
//! events, so a process that dies between a turn's end and the state's
//! write loses that one state change (the turn itself is not run again).
//!
//! ## Addressing
//!
//! [`AgentKey<A>`] names a kind with its type, so a message the agent does
//! not handle is a compile error. User message and reply types need only
//! `Send + 'static`: Troupe wraps them in its own envelope. Time-outs are
//! set once per system ([`crate::AgentSystem::with_ask_timeout`]) and
//! overridden per call ([`AgentRef::timeout`]).

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::FutureExt;
use futures::future::BoxFuture;
use ractor::{ActorCell, ActorProcessingErr, ActorRef};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, Semaphore, oneshot};
use troupe_actor::{
    Activator, ActorError, ActorHandle, Keyed, KeyedConfig, Rejected, Timer, TimerTarget, mailbox,
};
use troupe_journal::{NewEvent, PersistenceId, Schema};

use crate::error::AgentError;
use crate::inference::{Holder, InferenceStream, LeaseSpec};
use crate::model::ChatRequest;
use crate::session::{SessionView, Sessions, TurnRef};
use crate::system::{AgentSystem, SystemInner};
use crate::tool::Tools;
use crate::topic::Published;
use crate::turn::ReplyRun;

/// An agent kind. See the [module docs](self).
///
/// `&self` is shared by every instance of the kind (its configuration, its
/// clients); what one instance remembers lives in `State`.
pub trait Agent: Sized + Send + Sync + 'static {
    /// What one instance remembers, journaled after each message that
    /// changes it. `()` for an agent that remembers nothing of its own
    /// (the conversation lives in the session either way).
    type State: Serialize + DeserializeOwned + Default + Send + Sync + 'static;

    /// Answers the session's pending user turn. The default replies with
    /// the model and this agent's tools ([`Context::reply`]). It must end
    /// the turn: reply, [`Context::hand_off`] it, or return an error (the
    /// turn is then journaled as failed).
    fn on_turn(
        &self,
        state: &mut Self::State,
        ctx: &mut Context<Self>,
    ) -> impl Future<Output = Result<(), AgentError>> + Send {
        let _ = state;
        async move { ctx.reply().await.map(drop) }
    }

    /// A durable timer scheduled with [`Context::schedule_at`] is due. It
    /// is delivered once its effect on the state is journaled; an error is
    /// retried (see [`troupe_actor::timers`]). Ignores timers by default.
    fn on_timer(
        &self,
        state: &mut Self::State,
        ctx: &mut Context<Self>,
        timer: TimerFired,
    ) -> impl Future<Output = Result<(), AgentError>> + Send {
        let _ = (state, ctx, timer);
        async { Ok(()) }
    }
}

/// A message type `M` an agent takes, with its reply.
pub trait Handles<M: Send + 'static>: Agent {
    /// What an `ask` gets back.
    type Reply: Send + 'static;

    /// Handles one message (one at a time per instance).
    fn handle(
        &self,
        state: &mut Self::State,
        msg: M,
        ctx: &mut Context<Self>,
    ) -> impl Future<Output = Self::Reply> + Send;
}

/// A due durable timer, as [`Agent::on_timer`] gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerFired {
    /// Its id (unique; a timer delivered again after a crash has the same).
    pub id: u64,
    /// The name it was scheduled with.
    pub name: String,
    /// Its payload.
    pub payload: serde_json::Value,
    /// When it was due.
    pub due: SystemTime,
}

/// The typed name of an agent kind: sessions are opened with the name,
/// handles are found with the key, and the type makes a message the agent
/// does not take a compile error.
pub struct AgentKey<A> {
    name: &'static str,
    _agent: PhantomData<fn() -> A>,
}

impl<A> AgentKey<A> {
    /// The key of kind `name` (letters, digits, `-`, `_` and `.`).
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            _agent: PhantomData,
        }
    }

    /// The kind's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl<A> Clone for AgentKey<A> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<A> Copy for AgentKey<A> {}

impl<A> std::fmt::Debug for AgentKey<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentKey({:?})", self.name)
    }
}

/// A turn being answered: its number, what cancels it, and the instance
/// (incarnation) answering it.
type Running = (u32, Arc<Notify>, u64);

/// Numbers the instances, so that the end of one incarnation never touches
/// a turn a later incarnation of the same key is answering.
static INCARNATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How the instances of one kind run and answer.
#[derive(Clone)]
pub struct AgentOptions {
    /// Tools the model may call.
    pub tools: Tools,
    /// Backend name (see [`crate::Inference`]).
    pub backend: String,
    /// Model name, as the backend knows it.
    pub model: String,
    /// System prompt put before the session's messages.
    pub system_prompt: Option<String>,
    /// What each inference asks of the GPUs.
    pub lease: LeaseSpec,
    /// Most model calls in one turn that end in tool calls.
    pub max_tool_rounds: u32,
    /// Most tool calls in one model answer.
    pub max_tool_calls: usize,
    /// Most chunks journaled in one append.
    pub chunk_batch: usize,
    /// Most turns of this kind answered at once (all instances together).
    pub max_concurrent_turns: usize,
    /// How long a turn waits for one of those slots before it fails with
    /// [`AgentError::Overloaded`].
    pub turn_wait: Duration,
    /// Mailbox capacity of each instance.
    pub mailbox: usize,
    /// Passivate an instance after this long without messages.
    pub idle_timeout: Option<Duration>,
    /// Most instances in memory at once.
    pub max_instances: usize,
    /// The schema a turn's answer must fit ([`Context::reply_as`] sets it
    /// for its turn); `None`: free text.
    pub output: Option<crate::OutputSchema>,
    /// Most times one turn's typed answer is sent back to the model to be
    /// repaired (every attempt of the turn counted) before the turn fails
    /// with [`AgentError::InvalidAnswer`].
    pub max_repairs: u32,
    /// Most attachment bytes sent to the model in one call, for backends
    /// that take attachments as content parts: the newest first, older ones
    /// past it as their reference line; a turn whose own attachments pass
    /// it fails with [`AgentError::TooLarge`].
    pub max_attachment_bytes: u64,
}

impl Default for AgentOptions {
    /// No tools, the `local` backend, default lease, 4 tool rounds of at
    /// most 16 calls, 64 chunks per append, 256 turns at once (a turn waits
    /// up to 10 s for a slot), mailboxes of 64, passivation after 60 s
    /// idle, at most 100,000 instances in memory, free-text answers (a
    /// typed one repaired at most twice), 20 MiB of attachments per model
    /// call.
    fn default() -> Self {
        Self {
            tools: Tools::new(),
            backend: "local".into(),
            model: "local".into(),
            system_prompt: None,
            lease: LeaseSpec::default(),
            max_tool_rounds: 4,
            max_tool_calls: 16,
            chunk_batch: 64,
            max_concurrent_turns: 256,
            turn_wait: Duration::from_secs(10),
            mailbox: 64,
            idle_timeout: Some(Duration::from_secs(60)),
            max_instances: 100_000,
            output: None,
            max_repairs: 2,
            max_attachment_bytes: 20 << 20,
        }
    }
}

impl AgentOptions {
    /// Sets the tools.
    pub fn tools(mut self, tools: Tools) -> Self {
        self.tools = tools;
        self
    }

    /// Sets the system prompt.
    pub fn system_prompt(mut self, prompt: impl Into<String>) -> Self {
        self.system_prompt = Some(prompt.into());
        self
    }

    /// Sets the lease each inference takes.
    pub fn lease(mut self, lease: LeaseSpec) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the backend and model.
    pub fn model(mut self, backend: impl Into<String>, model: impl Into<String>) -> Self {
        self.backend = backend.into();
        self.model = model.into();
        self
    }

    /// Sets the most turns answered at once and how long one more waits.
    pub fn concurrency(mut self, max_turns: usize, wait: Duration) -> Self {
        self.max_concurrent_turns = max_turns.max(1);
        self.turn_wait = wait;
        self
    }
}

/// The outcome of one turn run by [`Context::reply`].
#[derive(Debug, Clone, PartialEq)]
pub struct TurnOutcome {
    /// The turn and attempt answered.
    pub turn: TurnRef,
    /// The reply's text (of the last model call).
    pub text: String,
    /// Tool calls made (those an interrupted attempt left open included).
    pub tool_calls: u32,
    /// Chunks journaled.
    pub chunks: u32,
    /// Sequence of the `turn_completed` event.
    pub seq: u64,
    /// Tokens of every model call of this attempt together (tool rounds
    /// and repairs included), as the server counted them; `None` when it
    /// did not say.
    pub usage: Option<crate::Usage>,
}

type Done = oneshot::Sender<Result<TurnOutcome, AgentError>>;

/// A message of an agent instance: Troupe's own envelope around a turn, a
/// typed message with its reply, or a timer. Users never build one.
pub struct AgentMsg<A: Agent>(Job<A>);

#[cfg(feature = "cluster")]
impl<A: Agent> ractor::Message for AgentMsg<A> {}

enum Job<A: Agent> {
    Turn { turn: u32, done: Option<Done> },
    Call(Box<dyn Envelope<A>>),
    Timer(Timer, oneshot::Sender<Result<(), String>>),
}

/// A typed message and where its reply goes.
trait Envelope<A: Agent>: Send {
    fn run<'a>(
        &'a mut self,
        agent: &'a A,
        state: &'a mut A::State,
        ctx: &'a mut Context<A>,
    ) -> BoxFuture<'a, ()>;
    /// Sends the reply (after the state is journaled), or `error` instead.
    fn finish(self: Box<Self>, error: Option<AgentError>);
}

struct Call<M, R> {
    msg: Option<M>,
    result: Option<R>,
    reply: Option<oneshot::Sender<Result<R, AgentError>>>,
}

impl<A, M> Envelope<A> for Call<M, <A as Handles<M>>::Reply>
where
    A: Handles<M>,
    M: Send + 'static,
{
    fn run<'a>(
        &'a mut self,
        agent: &'a A,
        state: &'a mut A::State,
        ctx: &'a mut Context<A>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Some(msg) = self.msg.take() {
                self.result = Some(agent.handle(state, msg, ctx).await);
            }
        })
    }

    fn finish(self: Box<Self>, error: Option<AgentError>) {
        let Some(reply) = self.reply else { return };
        let _ = match (error, self.result) {
            (None, Some(r)) => reply.send(Ok(r)),
            (Some(e), _) => reply.send(Err(e)),
            (None, None) => reply.send(Err(AgentError::Invalid {
                what: "agent message".into(),
                message: "handled without a reply".into(),
            })),
        };
    }
}

/// What is shared by every instance of one kind.
pub(crate) struct KindCore<A: Agent> {
    pub(crate) name: Arc<str>,
    pub(crate) agent: A,
    pub(crate) options: Arc<AgentOptions>,
    pub(crate) system: Weak<SystemInner>,
    turns: Arc<Semaphore>,
    /// Turns running now, by key: the turn and what cancels it.
    running: Mutex<HashMap<Arc<str>, Running>>,
    restarts: metrics::Counter,
    restart_count: std::sync::atomic::AtomicU64,
    in_flight: metrics::Gauge,
}

impl<A: Agent> KindCore<A> {
    fn system(&self) -> Result<AgentSystem, AgentError> {
        self.system
            .upgrade()
            .map(AgentSystem::from_inner)
            .ok_or(AgentError::Actor(ActorError::ShuttingDown))
    }

    fn state_pid(&self, key: &str) -> Result<PersistenceId, AgentError> {
        PersistenceId::new(&format!("agent.{}", self.name), key).map_err(|e| AgentError::Invalid {
            what: "agent key".into(),
            message: e.to_string(),
        })
    }

    fn stateless() -> bool {
        std::mem::size_of::<A::State>() == 0
    }

    fn count_restart(&self) {
        self.restarts.increment(1);
        self.restart_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Incarnation `id` of `key` ended (its actor's value was dropped). If
    /// it died while answering a turn (it was killed, or its task aborted),
    /// that turn is dispatched again: a new attempt answers it.
    fn instance_ended(self: &Arc<Self>, key: &Arc<str>, id: u64) {
        let turn = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            match running.get(&**key) {
                Some(&(turn, _, by)) if by == id => {
                    running.remove(&**key);
                    turn
                }
                _ => return,
            }
        };
        tracing::warn!(agent = %self.name, key = %key, turn, "agent instance died during a turn; answering it again");
        self.count_restart();
        let (Ok(system), Ok(rt)) = (self.system(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let (name, key) = (self.name.to_string(), key.to_string());
        rt.spawn(async move {
            if let Ok(kind) = system.kind_dyn(&name) {
                kind.dispatch_turn(key, turn, None).await;
            }
        });
    }
}

/// A registered agent kind: its instances, by key. Cheap to clone.
pub struct AgentKind<A: Agent> {
    pub(crate) core: Arc<KindCore<A>>,
    keyed: Keyed<InstanceActivator<A>>,
    timeout: Duration,
}

impl<A: Agent> Clone for AgentKind<A> {
    fn clone(&self) -> Self {
        Self {
            core: self.core.clone(),
            keyed: self.keyed.clone(),
            timeout: self.timeout,
        }
    }
}

impl<A: Agent> AgentKind<A> {
    pub(crate) fn new(
        name: &str,
        agent: A,
        options: AgentOptions,
        system: Weak<SystemInner>,
        timeout: Duration,
    ) -> Self {
        let label = name.to_owned();
        let core = Arc::new(KindCore {
            name: Arc::from(name),
            agent,
            turns: Arc::new(Semaphore::new(options.max_concurrent_turns.max(1))),
            options: Arc::new(options.clone()),
            system,
            running: Mutex::new(HashMap::new()),
            restarts: metrics::counter!("troupe_agent_restarts_total", "agent" => label.clone()),
            restart_count: std::sync::atomic::AtomicU64::new(0),
            in_flight: metrics::gauge!("troupe_agent_turns_in_flight", "agent" => label),
        });
        let keyed = Keyed::new(
            format!("agent.{name}"),
            InstanceActivator { core: core.clone() },
            KeyedConfig {
                mailbox_capacity: options.mailbox.max(1),
                idle_timeout: options.idle_timeout,
                drain_timeout: Duration::from_secs(30),
                max_active: options.max_instances.max(1),
            },
        );
        Self {
            core,
            keyed,
            timeout,
        }
    }

    /// Kills the instance of `key` at once, as a crash would: for chaos
    /// drills and tests. A turn it was answering is answered again by a
    /// new attempt; its state comes back from the journal. Returns whether
    /// the instance was running.
    pub fn kill_instance(&self, key: &str) -> bool {
        match self.keyed.active_handle(key).and_then(|h| h.cell()) {
            Some(cell) => {
                cell.kill();
                true
            }
            None => false,
        }
    }

    /// The kind's name.
    pub fn name(&self) -> &str {
        &self.core.name
    }

    /// The kind's options.
    pub fn options(&self) -> &AgentOptions {
        &self.core.options
    }

    /// The instance of `key` (a session id): activated by its first message.
    pub fn get(&self, key: &str) -> AgentRef<A> {
        AgentRef {
            kind: self.clone(),
            key: Arc::from(key),
            timeout: self.timeout,
        }
    }

    /// Instances in memory now.
    pub fn active_count(&self) -> usize {
        self.keyed.active_count()
    }

    /// Turns being answered now.
    pub fn turns_in_flight(&self) -> usize {
        self.core.options.max_concurrent_turns.max(1) - self.core.turns.available_permits()
    }

    /// Instances restarted after a failure or a panic, since the start.
    pub fn restarts(&self) -> u64 {
        self.core
            .restart_count
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Passivates every instance (draining their mailboxes) and waits.
    pub async fn passivate_all(&self) {
        self.keyed.passivate_all().await
    }

    /// Sends a turn job; fails at once if the instance cannot take it.
    pub(crate) async fn dispatch(
        &self,
        key: &str,
        turn: u32,
        done: Option<Done>,
    ) -> Result<(), AgentError> {
        let msg = AgentMsg(Job::Turn { turn, done });
        match self.keyed.send(key, msg, self.timeout).await {
            Ok(()) => Ok(()),
            Err(Rejected { error, message }) => {
                if let AgentMsg(Job::Turn {
                    done: Some(done), ..
                }) = message
                {
                    let _ = done.send(Err(error.clone().into()));
                }
                Err(error.into())
            }
        }
    }

    /// Cancels the turn running at `key`; returns whether one was.
    pub(crate) fn cancel(&self, key: &str) -> bool {
        match self
            .core
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            Some((_, n, _)) => {
                n.notify_one();
                true
            }
            None => false,
        }
    }

    pub(crate) async fn deliver_timer(&self, timer: Timer) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        let key = timer.target.key.clone();
        self.keyed
            .send(&key, AgentMsg(Job::Timer(timer, tx)), self.timeout)
            .await
            .map_err(|r| r.error.to_string())?;
        rx.await
            .unwrap_or_else(|_| Err("the agent instance stopped".into()))
    }
}

/// The address of one agent instance (a kind and a key). Cheap to clone.
pub struct AgentRef<A: Agent> {
    kind: AgentKind<A>,
    key: Arc<str>,
    timeout: Duration,
}

impl<A: Agent> Clone for AgentRef<A> {
    fn clone(&self) -> Self {
        Self {
            kind: self.kind.clone(),
            key: self.key.clone(),
            timeout: self.timeout,
        }
    }
}

impl<A: Agent> std::fmt::Debug for AgentRef<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentRef({}/{})", self.kind.name(), self.key)
    }
}

impl<A: Agent> AgentRef<A> {
    /// The instance's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The same address with another time-out for `send` and `ask`.
    pub fn timeout(&self, timeout: Duration) -> Self {
        Self {
            timeout,
            ..self.clone()
        }
    }

    fn envelope<M: Send + 'static>(
        msg: M,
        reply: Option<oneshot::Sender<Result<<A as Handles<M>>::Reply, AgentError>>>,
    ) -> AgentMsg<A>
    where
        A: Handles<M>,
    {
        AgentMsg(Job::Call(Box::new(Call {
            msg: Some(msg),
            result: None,
            reply,
        })))
    }

    /// Enqueues `msg` if the instance's mailbox has room (activating the
    /// instance first if needed); fails at once with `Backpressure` if not.
    pub async fn tell<M: Send + 'static>(&self, msg: M) -> Result<(), AgentError>
    where
        A: Handles<M>,
    {
        self.kind
            .keyed
            .tell(&self.key, Self::envelope(msg, None))
            .await
            .map_err(|r| r.error.into())
    }

    /// Enqueues `msg`, waiting up to the time-out for room.
    pub async fn send<M: Send + 'static>(&self, msg: M) -> Result<(), AgentError>
    where
        A: Handles<M>,
    {
        self.kind
            .keyed
            .send(&self.key, Self::envelope(msg, None), self.timeout)
            .await
            .map_err(|r| r.error.into())
    }

    /// Sends `msg` and waits for the reply; the time-out bounds it all.
    pub async fn ask<M: Send + 'static>(
        &self,
        msg: M,
    ) -> Result<<A as Handles<M>>::Reply, AgentError>
    where
        A: Handles<M>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (tx, rx) = oneshot::channel();
        self.kind
            .keyed
            .send(&self.key, Self::envelope(msg, Some(tx)), self.timeout)
            .await
            .map_err(|r| AgentError::from(r.error))?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(AgentError::Actor(ActorError::NoReply {
                actor: format!("{}/{}", self.kind.name(), self.key),
            })),
            Err(_) => Err(AgentError::Timeout {
                what: format!("ask to `{}/{}`", self.kind.name(), self.key),
                after: self.timeout,
            }),
        }
    }

    /// Has the instance answer the pending turn `turn` of its session and
    /// waits for the outcome (for as long as the turn takes, a new attempt
    /// after a crash of the instance included).
    pub async fn answer(&self, turn: u32) -> Result<TurnOutcome, AgentError> {
        let system = self.kind.core.system()?;
        let (tx, rx) = oneshot::channel();
        self.kind.dispatch(&self.key, turn, Some(tx)).await?;
        match rx.await {
            Ok(r) => r,
            // The instance died with the turn: it is answered again; wait
            // for its end in the session.
            Err(_) => system.wait_turn_end(&self.key, turn).await,
        }
    }
}

/// The turn an instance is answering.
struct TurnSlot {
    number: u32,
    done: Option<Done>,
    outcome: Option<TurnOutcome>,
    /// How `reply` failed (the failure is journaled already).
    failed: Option<AgentError>,
    handed_off: bool,
    /// The kind's turn slot this turn holds.
    permit: Option<Arc<crate::turn::TurnPermit>>,
}

/// What an agent's handlers work through: its key, its session, other
/// agents, models, tools, topics and timers.
pub struct Context<A: Agent> {
    core: Arc<KindCore<A>>,
    system: AgentSystem,
    key: Arc<str>,
    cell: Option<ActorCell>,
    turn: Option<TurnSlot>,
}

impl<A: Agent> Context<A> {
    /// The instance's key (for agents of sessions, the session id).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The session this instance answers (its key).
    pub fn session(&self) -> &str {
        &self.key
    }

    /// The kind's name.
    pub fn agent_name(&self) -> &str {
        &self.core.name
    }

    /// The kind's options.
    pub fn options(&self) -> &AgentOptions {
        &self.core.options
    }

    /// The system.
    pub fn system(&self) -> &AgentSystem {
        &self.system
    }

    /// The sessions.
    pub fn sessions(&self) -> &Sessions {
        self.system.sessions()
    }

    /// This instance's own address.
    pub fn myself(&self) -> Result<AgentRef<A>, AgentError> {
        Ok(self
            .system
            .agent_named::<A>(&self.core.name)?
            .get(&self.key))
    }

    /// Another kind, by its typed key.
    pub fn agent<B: Agent>(&self, key: &AgentKey<B>) -> Result<AgentKind<B>, AgentError> {
        self.system.agent(key)
    }

    /// The turn being answered, if this message is one.
    pub fn turn(&self) -> Option<u32> {
        self.turn.as_ref().map(|t| t.number)
    }

    /// The session's state (the conversation, the turn in progress).
    pub async fn view(&self) -> Result<SessionView, AgentError> {
        self.sessions().view(&self.key).await
    }

    fn holder(&self) -> Holder {
        Holder {
            name: format!("{}/{}", self.core.name, self.key),
            actor: self.cell.clone(),
        }
    }

    /// Answers the pending turn with the model and this kind's tools: an
    /// attempt begins, the reply streams into the session chunk by chunk
    /// under a GPU lease, every tool call and result is journaled, and the
    /// turn ends with `turn_completed`. A failure is journaled as
    /// `turn_failed` (with the retry hint of an overload) and returned.
    pub async fn reply(&mut self) -> Result<TurnOutcome, AgentError> {
        let options = self.core.options.clone();
        self.reply_with(&options).await
    }

    /// [`Context::reply`] with other options for this turn (another system
    /// prompt, tools, model or lease).
    pub async fn reply_with(&mut self, options: &AgentOptions) -> Result<TurnOutcome, AgentError> {
        if self.turn.is_none() {
            return Err(AgentError::NothingToAnswer(self.key.to_string()));
        }
        let run = ReplyRun {
            sessions: self.system.sessions(),
            inference: self.system.inference(),
            session: &self.key,
            options,
            holder: self.holder(),
            system: self.system.clone(),
            permit: self.turn.as_ref().and_then(|t| t.permit.clone()),
        };
        let result = run.run().await;
        if let Some(t) = self.turn.as_mut() {
            match &result {
                Ok(outcome) => t.outcome = Some(outcome.clone()),
                Err(e) => t.failed = Some(e.clone()),
            }
        }
        result
    }

    /// [`Context::reply`] with a typed answer: the model is asked for JSON
    /// that fits `T`'s schema (derived with `schemars`; see
    /// [`crate::structured`]), an answer that does not fit is sent back to
    /// be repaired at most [`AgentOptions::max_repairs`] times, and the
    /// turn completes only with one that reads into `T`. Past the last
    /// repair the turn fails with [`AgentError::InvalidAnswer`], naming
    /// the field.
    pub async fn reply_as<T>(&mut self) -> Result<crate::Typed<T>, AgentError>
    where
        T: serde::de::DeserializeOwned + schemars::JsonSchema + 'static,
    {
        let mut options = AgentOptions::clone(&self.core.options);
        let schema = crate::OutputSchema::of::<T>();
        options.output = Some(schema.clone());
        let outcome = self.reply_with(&options).await?;
        let value = crate::structured::read(&schema, &outcome, self.key())?;
        Ok(crate::Typed { value, outcome })
    }

    /// Hands the pending turn to agent `to`, whose instance for this
    /// session answers it (and any resumed attempt of it). Journaled first.
    pub async fn hand_off<B: Agent>(&mut self, to: &AgentKey<B>) -> Result<(), AgentError> {
        let Some(slot) = self.turn.as_mut() else {
            return Err(AgentError::NothingToAnswer(self.key.to_string()));
        };
        let target = self.system.agent(to)?;
        self.system
            .sessions()
            .hand_off(&self.key, slot.number, to.name())
            .await?;
        let done = slot.done.take();
        // Marked handed off only once the target has it: a dispatch that
        // fails leaves the turn this instance's to fail.
        target.dispatch(&self.key, slot.number, done).await?;
        slot.handed_off = true;
        Ok(())
    }

    /// Calls one of this kind's tools directly (not journaled: inside a
    /// turn, [`Context::reply`] journals every call it makes).
    pub async fn call_tool(&self, name: &str, arguments: &str) -> Result<String, AgentError> {
        self.core.options.tools.call(name, arguments).await
    }

    /// Streams a model answer under a lease held by this instance (freed if
    /// it dies), outside the turn's journal (a router's own model call).
    pub async fn infer(&self, request: ChatRequest) -> Result<InferenceStream, AgentError> {
        let options = &self.core.options;
        self.system
            .inference()
            .stream(&options.backend, request, &options.lease, &self.holder())
            .await
    }

    /// Publishes `msg` on topic `topic` (see [`crate::Topics::publish`]).
    pub async fn publish<M: Clone + Send + Sync + 'static>(
        &self,
        topic: &str,
        msg: M,
    ) -> Result<Published, AgentError> {
        self.system.topics().publish(topic, msg).await
    }

    /// Schedules a durable timer for this instance at `due`: it reaches
    /// [`Agent::on_timer`] with `name` and `payload`, once, after restarts
    /// too. Returns its id once it is journaled.
    pub async fn schedule_at(
        &self,
        due: SystemTime,
        name: &str,
        payload: &impl Serialize,
    ) -> Result<u64, AgentError> {
        let timers = self.system.timers().ok_or_else(|| AgentError::Invalid {
            what: "timer".into(),
            message: "this system has no durable timers (build it with Troupe::builder)".into(),
        })?;
        let bytes = serde_json::to_vec(payload).map_err(|e| AgentError::Invalid {
            what: "timer payload".into(),
            message: e.to_string(),
        })?;
        let due_ms = due
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let target = TimerTarget::new(format!("agent.{}", self.core.name), self.key.to_string());
        Ok(timers.schedule(target, name, bytes, due_ms).await?)
    }

    /// [`Context::schedule_at`] `after` from now.
    pub async fn schedule_in(
        &self,
        after: Duration,
        name: &str,
        payload: &impl Serialize,
    ) -> Result<u64, AgentError> {
        self.schedule_at(SystemTime::now() + after, name, payload)
            .await
    }

    /// Cancels timer `id`; returns whether it was still pending.
    pub async fn cancel_timer(&self, id: u64) -> Result<bool, AgentError> {
        match self.system.timers() {
            Some(t) => Ok(t.cancel(id).await?),
            None => Ok(false),
        }
    }
}

/// What the journal holds of an instance's state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct AgentStateSaved {
    /// The state, as JSON.
    state: serde_json::Value,
    /// The latest timers delivered (deduplication after a crash).
    #[serde(default)]
    fired: Vec<u64>,
}

impl Schema for AgentStateSaved {
    const TYPE_NAME: &'static str = "agent.State";
}

/// Timers remembered per instance for deduplication.
const FIRED_KEPT: usize = 64;
/// Old state events are deleted every this many saves.
const PRUNE_EVERY: u64 = 64;

/// An instance's state as loaded or last journaled.
struct Loaded<A: Agent> {
    state: A::State,
    saved: Vec<u8>,
    seq: u64,
    fired: VecDeque<u64>,
}

async fn load<A: Agent>(core: &KindCore<A>, key: &str) -> Result<Loaded<A>, AgentError> {
    let state = A::State::default();
    let saved = serde_json::to_vec(&state).unwrap_or_default();
    let mut loaded = Loaded {
        state,
        saved,
        seq: 0,
        fired: VecDeque::new(),
    };
    if KindCore::<A>::stateless() {
        return Ok(loaded);
    }
    let system = core.system()?;
    let journal = system.sessions().journal();
    let pid = core.state_pid(key)?;
    let highest = journal.highest_seq(&pid).await?;
    loaded.seq = highest;
    if highest == 0 {
        return Ok(loaded);
    }
    let events = journal.replay(&pid, highest, highest).collect_all().await?;
    let Some(last) = events.last() else {
        return Ok(loaded);
    };
    let saved: AgentStateSaved = last.decode()?;
    loaded.state =
        serde_json::from_value(saved.state.clone()).map_err(|e| AgentError::Invalid {
            what: format!("journaled state of `{pid}` #{}", last.seq),
            message: e.to_string(),
        })?;
    loaded.saved = serde_json::to_vec(&saved.state).unwrap_or_default();
    loaded.fired = saved.fired.into_iter().collect();
    Ok(loaded)
}

struct InstanceActivator<A: Agent> {
    core: Arc<KindCore<A>>,
}

impl<A: Agent> Activator for InstanceActivator<A> {
    type Msg = AgentMsg<A>;

    fn check_key(&self, key: &str) -> Result<(), ActorError> {
        self.core
            .state_pid(key)
            .map(drop)
            .map_err(|e| ActorError::Invalid {
                what: "agent key",
                message: e.to_string(),
            })
    }

    fn activate(
        &self,
        key: &str,
    ) -> BoxFuture<'static, Result<ActorHandle<AgentMsg<A>>, ActorError>> {
        let core = self.core.clone();
        let key: Arc<str> = Arc::from(key);
        async move {
            let loaded = load(&core, &key).await.map_err(|e| ActorError::Spawn {
                actor: format!("{}/{key}", core.name),
                message: e.to_string(),
            })?;
            let handle = ActorHandle::detached_with_label(
                format!("{}/{key}", core.name),
                core.name.to_string(),
                core.options.mailbox.max(1),
            );
            let id = INCARNATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            mailbox::start_into(&handle, Instance { core, key, id }, loaded, None).await?;
            Ok(handle)
        }
        .boxed()
    }
}

/// The ractor actor of one instance.
struct Instance<A: Agent> {
    core: Arc<KindCore<A>>,
    key: Arc<str>,
    /// This incarnation's number (`INCARNATIONS`).
    id: u64,
}

impl<A: Agent> Drop for Instance<A> {
    /// The actor's value is dropped when its task ends, however it ends: a
    /// kill (whose handlers never finish) included.
    fn drop(&mut self) {
        self.core.instance_ended(&self.key, self.id);
    }
}

impl<A: Agent> ractor::Actor for Instance<A> {
    type Msg = AgentMsg<A>;
    type State = Loaded<A>;
    type Arguments = Loaded<A>;

    async fn pre_start(
        &self,
        _myself: ActorRef<AgentMsg<A>>,
        loaded: Loaded<A>,
    ) -> Result<Loaded<A>, ActorProcessingErr> {
        Ok(loaded)
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentMsg<A>>,
        AgentMsg(job): AgentMsg<A>,
        st: &mut Loaded<A>,
    ) -> Result<(), ActorProcessingErr> {
        let system = match self.core.system() {
            Ok(s) => s,
            Err(e) => {
                fail_job(job, e);
                return Ok(());
            }
        };
        let mut ctx = Context {
            core: self.core.clone(),
            system,
            key: self.key.clone(),
            cell: Some(myself.get_cell()),
            turn: None,
        };
        match job {
            Job::Turn { turn, done } => self.turn(st, &mut ctx, turn, done).await,
            Job::Call(mut envelope) => {
                let run = AssertUnwindSafe(envelope.run(&self.core.agent, &mut st.state, &mut ctx))
                    .catch_unwind()
                    .await;
                match run {
                    Ok(()) => {
                        let saved = self.save(st, &ctx, false).await;
                        envelope.finish(saved.err());
                    }
                    Err(panic) => {
                        let e = self.panicked(panic);
                        self.restart(st, &e).await;
                        envelope.finish(Some(e));
                    }
                }
            }
            Job::Timer(timer, ack) => {
                if st.fired.contains(&timer.id) {
                    let _ = ack.send(Ok(()));
                    return Ok(());
                }
                let fired = TimerFired {
                    id: timer.id,
                    name: timer.name.clone(),
                    payload: serde_json::from_slice(&timer.payload)
                        .unwrap_or(serde_json::Value::Null),
                    due: UNIX_EPOCH + Duration::from_millis(timer.due_ms),
                };
                let run =
                    AssertUnwindSafe(self.core.agent.on_timer(&mut st.state, &mut ctx, fired))
                        .catch_unwind()
                        .await;
                let outcome = match run {
                    Ok(Ok(())) => {
                        st.fired.push_back(timer.id);
                        while st.fired.len() > FIRED_KEPT {
                            st.fired.pop_front();
                        }
                        self.save(st, &ctx, true).await.map_err(|e| e.to_string())
                    }
                    Ok(Err(e)) => {
                        self.restart(st, &e).await;
                        Err(e.to_string())
                    }
                    Err(panic) => {
                        let e = self.panicked(panic);
                        self.restart(st, &e).await;
                        Err(e.to_string())
                    }
                };
                let _ = ack.send(outcome);
            }
        }
        Ok(())
    }
}

/// Counts a turn in flight until dropped (also when the instance is killed).
struct InFlight(metrics::Gauge);

impl InFlight {
    fn new(g: metrics::Gauge) -> Self {
        g.increment(1.0);
        Self(g)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

fn fail_job<A: Agent>(job: Job<A>, e: AgentError) {
    match job {
        Job::Turn { done: Some(d), .. } => {
            let _ = d.send(Err(e));
        }
        Job::Turn { .. } => {}
        Job::Call(envelope) => envelope.finish(Some(e)),
        Job::Timer(_, ack) => {
            let _ = ack.send(Err(e.to_string()));
        }
    }
}

impl<A: Agent> Instance<A> {
    fn panicked(&self, panic: Box<dyn Any + Send>) -> AgentError {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        AgentError::Panicked {
            agent: self.core.name.to_string(),
            key: self.key.to_string(),
            message,
        }
    }

    /// Restarts the instance: its state goes back to what was journaled.
    async fn restart(&self, st: &mut Loaded<A>, why: &AgentError) {
        tracing::warn!(agent = %self.core.name, key = %self.key, error = %why, "agent instance restarted");
        self.core.count_restart();
        match load(&self.core, &self.key).await {
            Ok(loaded) => *st = loaded,
            Err(e) => {
                tracing::warn!(agent = %self.core.name, key = %self.key, error = %e, "cannot reload agent state; starting from its default");
                *st = Loaded {
                    state: A::State::default(),
                    saved: Vec::new(),
                    seq: st.seq,
                    fired: VecDeque::new(),
                };
            }
        }
    }

    /// Journals the state if it changed (or `force`).
    async fn save(
        &self,
        st: &mut Loaded<A>,
        ctx: &Context<A>,
        force: bool,
    ) -> Result<(), AgentError> {
        if KindCore::<A>::stateless() && !force {
            return Ok(());
        }
        let value = serde_json::to_value(&st.state).map_err(|e| AgentError::Invalid {
            what: format!("state of agent `{}`", self.core.name),
            message: e.to_string(),
        })?;
        let bytes = serde_json::to_vec(&value).unwrap_or_default();
        if bytes == st.saved && !force {
            return Ok(());
        }
        let pid = self.core.state_pid(&self.key)?;
        let event = NewEvent::new(&AgentStateSaved {
            state: value,
            fired: st.fired.iter().copied().collect(),
        })?;
        let journal = ctx.system.sessions().journal();
        journal.append(&pid, st.seq, vec![event]).await?;
        st.seq += 1;
        st.saved = bytes;
        if st.seq.is_multiple_of(PRUNE_EVERY)
            && let Err(e) = journal.delete_events_to(&pid, st.seq - 1).await
        {
            tracing::warn!(%pid, error = %e, "cannot prune old agent states");
        }
        Ok(())
    }

    async fn turn(&self, st: &mut Loaded<A>, ctx: &mut Context<A>, turn: u32, done: Option<Done>) {
        let sessions = ctx.system.sessions().clone();
        let pending = match sessions.pending(&self.key).await {
            Ok(p) => p,
            Err(e) => {
                if let Some(d) = done {
                    let _ = d.send(Err(e));
                }
                return;
            }
        };
        // Already answered (a job sent twice), or not this turn.
        let Some(pending) = pending.filter(|p| p.turn == turn) else {
            if let Some(d) = done {
                let _ = d.send(Err(AgentError::NothingToAnswer(self.key.to_string())));
            }
            return;
        };
        // The turn belongs to another agent (it was handed off): forward.
        if pending.agent != *self.core.name {
            match ctx.system.kind_dyn(&pending.agent) {
                Ok(k) => k.dispatch_turn(self.key.to_string(), turn, done).await,
                Err(e) => {
                    let _ = sessions.fail_pending(&self.key, turn, &e).await;
                    if let Some(d) = done {
                        let _ = d.send(Err(e));
                    }
                }
            }
            return;
        }
        let opts = &self.core.options;
        let permit =
            match tokio::time::timeout(opts.turn_wait, self.core.turns.clone().acquire_owned())
                .await
            {
                Ok(Ok(p)) => p,
                _ => {
                    let e = AgentError::Overloaded {
                        retry_after: opts.turn_wait.max(Duration::from_millis(100)),
                        reason: format!(
                            "agent `{}` is answering {} turns, its most at once",
                            self.core.name, opts.max_concurrent_turns
                        ),
                    };
                    let _ = sessions.fail_pending(&self.key, turn, &e).await;
                    if let Some(d) = done {
                        let _ = d.send(Err(e));
                    }
                    return;
                }
            };
        let in_flight = InFlight::new(self.core.in_flight.clone());
        let cancel = Arc::new(Notify::new());
        self.core
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.key.clone(), (turn, cancel.clone(), self.id));
        ctx.turn = Some(TurnSlot {
            number: turn,
            done,
            outcome: None,
            failed: None,
            handed_off: false,
            permit: Some(Arc::new(crate::turn::TurnPermit::new(
                self.core.turns.clone(),
                permit,
            ))),
        });
        let handled = {
            let run = AssertUnwindSafe(self.core.agent.on_turn(&mut st.state, ctx)).catch_unwind();
            tokio::select! {
                r = run => Some(r),
                _ = cancel.notified() => None,
            }
        };
        self.core
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&*self.key);
        drop(in_flight);
        let mut slot = ctx.turn.take().expect("the turn slot is set above");
        drop(slot.permit.take());
        let result = match handled {
            None => {
                let e = AgentError::Failed {
                    agent: self.core.name.to_string(),
                    message: "the turn was cancelled".into(),
                };
                self.restart(st, &e).await;
                Err(e)
            }
            Some(Err(panic)) => {
                let e = self.panicked(panic);
                self.restart(st, &e).await;
                Err(e)
            }
            Some(Ok(Err(e))) => {
                self.restart(st, &e).await;
                Err(e)
            }
            Some(Ok(Ok(()))) if slot.handed_off => return,
            Some(Ok(Ok(()))) => {
                let saved = self.save(st, ctx, false).await;
                if let Err(e) = saved {
                    tracing::warn!(agent = %self.core.name, key = %self.key, error = %e, "cannot journal agent state after a turn");
                }
                match (slot.outcome, slot.failed) {
                    (Some(outcome), _) => Ok(outcome),
                    // `reply` failed and journaled it; the agent took it
                    // (a refused lease is the customer's business).
                    (None, Some(e)) => Err(e),
                    (None, None) => Err(AgentError::Failed {
                        agent: self.core.name.to_string(),
                        message: format!("returned from turn {turn} without answering it"),
                    }),
                }
            }
        };
        if let Err(e) = &result {
            // Whatever ended the turn without an answer is journaled, so
            // the session takes the next message.
            if let Err(j) = sessions.fail_pending(&self.key, turn, e).await {
                tracing::warn!(session = %self.key, error = %j, "could not journal a failed turn");
            }
        }
        if let Some(d) = slot.done {
            let _ = d.send(result);
        }
    }
}

//! Durable timers: "deliver this at that time", journaled, so it fires
//! after a restart too, and late rather than never.
//!
//! [`Timers`] is one actor that journals every timer it is given
//! ([`Timers::schedule`]) before answering, keeps them in memory ordered by
//! their due time, and when one is due hands it to the [`TimerSink`]
//! registered for its target's kind ([`Timers::register`]): agents, sagas,
//! or anything of yours. A delivery that succeeds is journaled as done; one
//! that fails is retried with backoff, up to [`TimerConfig::max_attempts`].
//!
//! Delivery is at least once: a crash between a delivery and its `done`
//! delivers the timer again after the restart. A target that must act
//! once records the timer's [`Timer::id`] with the effect it has (agents
//! and sagas do, in their own journals) and ignores an id it has seen.
//!
//! | bound | at the bound |
//! |---|---|
//! | [`TimerConfig::max_pending`] timers | `schedule` is refused with `Backpressure` |
//! | [`TimerConfig::max_payload`] bytes of payload | `schedule` is refused with `Invalid` |
//! | [`TimerConfig::max_in_flight`] deliveries at once | due timers wait for a free slot |
//! | [`TimerConfig::max_attempts`] failed deliveries | the timer is dropped, logged and counted (`troupe_timers_dropped_total`) |
//!
//! Time is wall-clock milliseconds since the Unix epoch (a timer is an
//! absolute time, so it means the same after a restart); a clock stepped
//! back delays timers, one stepped forward fires them early.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use troupe_journal::{Journal, JournalError, NewEvent, NewSnapshot, PersistenceId, Schema, now_ms};

use crate::error::ActorError;
use crate::mailbox::ActorHandle;
use crate::supervisor::{ChildSpec, Restart};

/// Who a timer is for: a kind (the sink that delivers it) and a key within it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TimerTarget {
    /// The kind, as registered with [`Timers::register`] (`saga`, `agent.support`...).
    pub kind: String,
    /// The key within the kind (a saga id, a session id...).
    pub key: String,
}

impl TimerTarget {
    /// A target.
    pub fn new(kind: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            key: key.into(),
        }
    }
}

/// A scheduled timer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    /// Unique in the journal it lives in; targets deduplicate on it.
    pub id: u64,
    /// Who it is for.
    pub target: TimerTarget,
    /// What it is (the target's own name for it).
    pub name: String,
    /// The target's own bytes.
    pub payload: Vec<u8>,
    /// When it is due, in ms since the Unix epoch.
    pub due_ms: u64,
}

/// Delivers the due timers of one target kind.
pub trait TimerSink: Send + Sync + 'static {
    /// Delivers `timer`. `Err` (with a reason) means "try again later".
    fn deliver(&self, timer: Timer) -> BoxFuture<'static, Result<(), String>>;
}

impl<F> TimerSink for F
where
    F: Fn(Timer) -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
{
    fn deliver(&self, timer: Timer) -> BoxFuture<'static, Result<(), String>> {
        self(timer)
    }
}

/// Settings of [`Timers`].
#[derive(Debug, Clone)]
pub struct TimerConfig {
    /// Most timers pending at once.
    pub max_pending: usize,
    /// Largest payload, in bytes.
    pub max_payload: usize,
    /// Most deliveries running at once.
    pub max_in_flight: usize,
    /// Failed deliveries of one timer before it is dropped.
    pub max_attempts: u32,
    /// Wait after the first failed delivery (doubled each time, at most 30 s).
    pub retry_backoff: Duration,
    /// Snapshot the timer table every this many journaled events.
    pub snapshot_every: u64,
    /// Mailbox capacity of the timer actor.
    pub mailbox: usize,
}

impl Default for TimerConfig {
    /// 100,000 pending timers of at most 64 KiB, 64 deliveries at once, 10
    /// attempts from 100 ms apart, a snapshot every 1,000 events.
    fn default() -> Self {
        Self {
            max_pending: 100_000,
            max_payload: 64 * 1024,
            max_in_flight: 64,
            max_attempts: 10,
            retry_backoff: Duration::from_millis(100),
            snapshot_every: 1_000,
            mailbox: 4_096,
        }
    }
}

/// What the timer actor journals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TimerEvent {
    /// A timer was scheduled.
    Set(Timer),
    /// A timer was delivered (or dropped after its last attempt).
    Done {
        /// Its id.
        id: u64,
    },
    /// A timer was cancelled before it was due.
    Cancelled {
        /// Its id.
        id: u64,
    },
}

impl Schema for TimerEvent {
    const TYPE_NAME: &'static str = "actor.TimerEvent";
}

/// The timer table (also its snapshot).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimerTable {
    timers: Vec<Timer>,
    next_id: u64,
}

impl Schema for TimerTable {
    const TYPE_NAME: &'static str = "actor.TimerTable";
}

type Sinks = Arc<RwLock<HashMap<String, Arc<dyn TimerSink>>>>;

/// Messages of the timer actor (use [`Timers`]).
pub enum TimerMsg {
    /// Schedule a timer.
    Schedule {
        /// Who it is for.
        target: TimerTarget,
        /// Its name.
        name: String,
        /// Its payload.
        payload: Vec<u8>,
        /// When.
        due_ms: u64,
        /// Its id once journaled.
        reply: RpcReplyPort<Result<u64, ActorError>>,
    },
    /// Cancel a timer; answers whether it was pending.
    Cancel(u64, RpcReplyPort<Result<bool, ActorError>>),
    /// How many timers are pending.
    Pending(RpcReplyPort<usize>),
    #[doc(hidden)]
    Wake,
    #[doc(hidden)]
    Delivered(u64, Result<(), String>),
}

#[cfg(feature = "cluster")]
impl ractor::Message for TimerMsg {}

struct TimerActor {
    journal: Arc<dyn Journal>,
    id: PersistenceId,
    config: TimerConfig,
    sinks: Sinks,
}

struct Live {
    timer: Timer,
    attempts: u32,
    /// When it may be tried next (its due time, or later after a failure).
    next_ms: u64,
}

struct TimerState {
    timers: HashMap<u64, Live>,
    order: BTreeSet<(u64, u64)>,
    in_flight: HashSet<u64>,
    next_id: u64,
    seq: u64,
    since_snapshot: u64,
    wake: Option<(u64, tokio::task::JoinHandle<()>)>,
    dropped: metrics::Counter,
    pending: metrics::Gauge,
}

impl TimerState {
    fn insert(&mut self, timer: Timer) {
        self.order.insert((timer.due_ms, timer.id));
        self.next_id = self.next_id.max(timer.id + 1);
        let next_ms = timer.due_ms;
        self.timers.insert(
            timer.id,
            Live {
                timer,
                attempts: 0,
                next_ms,
            },
        );
    }

    /// Forgets timer `id`. A delivery of it under way keeps its slot
    /// (`in_flight`) until it reports back (`Delivered`), so cancelling
    /// never lets more than `max_in_flight` run at once.
    fn remove(&mut self, id: u64) -> Option<Live> {
        let live = self.timers.remove(&id)?;
        self.order.remove(&(live.next_ms, id));
        Some(live)
    }

    fn apply(&mut self, event: &TimerEvent) {
        match event {
            TimerEvent::Set(t) => self.insert(t.clone()),
            TimerEvent::Done { id } | TimerEvent::Cancelled { id } => {
                self.remove(*id);
            }
        }
    }

    fn table(&self) -> TimerTable {
        let mut timers: Vec<Timer> = self.timers.values().map(|l| l.timer.clone()).collect();
        timers.sort_by_key(|t| t.id);
        TimerTable {
            timers,
            next_id: self.next_id,
        }
    }
}

impl TimerActor {
    async fn persist(&self, st: &mut TimerState, event: TimerEvent) -> Result<(), ActorError> {
        let journal_err = |e: JournalError| ActorError::journal(self.id.as_str(), e);
        let new = NewEvent::new(&event).map_err(journal_err)?;
        self.journal
            .append(&self.id, st.seq, vec![new])
            .await
            .map_err(journal_err)?;
        st.seq += 1;
        st.since_snapshot += 1;
        st.apply(&event);
        st.pending.set(st.timers.len() as f64);
        if st.since_snapshot >= self.config.snapshot_every {
            match NewSnapshot::new(st.seq, &st.table()) {
                Ok(snap) => match self.journal.save_snapshot(&self.id, snap).await {
                    Ok(()) => {
                        st.since_snapshot = 0;
                        if let Err(e) = self.journal.delete_events_to(&self.id, st.seq).await {
                            tracing::warn!(error = %e, "timers: cannot delete covered events");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "timers: cannot save a snapshot"),
                },
                Err(e) => tracing::warn!(error = %e, "timers: cannot encode a snapshot"),
            }
        }
        Ok(())
    }

    /// Starts the deliveries that are due and arms a wake-up for the next.
    fn schedule_work(&self, myself: &ActorRef<TimerMsg>, st: &mut TimerState) {
        let now = now_ms();
        let due: Vec<u64> = st
            .order
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| *id)
            .filter(|id| !st.in_flight.contains(id))
            .take(self.config.max_in_flight.saturating_sub(st.in_flight.len()))
            .collect();
        for id in due {
            let Some(live) = st.timers.get(&id) else {
                continue;
            };
            let timer = live.timer.clone();
            let sink = self
                .sinks
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&timer.target.kind)
                .cloned();
            st.in_flight.insert(id);
            let me = myself.clone();
            tokio::spawn(async move {
                let result = match sink {
                    Some(sink) => sink.deliver(timer).await,
                    None => Err(format!("no sink for `{}` yet", timer.target.kind)),
                };
                let _ = me.cast(TimerMsg::Delivered(id, result));
            });
        }
        // Every slot taken: the next `Delivered` schedules again (a wake-up
        // now would find the same due timers and nothing to do).
        if st.in_flight.len() >= self.config.max_in_flight.max(1) {
            if let Some((_, h)) = st.wake.take() {
                h.abort();
            }
            return;
        }
        // The next wake-up: the earliest timer not in flight.
        let next = st
            .order
            .iter()
            .find(|(_, id)| !st.in_flight.contains(id))
            .map(|(at, _)| *at);
        match (next, &st.wake) {
            (Some(at), Some((armed, _))) if *armed <= at => {}
            (Some(at), _) => {
                if let Some((_, h)) = st.wake.take() {
                    h.abort();
                }
                let me = myself.clone();
                let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                let h = tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = me.cast(TimerMsg::Wake);
                });
                st.wake = Some((at, h));
            }
            (None, _) => {}
        }
    }
}

impl ractor::Actor for TimerActor {
    type Msg = TimerMsg;
    type State = TimerState;
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<TimerMsg>,
        _: (),
    ) -> Result<TimerState, ActorProcessingErr> {
        let journal_err = |e: JournalError| ActorError::journal(self.id.as_str(), e);
        let mut st = TimerState {
            timers: HashMap::new(),
            order: BTreeSet::new(),
            in_flight: HashSet::new(),
            next_id: 1,
            seq: 0,
            since_snapshot: 0,
            wake: None,
            dropped: metrics::counter!("troupe_timers_dropped_total"),
            pending: metrics::gauge!("troupe_timers_pending"),
        };
        let mut from = 0;
        if let Some(snap) = self
            .journal
            .load_snapshot(&self.id)
            .await
            .map_err(journal_err)?
        {
            let table: TimerTable = snap.decode().map_err(journal_err)?;
            for t in table.timers {
                st.insert(t);
            }
            st.next_id = st.next_id.max(table.next_id);
            from = snap.seq;
        }
        let mut replay = self.journal.replay(&self.id, from + 1, u64::MAX);
        let mut seq = from;
        while let Some(batch) = replay.next().await {
            for ev in batch.map_err(journal_err)? {
                let event: TimerEvent = ev.decode().map_err(journal_err)?;
                st.apply(&event);
                seq = ev.seq;
            }
        }
        st.seq = seq.max(
            self.journal
                .highest_seq(&self.id)
                .await
                .map_err(journal_err)?,
        );
        st.pending.set(st.timers.len() as f64);
        tracing::debug!(pending = st.timers.len(), "timers recovered");
        self.schedule_work(&myself, &mut st);
        Ok(st)
    }

    async fn post_stop(
        &self,
        _: ActorRef<TimerMsg>,
        st: &mut TimerState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some((_, h)) = st.wake.take() {
            h.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<TimerMsg>,
        msg: TimerMsg,
        st: &mut TimerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TimerMsg::Schedule {
                target,
                name,
                payload,
                due_ms,
                reply,
            } => {
                if payload.len() > self.config.max_payload {
                    let _ = reply.send(Err(ActorError::Invalid {
                        what: "timer payload",
                        message: format!(
                            "{} bytes, more than the {} allowed",
                            payload.len(),
                            self.config.max_payload
                        ),
                    }));
                    return Ok(());
                }
                if st.timers.len() >= self.config.max_pending {
                    let _ = reply.send(Err(ActorError::Backpressure {
                        actor: "timers".into(),
                        capacity: self.config.max_pending,
                    }));
                    return Ok(());
                }
                let id = st.next_id;
                let timer = Timer {
                    id,
                    target,
                    name,
                    payload,
                    due_ms,
                };
                match self.persist(st, TimerEvent::Set(timer)).await {
                    Ok(()) => {
                        let _ = reply.send(Ok(id));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.clone()));
                        return Err(Box::new(e));
                    }
                }
            }
            TimerMsg::Cancel(id, reply) => {
                if !st.timers.contains_key(&id) {
                    let _ = reply.send(Ok(false));
                    return Ok(());
                }
                match self.persist(st, TimerEvent::Cancelled { id }).await {
                    Ok(()) => {
                        let _ = reply.send(Ok(true));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.clone()));
                        return Err(Box::new(e));
                    }
                }
            }
            TimerMsg::Pending(reply) => {
                let _ = reply.send(st.timers.len());
            }
            TimerMsg::Wake => {
                st.wake = None;
            }
            TimerMsg::Delivered(id, result) => {
                st.in_flight.remove(&id);
                match result {
                    Ok(()) => {
                        if st.timers.contains_key(&id) {
                            self.persist(st, TimerEvent::Done { id }).await?;
                        }
                    }
                    Err(reason) => {
                        let Some(live) = st.timers.get_mut(&id) else {
                            // Cancelled meanwhile: its slot is free now.
                            self.schedule_work(&myself, st);
                            return Ok(());
                        };
                        let no_sink = reason.starts_with("no sink for");
                        if !no_sink {
                            live.attempts += 1;
                        }
                        if live.attempts >= self.config.max_attempts {
                            tracing::warn!(id, target = ?live.timer.target, %reason, "timer dropped after its last attempt");
                            st.dropped.increment(1);
                            self.persist(st, TimerEvent::Done { id }).await?;
                        } else {
                            let wait = if no_sink {
                                Duration::from_secs(1)
                            } else {
                                self.config
                                    .retry_backoff
                                    .saturating_mul(1 << (live.attempts - 1).min(16))
                                    .min(Duration::from_secs(30))
                            };
                            let old = live.next_ms;
                            live.next_ms = now_ms() + wait.as_millis() as u64;
                            let next = live.next_ms;
                            st.order.remove(&(old, id));
                            st.order.insert((next, id));
                        }
                    }
                }
            }
        }
        self.schedule_work(&myself, st);
        Ok(())
    }
}

/// The durable timers of one system. Cheap to clone; stays valid across
/// restarts of the timer actor. See the [module docs](self).
#[derive(Clone)]
pub struct Timers {
    handle: ActorHandle<TimerMsg>,
    sinks: Sinks,
    timeout: Duration,
}

impl Timers {
    /// The timers journaled under `timers/{name}` in `journal`, as a child
    /// for a supervisor (restarted after a failure; it recovers from the
    /// journal) and the handle to use them.
    pub fn child(
        name: &str,
        journal: Arc<dyn Journal>,
        config: TimerConfig,
    ) -> Result<(ChildSpec, Timers), ActorError> {
        let id = PersistenceId::new("timers", name).map_err(|e| ActorError::Invalid {
            what: "timer table name",
            message: e.to_string(),
        })?;
        let sinks: Sinks = Arc::new(RwLock::new(HashMap::new()));
        let s = sinks.clone();
        let mailbox = config.mailbox;
        let (spec, handle) = ChildSpec::actor(
            format!("timers/{name}"),
            Restart::Permanent,
            mailbox,
            move || {
                (
                    TimerActor {
                        journal: journal.clone(),
                        id: id.clone(),
                        config: config.clone(),
                        sinks: s.clone(),
                    },
                    (),
                )
            },
        );
        Ok((
            spec,
            Timers {
                handle,
                sinks,
                timeout: Duration::from_secs(10),
            },
        ))
    }

    /// Delivers the timers of target kind `kind` through `sink` (replacing
    /// an earlier sink). Timers of a kind with no sink wait for one.
    pub fn register(&self, kind: &str, sink: impl TimerSink) {
        self.sinks
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(kind.to_owned(), Arc::new(sink));
    }

    /// Schedules `name` with `payload` for `target` at `due_ms` (ms since
    /// the Unix epoch; a time in the past fires at once). Returns its id
    /// once it is journaled.
    pub async fn schedule(
        &self,
        target: TimerTarget,
        name: &str,
        payload: Vec<u8>,
        due_ms: u64,
    ) -> Result<u64, ActorError> {
        let name = name.to_owned();
        self.handle
            .ask(
                |reply| TimerMsg::Schedule {
                    target,
                    name,
                    payload,
                    due_ms,
                    reply,
                },
                self.timeout,
            )
            .await?
    }

    /// Cancels timer `id`; returns whether it was still pending.
    pub async fn cancel(&self, id: u64) -> Result<bool, ActorError> {
        self.handle
            .ask(|reply| TimerMsg::Cancel(id, reply), self.timeout)
            .await?
    }

    /// How many timers are pending.
    pub async fn pending(&self) -> Result<usize, ActorError> {
        self.handle.ask(TimerMsg::Pending, self.timeout).await
    }

    /// Whether the timer actor is running now.
    pub fn is_running(&self) -> bool {
        self.handle.cell().is_some()
    }
}

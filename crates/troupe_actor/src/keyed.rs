//! Keyed actors: one actor per key, activated on demand, passivated when
//! idle. The machinery under [`Entities`](crate::Entities) (durable
//! entities) and Troupe's agents (one instance per session).
//!
//! [`Keyed<F>`] owns every live actor of one kind. The first message for a
//! key *activates* it: the [`Activator`] starts an actor for that key (a
//! durable actor recovers from its journal; an agent instance loads its
//! state). An actor idle for longer than [`KeyedConfig::idle_timeout`] is
//! *passivated*: its mailbox is drained, the actor stops and the registry
//! forgets it, so a passivated key costs no task, no actor and no memory.
//! The next message activates it again.
//!
//! Activation is single-flight: concurrent first messages for one key wait
//! on the same activation, and a message that arrives while the key is
//! passivating waits for it to finish, so one key never has two
//! incarnations.
//!
//! An actor that fails is simply forgotten: the next message re-activates
//! it. That is a transient, on-demand restart, the usual policy for
//! sharded entities.
//!
//! | bound | what happens at it |
//! |---|---|
//! | [`KeyedConfig::max_active`] keys in memory | a message for one more key is refused with `TooManyActive` |
//! | [`KeyedConfig::mailbox_capacity`] per actor | `tell` fails at once, `send`/`ask` wait up to their time-out |
//! | [`KeyedConfig::drain_timeout`] | a passivation stops the actor after this long even if its mailbox is not empty |

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use ractor::RpcReplyPort;

use crate::error::{ActorError, Rejected};
use crate::mailbox::{ActorHandle, DEFAULT_MAILBOX_CAPACITY};

/// Starts the actor of one key.
pub trait Activator: Send + Sync + 'static {
    /// What the actors take.
    type Msg: ractor::Message;

    /// Starts the actor for `key` and returns its handle (not linked to a
    /// supervisor: the registry restarts on demand). A failure is returned
    /// to every caller waiting for this activation.
    fn activate(&self, key: &str)
    -> BoxFuture<'static, Result<ActorHandle<Self::Msg>, ActorError>>;

    /// Checks a key before anything is started (a bad key is refused with a
    /// typed error, never activated). Accepts every key by default.
    fn check_key(&self, _key: &str) -> Result<(), ActorError> {
        Ok(())
    }
}

/// Settings of one keyed kind.
#[derive(Debug, Clone)]
pub struct KeyedConfig {
    /// Mailbox capacity of each actor.
    pub mailbox_capacity: usize,
    /// Passivate an actor after this long without messages (None: never).
    pub idle_timeout: Option<Duration>,
    /// Most time a passivation may take to drain a mailbox.
    pub drain_timeout: Duration,
    /// Most keys in memory at once (active, activating or passivating).
    pub max_active: usize,
}

impl Default for KeyedConfig {
    /// Mailboxes of 1,024, passivation after 2 minutes idle, at most
    /// 100,000 keys in memory.
    fn default() -> Self {
        Self {
            mailbox_capacity: DEFAULT_MAILBOX_CAPACITY,
            idle_timeout: Some(Duration::from_secs(120)),
            drain_timeout: Duration::from_secs(30),
            max_active: 100_000,
        }
    }
}

type Activation<C> = Shared<BoxFuture<'static, Result<ActorHandle<C>, ActorError>>>;

enum Slot<C> {
    Active {
        handle: ActorHandle<C>,
        last_used: Instant,
    },
    Activating(Activation<C>),
    Passivating(Shared<BoxFuture<'static, ()>>),
}

struct Inner<F: Activator> {
    kind: Arc<str>,
    activator: F,
    config: KeyedConfig,
    slots: Mutex<HashMap<String, Slot<F::Msg>>>,
    active: metrics::Gauge,
    refused: metrics::Counter,
    activations: metrics::Counter,
    passivations: metrics::Counter,
}

impl<F: Activator> Drop for Inner<F> {
    /// The registry is gone (its last clone dropped): stop the actors it
    /// still runs, or they would live on with nobody able to reach or
    /// passivate them. Messages still queued are dropped with them.
    fn drop(&mut self) {
        let slots = self.slots.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, slot) in slots.drain() {
            if let Slot::Active { handle, .. } = slot
                && let Some(cell) = handle.cell()
            {
                cell.stop(Some("keyed registry dropped".into()));
            }
        }
    }
}

/// The registry of one keyed kind. Cheap to clone.
pub struct Keyed<F: Activator> {
    inner: Arc<Inner<F>>,
    sweeper: Arc<SweeperGuard>,
}

impl<F: Activator> Clone for Keyed<F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            sweeper: self.sweeper.clone(),
        }
    }
}

struct SweeperGuard(Option<tokio::task::JoinHandle<()>>);

impl Drop for SweeperGuard {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

enum Wait<C> {
    Activation(Activation<C>),
    Passivation(Shared<BoxFuture<'static, ()>>),
}

/// Tries to deliver one message before giving up on a racing passivation or crash.
const DELIVERY_ATTEMPTS: u32 = 8;

impl<F: Activator> Keyed<F> {
    /// A registry of kind `kind` (the label of its metrics and the name in
    /// its errors). Starts the idle sweeper (must be called inside a Tokio
    /// runtime).
    pub fn new(kind: impl Into<Arc<str>>, activator: F, config: KeyedConfig) -> Self {
        let kind: Arc<str> = kind.into();
        let label = kind.to_string();
        let inner = Arc::new(Inner {
            active: metrics::gauge!("troupe_entities_active", "kind" => label.clone()),
            refused: metrics::counter!("troupe_entities_refused_total", "kind" => label.clone()),
            activations: metrics::counter!("troupe_entity_activations_total", "kind" => label.clone()),
            passivations: metrics::counter!("troupe_entity_passivations_total", "kind" => label),
            kind,
            activator,
            config,
            slots: Mutex::new(HashMap::new()),
        });
        let sweeper = inner.config.idle_timeout.map(|idle| {
            let weak = Arc::downgrade(&inner);
            let period = (idle / 2).max(Duration::from_millis(5));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    Self::sweep(&inner, idle);
                }
            })
        });
        Self {
            inner,
            sweeper: Arc::new(SweeperGuard(sweeper)),
        }
    }

    /// The kind's name.
    pub fn kind(&self) -> &str {
        &self.inner.kind
    }

    /// The activator.
    pub fn activator(&self) -> &F {
        &self.inner.activator
    }

    /// The settings.
    pub fn config(&self) -> &KeyedConfig {
        &self.inner.config
    }

    fn slots(inner: &Inner<F>) -> MutexGuard<'_, HashMap<String, Slot<F::Msg>>> {
        inner.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keys active now.
    pub fn active_count(&self) -> usize {
        Self::slots(&self.inner)
            .values()
            .filter(|s| matches!(s, Slot::Active { .. }))
            .count()
    }

    /// Keys in memory now (active, activating or passivating).
    pub fn in_memory(&self) -> usize {
        Self::slots(&self.inner).len()
    }

    /// Is `key` active now?
    pub fn is_active(&self, key: &str) -> bool {
        matches!(Self::slots(&self.inner).get(key), Some(Slot::Active { .. }))
    }

    /// The handle of `key`'s current incarnation if it is active, without
    /// activating it.
    pub fn active_handle(&self, key: &str) -> Option<ActorHandle<F::Msg>> {
        match Self::slots(&self.inner).get(key) {
            Some(Slot::Active { handle, .. }) if handle.cell().is_some() => Some(handle.clone()),
            _ => None,
        }
    }

    /// The handle of `key` if it is active and alive, marked as used now.
    fn touch_active(&self, key: &str) -> Option<ActorHandle<F::Msg>> {
        match Self::slots(&self.inner).get_mut(key) {
            Some(Slot::Active { handle, last_used }) if handle.cell().is_some() => {
                *last_used = Instant::now();
                Some(handle.clone())
            }
            _ => None,
        }
    }

    /// The handle of `key`'s current incarnation, activating it if needed.
    pub async fn handle(&self, key: &str) -> Result<ActorHandle<F::Msg>, ActorError> {
        loop {
            let wait = {
                let mut slots = Self::slots(&self.inner);
                match slots.get_mut(key) {
                    Some(Slot::Active { handle, last_used }) => {
                        if handle.cell().is_some() {
                            *last_used = Instant::now();
                            return Ok(handle.clone());
                        }
                        // The incarnation died: forget it and activate anew.
                        slots.remove(key);
                        self.inner.active.decrement(1.0);
                        Wait::Activation(self.start_activation(&mut slots, key))
                    }
                    Some(Slot::Activating(a)) => Wait::Activation(a.clone()),
                    Some(Slot::Passivating(p)) => Wait::Passivation(p.clone()),
                    None => {
                        // Checked only here: a key in the table was checked
                        // when it was activated.
                        self.inner.activator.check_key(key)?;
                        if slots.len() >= self.inner.config.max_active {
                            self.inner.refused.increment(1);
                            return Err(ActorError::TooManyActive {
                                kind: self.inner.kind.to_string(),
                                limit: self.inner.config.max_active,
                            });
                        }
                        Wait::Activation(self.start_activation(&mut slots, key))
                    }
                }
            };
            match wait {
                Wait::Activation(a) => {
                    a.await?;
                }
                Wait::Passivation(p) => p.await,
            }
        }
    }

    fn start_activation(
        &self,
        slots: &mut HashMap<String, Slot<F::Msg>>,
        key: &str,
    ) -> Activation<F::Msg> {
        let inner = self.inner.clone();
        let key_owned = key.to_owned();
        let started = inner.activator.activate(key);
        // The activation runs as its own task, which also records the
        // outcome: a caller that gives up (a time-out) cannot leave it
        // paused half-way, holding a journal read, until someone else asks.
        let task = tokio::spawn(async move {
            let result = started.await;
            let mut slots = Self::slots(&inner);
            match &result {
                Ok(handle) => {
                    slots.insert(
                        key_owned,
                        Slot::Active {
                            handle: handle.clone(),
                            last_used: Instant::now(),
                        },
                    );
                    inner.active.increment(1.0);
                    inner.activations.increment(1);
                }
                Err(_) => {
                    slots.remove(&key_owned);
                }
            }
            result
        });
        let key_for_err = format!("{}/{key}", self.inner.kind);
        let shared = task
            .map(move |joined| {
                joined.unwrap_or_else(|e| {
                    Err(ActorError::Spawn {
                        actor: key_for_err,
                        message: e.to_string(),
                    })
                })
            })
            .boxed()
            .shared();
        slots.insert(key.to_owned(), Slot::Activating(shared.clone()));
        shared
    }

    fn sweep(inner: &Arc<Inner<F>>, idle: Duration) {
        let now = Instant::now();
        let mut slots = Self::slots(inner);
        let idle_keys: Vec<String> = slots
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Active { handle, last_used }
                    if now.duration_since(*last_used) >= idle
                        && handle.depth() == 0
                        && !handle.is_busy() =>
                {
                    Some(k.clone())
                }
                _ => None,
            })
            .collect();
        for key in idle_keys {
            let Some(Slot::Active { handle, .. }) = slots.remove(&key) else {
                continue;
            };
            inner.active.decrement(1.0);
            let fut = Self::passivation(inner.clone(), key.clone(), handle);
            slots.insert(key, Slot::Passivating(fut));
        }
    }

    fn passivation(
        inner: Arc<Inner<F>>,
        key: String,
        handle: ActorHandle<F::Msg>,
    ) -> Shared<BoxFuture<'static, ()>> {
        let drain = inner.config.drain_timeout;
        let task = tokio::spawn(async move {
            if let Some(cell) = handle.cell() {
                // Drain: messages already queued are handled, then it stops.
                // One that does not stop in time is killed (a crash, as far
                // as it is concerned): the key is never left with an
                // incarnation still running that the table has forgotten.
                if cell.drain_and_wait(Some(drain)).await.is_err() {
                    tracing::warn!(kind = %inner.kind, %key, ?drain, "did not passivate in time; killed");
                    let _ = cell.kill_and_wait(Some(drain)).await;
                }
            }
            handle.detach();
            let mut slots = Self::slots(&inner);
            if matches!(slots.get(&key), Some(Slot::Passivating(_))) {
                slots.remove(&key);
                // Give memory back after a wave of passivations: a
                // passivated key should cost nothing, table slots included.
                if slots.capacity() > 64 && slots.len() * 4 < slots.capacity() {
                    let keep = slots.len() * 2;
                    slots.shrink_to(keep);
                }
            }
            inner.passivations.increment(1);
        });
        task.map(|_| ()).boxed().shared()
    }

    /// Delivers `msg` to `key` if its mailbox has room, activating it first
    /// if needed.
    pub async fn tell(&self, key: &str, msg: F::Msg) -> Result<(), Rejected<F::Msg>> {
        self.deliver(key, msg, None).await
    }

    /// Delivers `msg` to `key`, waiting up to `timeout` for activation and
    /// mailbox room.
    pub async fn send(
        &self,
        key: &str,
        msg: F::Msg,
        timeout: Duration,
    ) -> Result<(), Rejected<F::Msg>> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.deliver(key, msg, Some((deadline, timeout))).await
    }

    /// Activates `key` if needed and enqueues `msg`; with a deadline, waits
    /// up to it for mailbox room (and for activation), without one fails at
    /// once on a full mailbox. A passivation or crash that races the
    /// delivery is retried on the next incarnation, at most
    /// `DELIVERY_ATTEMPTS` times.
    async fn deliver(
        &self,
        key: &str,
        msg: F::Msg,
        deadline: Option<(tokio::time::Instant, Duration)>,
    ) -> Result<(), Rejected<F::Msg>> {
        let mut msg = msg;
        for _ in 0..DELIVERY_ATTEMPTS {
            // The common case, an active key, takes no timer.
            let handle = match (self.touch_active(key), deadline) {
                (Some(h), _) => Ok(h),
                (None, None) => self.handle(key).await,
                (None, Some((d, timeout))) => tokio::time::timeout_at(d, self.handle(key))
                    .await
                    .unwrap_or_else(|_| Err(self.timed_out(key, "send", timeout))),
            };
            let handle = match handle {
                Ok(h) => h,
                Err(error) => {
                    return Err(Rejected {
                        error,
                        message: msg,
                    });
                }
            };
            let sent = match (handle.tell(msg), deadline) {
                (
                    Err(Rejected {
                        error: ActorError::Backpressure { .. },
                        message,
                    }),
                    Some((d, _)),
                ) => {
                    let left = d.saturating_duration_since(tokio::time::Instant::now());
                    handle.send(message, left).await
                }
                (other, _) => other,
            };
            match sent {
                Err(Rejected {
                    error: ActorError::NotRunning { .. },
                    message,
                }) => msg = message, // raced with passivation or a crash
                other => return other,
            }
        }
        Err(Rejected {
            error: ActorError::NotRunning {
                actor: format!("{}/{key}", self.inner.kind),
            },
            message: msg,
        })
    }

    fn timed_out(&self, key: &str, operation: &'static str, after: Duration) -> ActorError {
        ActorError::Timeout {
            actor: format!("{}/{key}", self.inner.kind),
            operation,
            after,
        }
    }

    /// Sends the message `build` makes and waits for its reply; waits for
    /// mailbox room if needed. `timeout` bounds the whole exchange.
    pub async fn ask<R: Send + 'static>(
        &self,
        key: &str,
        build: impl FnOnce(RpcReplyPort<R>) -> F::Msg,
        timeout: Duration,
    ) -> Result<R, ActorError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.deliver(
            key,
            build(RpcReplyPort::from(tx)),
            Some((deadline, timeout)),
        )
        .await
        .map_err(Rejected::into_error)?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(ActorError::NoReply {
                actor: format!("{}/{key}", self.inner.kind),
            }),
            Err(_) => Err(self.timed_out(key, "ask", timeout)),
        }
    }

    /// Passivates every active key (draining their mailboxes) and waits.
    pub async fn passivate_all(&self) {
        self.passivate_where(|_| true).await;
    }

    /// Passivates `key` if it is active (draining its mailbox) and waits;
    /// returns whether it was.
    pub async fn passivate(&self, key: &str) -> bool {
        self.passivate_where(|k| k == key).await > 0
    }

    /// Passivates the active keys that match `which` (draining their
    /// mailboxes) and waits; returns how many it passivated. A cluster node
    /// calls it when keys move to another node.
    pub async fn passivate_where(&self, which: impl Fn(&str) -> bool) -> usize {
        // Activations under way finish first, so that they are passivated
        // too rather than left running.
        let activating: Vec<Activation<F::Msg>> = Self::slots(&self.inner)
            .iter()
            .filter(|(k, _)| which(k))
            .filter_map(|(_, slot)| match slot {
                Slot::Activating(a) => Some(a.clone()),
                _ => None,
            })
            .collect();
        futures::future::join_all(activating).await;
        let waits: Vec<Shared<BoxFuture<'static, ()>>> = {
            let mut slots = Self::slots(&self.inner);
            let keys: Vec<String> = slots.keys().filter(|k| which(k)).cloned().collect();
            let mut waits = Vec::new();
            for key in keys {
                match slots.remove(&key) {
                    Some(Slot::Active { handle, .. }) => {
                        self.inner.active.decrement(1.0);
                        let f = Self::passivation(self.inner.clone(), key.clone(), handle);
                        slots.insert(key, Slot::Passivating(f.clone()));
                        waits.push(f);
                    }
                    Some(Slot::Passivating(f)) => {
                        slots.insert(key, Slot::Passivating(f.clone()));
                        waits.push(f);
                    }
                    Some(other) => {
                        slots.insert(key, other);
                    }
                    None => {}
                }
            }
            waits
        };
        let n = waits.len();
        futures::future::join_all(waits).await;
        n
    }
}

//! Entities: durable actors addressed by key, activated on demand and
//! passivated when idle.
//!
//! [`Entities<E>`] owns every live actor of one [`EventSourced`] type. The
//! first message for a key *activates* it: the actor is spawned and
//! recovers from the journal. An entity idle for longer than
//! [`EntityConfig::idle_timeout`] is *passivated*: its mailbox is drained,
//! the actor stops and the registry forgets it, so a passivated entity costs
//! no task, no actor and no memory. The next message activates it again.
//!
//! Activation is single-flight: concurrent first messages for one key wait
//! on the same activation, and a message that arrives while the entity is
//! passivating waits for it to finish, so one entity never has two
//! incarnations (two writers would meet a `SeqConflict` in the journal,
//! which stays the last line of defence).
//!
//! An entity that fails (an append failed, its handler panicked) is simply
//! forgotten: the next message re-activates it from the journal. That is a
//! transient, on-demand restart, the usual policy for sharded entities.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use ractor::RpcReplyPort;
use troupe_journal::{Journal, PersistenceId};

use crate::durable::{DurableActor, DurableArgs, DurableConfig, EventSourced};
use crate::error::{ActorError, Rejected};
use crate::mailbox::{self, ActorHandle, DEFAULT_MAILBOX_CAPACITY};

/// Settings of one entity type.
#[derive(Clone)]
pub struct EntityConfig {
    /// Mailbox capacity of each entity.
    pub mailbox_capacity: usize,
    /// Passivate an entity after this long without messages (None: never).
    pub idle_timeout: Option<Duration>,
    /// Journal settings of the durable actors.
    pub durable: DurableConfig,
    /// Most time a passivation may take to drain a mailbox.
    pub drain_timeout: Duration,
    /// Most entities of this kind in memory at once (active, activating or
    /// passivating); a message for one more is refused with `Backpressure`.
    pub max_entities: usize,
}

impl Default for EntityConfig {
    /// Mailboxes of 1,024, passivation after 2 minutes idle, at most
    /// 100,000 entities in memory.
    fn default() -> Self {
        Self {
            mailbox_capacity: DEFAULT_MAILBOX_CAPACITY,
            idle_timeout: Some(Duration::from_secs(120)),
            durable: DurableConfig::default(),
            drain_timeout: Duration::from_secs(30),
            max_entities: 100_000,
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

struct Inner<E: EventSourced> {
    entity: Arc<E>,
    journal: Arc<dyn Journal>,
    config: EntityConfig,
    slots: Mutex<HashMap<String, Slot<E::Command>>>,
    active: metrics::Gauge,
}

impl<E: EventSourced> Drop for Inner<E> {
    /// The registry is gone (its last clone dropped): stop the entities it
    /// still runs, or they would live on with nobody able to reach or
    /// passivate them. Their events are journaled; messages still queued
    /// are dropped with them.
    fn drop(&mut self) {
        let slots = self.slots.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, slot) in slots.drain() {
            if let Slot::Active { handle, .. } = slot
                && let Some(cell) = handle.cell()
            {
                cell.stop(Some("entity registry dropped".into()));
            }
        }
    }
}

/// The registry of one entity type. Cheap to clone.
pub struct Entities<E: EventSourced> {
    inner: Arc<Inner<E>>,
    sweeper: Arc<SweeperGuard>,
}

impl<E: EventSourced> Clone for Entities<E> {
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

impl<E: EventSourced> Entities<E> {
    /// A registry for `entity`, journaling into `journal`. Starts the idle
    /// sweeper (must be called inside a Tokio runtime).
    pub fn new(entity: E, journal: Arc<dyn Journal>, config: EntityConfig) -> Self {
        let inner = Arc::new(Inner {
            entity: Arc::new(entity),
            journal,
            active: metrics::gauge!("troupe_entities_active", "kind" => E::KIND),
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

    fn slots(inner: &Inner<E>) -> MutexGuard<'_, HashMap<String, Slot<E::Command>>> {
        inner.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persistence_id(key: &str) -> Result<PersistenceId, ActorError> {
        PersistenceId::new(E::KIND, key).map_err(|e| ActorError::Invalid {
            what: "entity key",
            message: e.to_string(),
        })
    }

    /// Entities active now.
    pub fn active_count(&self) -> usize {
        Self::slots(&self.inner)
            .values()
            .filter(|s| matches!(s, Slot::Active { .. }))
            .count()
    }

    /// Is `key` active now?
    pub fn is_active(&self, key: &str) -> bool {
        matches!(Self::slots(&self.inner).get(key), Some(Slot::Active { .. }))
    }

    /// The handle of `key`'s current incarnation, activating it if needed.
    pub async fn handle(&self, key: &str) -> Result<ActorHandle<E::Command>, ActorError> {
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
                        Wait::Activation(self.start_activation(&mut slots, key)?)
                    }
                    Some(Slot::Activating(a)) => Wait::Activation(a.clone()),
                    Some(Slot::Passivating(p)) => Wait::Passivation(p.clone()),
                    None => {
                        if slots.len() >= self.inner.config.max_entities {
                            metrics::counter!("troupe_entities_refused_total", "kind" => E::KIND)
                                .increment(1);
                            return Err(ActorError::Backpressure {
                                actor: format!("{} entities", E::KIND),
                                capacity: self.inner.config.max_entities,
                            });
                        }
                        Wait::Activation(self.start_activation(&mut slots, key)?)
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
        slots: &mut HashMap<String, Slot<E::Command>>,
        key: &str,
    ) -> Result<Activation<E::Command>, ActorError> {
        let id = Self::persistence_id(key)?;
        let inner = self.inner.clone();
        let key_owned = key.to_owned();
        // The activation runs as its own task, which also records the
        // outcome, so a caller that gives up cannot leave the slot stuck.
        let task = tokio::spawn(async move {
            let args = DurableArgs {
                id: id.clone(),
                journal: inner.journal.clone(),
                config: inner.config.durable.clone(),
            };
            let handle = ActorHandle::detached_with_label(
                id.as_str(),
                E::KIND,
                inner.config.mailbox_capacity,
            );
            let result =
                mailbox::start_into(&handle, DurableActor(inner.entity.clone()), args, None)
                    .await
                    .map(|_| handle);
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
                    metrics::counter!("troupe_entity_activations_total", "kind" => E::KIND)
                        .increment(1);
                }
                Err(_) => {
                    slots.remove(&key_owned);
                }
            }
            result
        });
        let key_for_err = key.to_owned();
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
        Ok(shared)
    }

    fn sweep(inner: &Arc<Inner<E>>, idle: Duration) {
        let now = Instant::now();
        let mut slots = Self::slots(inner);
        let idle_keys: Vec<String> = slots
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Active { handle, last_used }
                    if now.duration_since(*last_used) >= idle && handle.depth() == 0 =>
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
        inner: Arc<Inner<E>>,
        key: String,
        handle: ActorHandle<E::Command>,
    ) -> Shared<BoxFuture<'static, ()>> {
        let drain = inner.config.drain_timeout;
        let task = tokio::spawn(async move {
            if let Some(cell) = handle.cell() {
                // Drain: messages already queued are handled, then it stops.
                let _ = cell.drain_and_wait(Some(drain)).await;
            }
            handle.detach();
            let mut slots = Self::slots(&inner);
            if matches!(slots.get(&key), Some(Slot::Passivating(_))) {
                slots.remove(&key);
                // Give memory back after a wave of passivations: a
                // passivated entity should cost nothing, table slots included.
                if slots.capacity() > 64 && slots.len() * 4 < slots.capacity() {
                    let keep = slots.len() * 2;
                    slots.shrink_to(keep);
                }
            }
            metrics::counter!("troupe_entity_passivations_total", "kind" => E::KIND).increment(1);
        });
        task.map(|_| ()).boxed().shared()
    }

    /// Delivers `command` to `key` if its mailbox has room, activating it
    /// first if needed.
    pub async fn tell(&self, key: &str, command: E::Command) -> Result<(), Rejected<E::Command>> {
        self.deliver(key, command, None).await
    }

    /// Activates `key` if needed and enqueues `command`; with a deadline,
    /// waits up to it for mailbox room (and for activation), without one
    /// fails at once on a full mailbox. A passivation or crash that races
    /// the delivery is retried on the next incarnation, at most
    /// `DELIVERY_ATTEMPTS` times.
    async fn deliver(
        &self,
        key: &str,
        command: E::Command,
        deadline: Option<(tokio::time::Instant, Duration)>,
    ) -> Result<(), Rejected<E::Command>> {
        let mut command = command;
        for _ in 0..DELIVERY_ATTEMPTS {
            let handle = match deadline {
                None => self.handle(key).await,
                Some((d, timeout)) => tokio::time::timeout_at(d, self.handle(key))
                    .await
                    .unwrap_or_else(|_| Err(self.timed_out(key, timeout))),
            };
            let handle = match handle {
                Ok(h) => h,
                Err(error) => {
                    return Err(Rejected {
                        error,
                        message: command,
                    });
                }
            };
            let sent = match (handle.tell(command), deadline) {
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
                }) => command = message, // raced with passivation or a crash
                other => return other,
            }
        }
        Err(Rejected {
            error: ActorError::NotRunning {
                actor: key.to_owned(),
            },
            message: command,
        })
    }

    fn timed_out(&self, key: &str, after: Duration) -> ActorError {
        ActorError::Timeout {
            actor: format!("{}/{key}", E::KIND),
            operation: "ask",
            after,
        }
    }

    /// Sends the command `build` makes and waits for its reply; waits for
    /// mailbox room if needed. `timeout` bounds the whole exchange.
    pub async fn ask<R: Send + 'static>(
        &self,
        key: &str,
        build: impl FnOnce(RpcReplyPort<R>) -> E::Command,
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
                actor: format!("{}/{key}", E::KIND),
            }),
            Err(_) => Err(ActorError::Timeout {
                actor: key.to_owned(),
                operation: "ask",
                after: timeout,
            }),
        }
    }

    /// Passivates every active entity (draining their mailboxes) and waits.
    pub async fn passivate_all(&self) {
        self.passivate_where(|_| true).await;
    }

    /// Passivates the active entities whose key matches `which` (draining
    /// their mailboxes) and waits; returns how many it passivated. A
    /// cluster node calls it when entities move to another node.
    pub async fn passivate_where(&self, which: impl Fn(&str) -> bool) -> usize {
        // Activations under way finish first, so that they are passivated
        // too rather than left running.
        let activating: Vec<Activation<E::Command>> = Self::slots(&self.inner)
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

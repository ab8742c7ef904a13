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

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use ractor::RpcReplyPort;
use troupe_journal::{Journal, PersistenceId};

use crate::durable::{DurableActor, DurableArgs, DurableConfig, EventSourced};
use crate::error::{ActorError, Rejected};
use crate::keyed::{Activator, Keyed, KeyedConfig};
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
    /// passivating); a message for one more is refused with `TooManyActive`.
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

impl EntityConfig {
    fn keyed(&self) -> KeyedConfig {
        KeyedConfig {
            mailbox_capacity: self.mailbox_capacity,
            idle_timeout: self.idle_timeout,
            drain_timeout: self.drain_timeout,
            max_active: self.max_entities,
        }
    }
}

/// Starts durable actors of one [`EventSourced`] type.
pub struct DurableActivator<E: EventSourced> {
    entity: Arc<E>,
    journal: Arc<dyn Journal>,
    config: EntityConfig,
}

impl<E: EventSourced> Activator for DurableActivator<E> {
    type Msg = E::Command;

    fn check_key(&self, key: &str) -> Result<(), ActorError> {
        persistence_id::<E>(key).map(drop)
    }

    fn activate(
        &self,
        key: &str,
    ) -> BoxFuture<'static, Result<ActorHandle<E::Command>, ActorError>> {
        let id = persistence_id::<E>(key);
        let (entity, journal) = (self.entity.clone(), self.journal.clone());
        let (durable, capacity) = (self.config.durable.clone(), self.config.mailbox_capacity);
        async move {
            let id = id?;
            let handle = ActorHandle::detached_with_label(id.as_str(), E::KIND, capacity);
            let args = DurableArgs {
                id,
                journal,
                config: durable,
            };
            mailbox::start_into(&handle, DurableActor(entity), args, None).await?;
            Ok(handle)
        }
        .boxed()
    }
}

fn persistence_id<E: EventSourced>(key: &str) -> Result<PersistenceId, ActorError> {
    PersistenceId::new(E::KIND, key).map_err(|e| ActorError::Invalid {
        what: "entity key",
        message: e.to_string(),
    })
}

/// The registry of one entity type. Cheap to clone.
pub struct Entities<E: EventSourced> {
    keyed: Keyed<DurableActivator<E>>,
}

impl<E: EventSourced> Clone for Entities<E> {
    fn clone(&self) -> Self {
        Self {
            keyed: self.keyed.clone(),
        }
    }
}

impl<E: EventSourced> Entities<E> {
    /// A registry for `entity`, journaling into `journal`. Starts the idle
    /// sweeper (must be called inside a Tokio runtime).
    pub fn new(entity: E, journal: Arc<dyn Journal>, config: EntityConfig) -> Self {
        let keyed = config.keyed();
        Self {
            keyed: Keyed::new(
                E::KIND,
                DurableActivator {
                    entity: Arc::new(entity),
                    journal,
                    config,
                },
                keyed,
            ),
        }
    }

    /// The journal the entities write to.
    pub fn journal(&self) -> &Arc<dyn Journal> {
        &self.keyed.activator().journal
    }

    /// Entities active now.
    pub fn active_count(&self) -> usize {
        self.keyed.active_count()
    }

    /// Is `key` active now?
    pub fn is_active(&self, key: &str) -> bool {
        self.keyed.is_active(key)
    }

    /// The handle of `key`'s current incarnation, activating it if needed.
    pub async fn handle(&self, key: &str) -> Result<ActorHandle<E::Command>, ActorError> {
        self.keyed.handle(key).await
    }

    /// Delivers `command` to `key` if its mailbox has room, activating it
    /// first if needed.
    pub async fn tell(&self, key: &str, command: E::Command) -> Result<(), Rejected<E::Command>> {
        self.keyed.tell(key, command).await
    }

    /// Sends the command `build` makes and waits for its reply; waits for
    /// mailbox room if needed. `timeout` bounds the whole exchange.
    pub async fn ask<R: Send + 'static>(
        &self,
        key: &str,
        build: impl FnOnce(RpcReplyPort<R>) -> E::Command,
        timeout: Duration,
    ) -> Result<R, ActorError> {
        self.keyed.ask(key, build, timeout).await
    }

    /// Passivates every active entity (draining their mailboxes) and waits.
    pub async fn passivate_all(&self) {
        self.keyed.passivate_all().await
    }

    /// Passivates the active entities whose key matches `which` (draining
    /// their mailboxes) and waits; returns how many it passivated. A
    /// cluster node calls it when entities move to another node.
    pub async fn passivate_where(&self, which: impl Fn(&str) -> bool) -> usize {
        self.keyed.passivate_where(which).await
    }
}

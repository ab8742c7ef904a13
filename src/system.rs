//! The [`Troupe`] system handle: one journal, one root supervisor, the
//! entity registries, and an orderly shutdown.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use troupe_actor::{
    ActorError, ChildSpec, Entities, EntityConfig, EventSourced, SupervisorHandle, SupervisorSpec,
};
use troupe_journal::{Durability, InMemoryJournal, Journal, RocksConfig, RocksJournal};

type Drain = Box<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

/// Builds a [`Troupe`]: where the journal lives, how durable it is, and the
/// root supervisor's children.
pub struct TroupeBuilder {
    data_dir: PathBuf,
    durability: Durability,
    root: SupervisorSpec,
    shutdown_timeout: Duration,
}

impl Default for TroupeBuilder {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("troupe-data"),
            durability: Durability::Fsync,
            root: SupervisorSpec::new("root"),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl TroupeBuilder {
    /// Data directory (the journal goes in `DIR/journal`). Default `./troupe-data`.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = dir.into();
        self
    }

    /// Journal durability. Default [`Durability::Fsync`].
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
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

    /// Most time `shutdown` waits for actors to stop. Default 30 s.
    pub fn shutdown_timeout(mut self, t: Duration) -> Self {
        self.shutdown_timeout = t;
        self
    }

    /// Opens the journal and starts the root supervisor.
    pub async fn build(self) -> Result<Troupe, ActorError> {
        let (journal, rocks): (Arc<dyn Journal>, Option<RocksJournal>) = match self.durability {
            Durability::InMemory => (Arc::new(InMemoryJournal::new()), None),
            d => {
                let config = RocksConfig::new(self.data_dir.join("journal")).durability(d);
                let rocks = RocksJournal::open(config).map_err(|e| ActorError::Journal {
                    actor: "journal".into(),
                    message: e.to_string(),
                    transient: e.is_transient(),
                })?;
                (Arc::new(rocks.clone()), Some(rocks))
            }
        };
        let root = SupervisorHandle::spawn(self.root).await?;
        Ok(Troupe {
            journal,
            rocks,
            root,
            drains: Mutex::new(Vec::new()),
            shutdown_timeout: self.shutdown_timeout,
        })
    }
}

/// A running Troupe system. Shut it down with [`Troupe::shutdown`] (or
/// [`Troupe::run_until_ctrl_c`]): entities drain their mailboxes, the root
/// supervisor stops its children in reverse start order, and the journal is
/// flushed and closed.
pub struct Troupe {
    journal: Arc<dyn Journal>,
    rocks: Option<RocksJournal>,
    root: SupervisorHandle,
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

    /// The root supervisor.
    pub fn root(&self) -> &SupervisorHandle {
        &self.root
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

    /// Stops everything in order and makes every acknowledged event durable.
    pub async fn shutdown(self) -> Result<(), ActorError> {
        let drains = std::mem::take(&mut *self.drains.lock().unwrap_or_else(|p| p.into_inner()));
        let all = futures::future::join_all(drains.iter().map(|d| d()));
        if tokio::time::timeout(self.shutdown_timeout, all)
            .await
            .is_err()
        {
            tracing::warn!("entities did not drain within the shutdown timeout");
        }
        self.root.stop(self.shutdown_timeout).await;
        self.journal
            .flush()
            .await
            .map_err(|e| ActorError::Journal {
                actor: "journal".into(),
                message: e.to_string(),
                transient: e.is_transient(),
            })?;
        if let Some(rocks) = &self.rocks {
            rocks.close().await;
        }
        tracing::info!("troupe shut down");
        Ok(())
    }

    /// Waits for Ctrl-C (SIGINT), then shuts down.
    pub async fn run_until_ctrl_c(self) -> Result<(), ActorError> {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C; shutting down now");
        }
        self.shutdown().await
    }
}

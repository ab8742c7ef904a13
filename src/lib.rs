//! # Troupe
//!
//! A Rust actor framework for AI agent systems: every agent, session and
//! GPU is a supervised actor, mailboxes are the message queue, and whatever
//! must survive a crash is journaled before anyone is told it happened.
//!
//! This facade re-exports the crates a user writes against:
//!
//! | module | crate | what it is for |
//! |---|---|---|
//! | [`journal`] | `troupe_journal` | the event journal: append, replay, snapshots, tags; storage tiers and blobs |
//! | [`postgres`] | `troupe_postgres` | the journal in PostgreSQL, shared by several processes |
//! | [`actor`] | `troupe_actor` | bounded mailboxes, supervision, durable actors, entities |
//! | [`gpu`] | `troupe_gpu` | GPU probes, leases, deadline-aware admission |
//! | [`saga`] | `troupe_saga` | DAG workflows with retries, compensation, signals |
//! | [`agent`] | `troupe_agent` | agents, durable sessions, model backends, tools, topics |
//! | [`gateway`] | `troupe_gateway` | the HTTP API: 202 submission, resumable SSE, tenants, metrics |
//! | `cluster` (feature `cluster`) | (here) | nodes on `ractor_cluster`: agents by name across nodes, entities placed by consistent hashing, GPU admission across nodes |
//! | [`Troupe`] | (here) | the system handle: journal + root supervisor + orderly shutdown |
//!
//! Most programs start with `use troupe::prelude::*;`.

#[cfg(feature = "cluster")]
pub mod cluster;
mod system;

pub use async_trait::async_trait;
pub use ractor;
pub use troupe_actor as actor;
pub use troupe_agent as agent;
pub use troupe_gateway as gateway;
pub use troupe_gpu as gpu;
pub use troupe_journal as journal;
pub use troupe_postgres as postgres;
pub use troupe_saga as saga;

pub use system::{Troupe, TroupeBuilder};

/// The names most programs need.
pub mod prelude {
    pub use crate::{Troupe, TroupeBuilder, async_trait};
    pub use troupe_actor::{
        ActorError, ActorHandle, Backoff, ChildSpec, DurableConfig, Effect, Entities, EntityConfig,
        EventSourced, Restart, RpcReplyPort, Strategy, SupervisorHandle, SupervisorSpec,
    };
    pub use troupe_agent::{
        Agent, AgentContext, AgentError, AgentOptions, AgentSystem, Inference, LeaseSpec,
        LocalBackend, OpenAiBackend, OpenAiConfig, SessionConfig, SessionEvent, SessionItem,
        Sessions, Tool, Tools,
    };
    pub use troupe_journal::{
        AppendOutcome, BlobRef, BlobStore, Durability, InMemoryJournal, Journal, JournalConfig,
        JournalError, NewEvent, NewSnapshot, PersistedEvent, PersistenceId, Replay, RocksConfig,
        RocksJournal, Schema, Snapshot, Tag, TaggedEvent, TierConfig, TieredJournal, Upcasters,
    };
}

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
//! | [`journal`] | `troupe_journal` | the event journal: append, replay, snapshots, tags |
//!
//! Most programs start with `use troupe::prelude::*;`.

pub use troupe_journal as journal;

/// The names most programs need.
pub mod prelude {
    pub use troupe_journal::{
        AppendOutcome, Durability, InMemoryJournal, Journal, JournalConfig, JournalError, NewEvent,
        NewSnapshot, PersistedEvent, PersistenceId, Replay, RocksConfig, RocksJournal, Schema,
        Snapshot, Tag, TaggedEvent, Upcasters,
    };
}

//! # troupe_journal: the event journal under every durable Troupe actor
//!
//! Whatever must survive a crash is written here before anyone is told it
//! happened. An entity's events form a stream under a [`PersistenceId`]
//! (`kind/key`), with dense sequence numbers from 1.
//!
//! ## Which backend
//!
//! | backend | use it for | durability |
//! |---|---|---|
//! | [`RocksJournal`] | production, examples, crash tests | [`Durability::Fsync`] (default) or [`Durability::Buffered`] |
//! | [`InMemoryJournal`] | unit tests, throwaway runs | [`Durability::InMemory`] |
//! | [`FaultyJournal`] | testing how *your* code handles journal faults | that of the wrapped backend |
//!
//! [`JournalConfig::open`] picks the backend from the durability, so
//! applications can switch with configuration alone.
//!
//! ## The contract
//!
//! - [`Journal::append`] is optimistic: it names the sequence the writer
//!   believes is current, and a stale writer gets [`JournalError::SeqConflict`]
//!   instead of overwriting anything.
//! - Appends are acknowledged only once durable. The RocksDB backend uses
//!   **group commit**: one writer thread commits every waiting append in one
//!   `WriteBatch` with one fsync.
//! - [`Journal::replay`] streams bounded batches, so recovering a long
//!   stream takes constant memory.
//! - Every stored event is an envelope (type name, schema version, time
//!   stamp, tags, rmp-serde payload, CRC-32). Bad bytes give
//!   [`JournalError::Corrupt`] naming the id and sequence; nothing panics.
//!   [`Upcasters`] read old schema versions.
//! - Tags give each tagged event a global offset; [`Journal::subscribe_tag`]
//!   catches up from an offset and follows live appends without gap or
//!   duplicate.
//! - [`tck`] is the conformance suite every backend must pass.
//!
//! ## Example
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use troupe_journal::{InMemoryJournal, Journal, NewEvent, PersistenceId, Schema};
//!
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! enum Account { Deposited(u64), Withdrawn(u64) }
//! impl Schema for Account { const TYPE_NAME: &'static str = "account.Event"; }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), troupe_journal::JournalError> {
//! let journal = InMemoryJournal::new();
//! let id = PersistenceId::parse("account/42")?;
//! journal.append(&id, 0, vec![NewEvent::new(&Account::Deposited(100))?]).await?;
//! journal.append(&id, 1, vec![NewEvent::new(&Account::Withdrawn(30))?]).await?;
//!
//! let balance = journal
//!     .replay(&id, 1, u64::MAX)
//!     .try_fold_events(0i64, |b, ev| Ok(match ev.decode::<Account>()? {
//!         Account::Deposited(n) => b + n as i64,
//!         Account::Withdrawn(n) => b - n as i64,
//!     }))
//!     .await?;
//! assert_eq!(balance, 70);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod envelope;
mod error;
mod event;
pub mod faulty;
mod id;
mod journal;
mod memory;
pub mod rocks;
pub mod subscription;
pub mod tck;
pub mod tiered;
mod upcast;

use std::path::PathBuf;
use std::sync::Arc;

pub use error::{EnvelopeError, JournalError, Result};
pub use event::{
    AppendOutcome, MAX_BLOBS_PER_EVENT, MAX_EVENTS_PER_APPEND, MAX_PAYLOAD_LEN, MAX_TAGS_PER_EVENT,
    MAX_TYPE_NAME_LEN, NewEvent, NewSnapshot, PersistedEvent, Schema, Snapshot, TaggedEvent,
    TypeName, TypeNameCache, now_ms,
};
pub use faulty::{FaultPlan, FaultyJournal};
pub use id::{MAX_ID_LEN, MAX_TAG_LEN, PersistenceId, Tag};
pub use journal::{DEFAULT_REPLAY_BATCH, Durability, Journal, Replay, TagSubscription};
pub use memory::InMemoryJournal;
/// Request checks shared by every backend (for implementing [`Journal`]).
pub mod backend {
    pub use crate::memory::{check_append, check_delete, check_snapshot};
}
pub use rocks::{
    BadEntry, Compression, MAX_REPORTED_BAD, RocksConfig, RocksJournal, VerifyReport,
    WarmCompression, WriterStats, replay_read_options,
};
pub use tiered::{
    ArchivePolicy, ArchiveReport, ArchiveStep, BlobConfig, BlobGcReport, BlobHash, BlobRef,
    BlobStore, ColdConfig, HotConfig, HotLimits, MAX_REPORTED_FAILURES, Objects, TierConfig,
    TierStats, TieredJournal,
};
pub use upcast::{MAX_UPCAST_STEPS, Upcasters};

/// Where and how to keep the journal; [`JournalConfig::open`] picks the backend.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JournalConfig {
    /// Data directory (ignored for [`Durability::InMemory`]).
    pub data_dir: PathBuf,
    /// What an acknowledged append promises.
    pub durability: Durability,
    /// Hot, cold and blob tiers around the RocksDB journal (none by
    /// default; not available with `in_memory` durability).
    #[serde(default)]
    pub tiers: Option<TierConfig>,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("troupe-data/journal"),
            durability: Durability::Fsync,
            tiers: None,
        }
    }
}

impl JournalConfig {
    /// Opens the backend the durability calls for: a [`TieredJournal`]
    /// when tiers are configured.
    pub fn open(&self) -> Result<Arc<dyn Journal>> {
        if let Some(t) = self.open_tiered()? {
            return Ok(Arc::new(t));
        }
        Ok(match self.durability {
            Durability::InMemory => Arc::new(InMemoryJournal::new()),
            d => Arc::new(RocksJournal::open(
                RocksConfig::new(&self.data_dir).durability(d),
            )?),
        })
    }

    /// Opens the tiered journal when tiers are configured (None otherwise).
    pub fn open_tiered(&self) -> Result<Option<TieredJournal>> {
        let Some(tiers) = &self.tiers else {
            return Ok(None);
        };
        if self.durability == Durability::InMemory {
            return Err(JournalError::InvalidName {
                what: "journal configuration",
                value: "in_memory".into(),
                reason: "tiers need a RocksDB journal (durability fsync or buffered)",
            });
        }
        tiers.validate()?;
        Ok(Some(TieredJournal::open(
            RocksConfig::new(&self.data_dir).durability(self.durability),
            tiers.clone(),
        )?))
    }
}

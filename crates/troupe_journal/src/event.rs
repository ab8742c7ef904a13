//! Events and snapshots as callers write them and as the journal returns them.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope;
use crate::error::{JournalError, Result};
use crate::id::{PersistenceId, Tag};
use crate::tiered::BlobRef;
use crate::upcast::Upcasters;

/// Largest encoded payload of one event or snapshot (16 MiB). Larger data
/// belongs in a blob store, referenced from the event.
pub const MAX_PAYLOAD_LEN: usize = 16 << 20;
/// Longest event or snapshot type name, in bytes.
pub const MAX_TYPE_NAME_LEN: usize = 255;
/// Most tags on one event.
pub const MAX_TAGS_PER_EVENT: usize = 16;
/// Most blob references on one event.
pub const MAX_BLOBS_PER_EVENT: usize = 64;
/// Most events in one `append` call.
pub const MAX_EVENTS_PER_APPEND: usize = 10_000;

/// A type stored in the journal, as an event or as snapshot state.
///
/// The type name is written into every envelope and checked on decode; the
/// schema version says which shape the payload has, and older versions are
/// brought up to date by [`Upcasters`]. Payloads are encoded with rmp-serde
/// as maps with field names, so adding a field with `#[serde(default)]` needs
/// no new version.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use troupe_journal::Schema;
///
/// #[derive(Serialize, Deserialize)]
/// enum CounterEvent { Added(u64), Reset }
///
/// impl Schema for CounterEvent {
///     const TYPE_NAME: &'static str = "counter.Event";
/// }
/// ```
pub trait Schema: Serialize + DeserializeOwned {
    /// Stable name written in the envelope; never rename it once events exist.
    const TYPE_NAME: &'static str;
    /// Current schema version of the payload.
    const SCHEMA_VERSION: u32 = 1;
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn encode_payload<T: Serialize>(type_name: &str, value: &T) -> Result<Vec<u8>> {
    rmp_serde::to_vec_named(value).map_err(|e| JournalError::Encode {
        type_name: type_name.to_owned(),
        message: e.to_string(),
    })
}

fn check_type_and_payload(type_name: &str, payload_len: usize) -> Result<()> {
    if type_name.is_empty() || type_name.len() > MAX_TYPE_NAME_LEN {
        return Err(JournalError::Encode {
            type_name: type_name.to_owned(),
            message: format!("type names must be 1 to {MAX_TYPE_NAME_LEN} bytes"),
        });
    }
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(JournalError::Encode {
            type_name: type_name.to_owned(),
            message: format!(
                "payload of {payload_len} bytes exceeds the {MAX_PAYLOAD_LEN}-byte limit; store large data as a blob and journal a reference"
            ),
        });
    }
    Ok(())
}

/// A type name: a `&'static str` from [`Schema::TYPE_NAME`] (no allocation)
/// or a shared string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeName {
    /// A compile-time name.
    Static(&'static str),
    /// A name known at run time.
    Shared(Arc<str>),
}

impl std::ops::Deref for TypeName {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            TypeName::Static(s) => s,
            TypeName::Shared(s) => s,
        }
    }
}

impl From<&TypeName> for Arc<str> {
    fn from(t: &TypeName) -> Arc<str> {
        match t {
            TypeName::Static(s) => Arc::from(*s),
            TypeName::Shared(s) => s.clone(),
        }
    }
}

/// An event to append: its type, schema version, encoded payload and tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Type name (see [`Schema::TYPE_NAME`]).
    pub event_type: TypeName,
    /// Schema version of the payload.
    pub schema_version: u32,
    /// rmp-serde bytes.
    pub payload: Vec<u8>,
    /// Tags for tag subscriptions.
    pub tags: Vec<Tag>,
    /// Write time in ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Blobs the payload refers to (see [`NewEvent::with_blob`]).
    pub blobs: Vec<BlobRef>,
}

impl NewEvent {
    /// Encodes a typed event.
    pub fn new<E: Schema>(event: &E) -> Result<Self> {
        let payload = encode_payload(E::TYPE_NAME, event)?;
        check_type_and_payload(E::TYPE_NAME, payload.len())?;
        Ok(Self {
            event_type: TypeName::Static(E::TYPE_NAME),
            schema_version: E::SCHEMA_VERSION,
            payload,
            tags: Vec::new(),
            timestamp_ms: now_ms(),
            blobs: Vec::new(),
        })
    }

    /// An event from already-encoded bytes (tools, upcasting tests, bridges).
    pub fn raw(event_type: &str, schema_version: u32, payload: Vec<u8>) -> Result<Self> {
        check_type_and_payload(event_type, payload.len())?;
        Ok(Self {
            event_type: TypeName::Shared(Arc::from(event_type)),
            schema_version,
            payload,
            tags: Vec::new(),
            timestamp_ms: now_ms(),
            blobs: Vec::new(),
        })
    }

    /// Adds a tag (at most [`MAX_TAGS_PER_EVENT`]; duplicates are ignored).
    pub fn with_tag(mut self, tag: Tag) -> Result<Self> {
        if !self.tags.contains(&tag) {
            if self.tags.len() >= MAX_TAGS_PER_EVENT {
                return Err(JournalError::Encode {
                    type_name: self.event_type.to_string(),
                    message: format!("more than {MAX_TAGS_PER_EVENT} tags"),
                });
            }
            self.tags.push(tag);
        }
        Ok(self)
    }

    /// Records that the payload refers to `blob` (at most
    /// [`MAX_BLOBS_PER_EVENT`]). The RocksDB backend indexes the reference
    /// in the same atomic write as the event, and the blob store keeps the
    /// blob while any stored event refers to it (archived events included);
    /// [`crate::TieredJournal`] also refuses an event whose blob is missing.
    pub fn with_blob(mut self, blob: &BlobRef) -> Result<Self> {
        if !self.blobs.iter().any(|b| b.hash == blob.hash) {
            if self.blobs.len() >= MAX_BLOBS_PER_EVENT {
                return Err(JournalError::Encode {
                    type_name: self.event_type.to_string(),
                    message: format!("more than {MAX_BLOBS_PER_EVENT} blob references"),
                });
            }
            self.blobs.push(blob.clone());
        }
        Ok(self)
    }

    /// Writes this event's envelope into `out`.
    pub fn encode_envelope(&self, out: &mut Vec<u8>) {
        let tags: Vec<&str> = self.tags.iter().map(Tag::as_str).collect();
        envelope::encode_event(
            out,
            self.schema_version,
            self.timestamp_ms,
            &self.event_type,
            &tags,
            &self.payload,
        );
    }

    pub(crate) fn into_persisted(self, id: PersistenceId, seq: u64) -> PersistedEvent {
        PersistedEvent {
            id,
            seq,
            event_type: Arc::from(&self.event_type),
            schema_version: self.schema_version,
            timestamp_ms: self.timestamp_ms,
            tags: self.tags,
            payload: self.payload,
        }
    }
}

/// An event read back from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistedEvent {
    /// Stream the event belongs to.
    pub id: PersistenceId,
    /// Sequence number within the stream (dense, from 1).
    pub seq: u64,
    /// Type name written with the event.
    pub event_type: Arc<str>,
    /// Schema version of the payload.
    pub schema_version: u32,
    /// Write time in ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Tags.
    pub tags: Vec<Tag>,
    /// rmp-serde bytes.
    pub payload: Vec<u8>,
}

impl PersistedEvent {
    /// Decodes the payload as `E`, which must have the same type name and
    /// schema version. Use [`Upcasters::decode`] to read older versions.
    pub fn decode<E: Schema>(&self) -> Result<E> {
        Upcasters::none().decode(self)
    }

    /// Decodes an envelope read from storage.
    pub fn from_envelope(
        id: &PersistenceId,
        seq: u64,
        bytes: &[u8],
        types: &mut TypeNameCache,
    ) -> Result<Self> {
        let env = envelope::decode_event(bytes).map_err(|reason| JournalError::Corrupt {
            id: id.clone(),
            seq,
            reason,
        })?;
        Ok(Self {
            id: id.clone(),
            seq,
            event_type: types.intern(env.event_type),
            schema_version: env.schema_version,
            timestamp_ms: env.timestamp_ms,
            tags: env.tags.into_iter().map(Tag::from_stored).collect(),
            payload: env.payload.to_vec(),
        })
    }
}

/// Shares one allocation per distinct event type name during a replay.
#[derive(Debug, Default)]
pub struct TypeNameCache {
    recent: Vec<Arc<str>>,
}

impl TypeNameCache {
    const CAPACITY: usize = 16;

    /// Returns a shared copy of `name`.
    pub fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(hit) = self.recent.iter().find(|n| &***n == name) {
            return hit.clone();
        }
        let arc: Arc<str> = Arc::from(name);
        if self.recent.len() == Self::CAPACITY {
            self.recent.remove(0);
        }
        self.recent.push(arc.clone());
        arc
    }
}

/// Where a successful append put its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Sequence of the first appended event.
    pub first_seq: u64,
    /// Sequence of the last appended event: the new highest sequence.
    pub last_seq: u64,
}

/// A snapshot to save: the state of an entity as of sequence `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot {
    /// The last event the snapshot includes.
    pub seq: u64,
    /// State type name.
    pub state_type: Arc<str>,
    /// Schema version of the state.
    pub schema_version: u32,
    /// rmp-serde bytes.
    pub payload: Vec<u8>,
}

impl NewSnapshot {
    /// Encodes typed state as of `seq`.
    pub fn new<S: Schema>(seq: u64, state: &S) -> Result<Self> {
        let payload = encode_payload(S::TYPE_NAME, state)?;
        check_type_and_payload(S::TYPE_NAME, payload.len())?;
        Ok(Self {
            seq,
            state_type: Arc::from(S::TYPE_NAME),
            schema_version: S::SCHEMA_VERSION,
            payload,
        })
    }

    /// Writes the snapshot envelope into `out`.
    pub fn encode_envelope(&self, out: &mut Vec<u8>) {
        envelope::encode_snapshot(
            out,
            self.seq,
            self.schema_version,
            now_ms(),
            &self.state_type,
            &self.payload,
        );
    }
}

/// A snapshot read back from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Stream the snapshot belongs to.
    pub id: PersistenceId,
    /// The last event the snapshot includes.
    pub seq: u64,
    /// State type name.
    pub state_type: Arc<str>,
    /// Schema version of the state.
    pub schema_version: u32,
    /// Write time in ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// rmp-serde bytes.
    pub payload: Vec<u8>,
}

impl Snapshot {
    /// Decodes a snapshot envelope read from storage.
    pub fn from_envelope(id: &PersistenceId, bytes: &[u8]) -> Result<Self> {
        let (seq, env) =
            envelope::decode_snapshot(bytes).map_err(|reason| JournalError::CorruptSnapshot {
                id: id.clone(),
                reason,
            })?;
        Ok(Self {
            id: id.clone(),
            seq,
            state_type: Arc::from(env.event_type),
            schema_version: env.schema_version,
            timestamp_ms: env.timestamp_ms,
            payload: env.payload.to_vec(),
        })
    }

    /// Decodes the state as `S` (same type name and version; see
    /// [`Upcasters::decode_snapshot`] for older versions).
    pub fn decode<S: Schema>(&self) -> Result<S> {
        Upcasters::none().decode_snapshot(self)
    }
}

/// An event found through a tag, with its global offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedEvent {
    /// Global offset: increases with every tagged event written, across all
    /// ids and tags, starting at 1.
    pub offset: u64,
    /// The event.
    pub event: PersistedEvent,
}

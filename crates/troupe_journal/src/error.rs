//! The journal's error type.

use crate::id::PersistenceId;

/// Why an envelope's bytes could not be decoded.
///
/// Carried inside [`JournalError::Corrupt`], which adds the persistence id and
/// sequence number of the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Fewer bytes than the smallest possible envelope.
    #[error("envelope is {len} bytes, shorter than the {min}-byte minimum")]
    TooShort {
        /// Length found.
        len: usize,
        /// Smallest valid length.
        min: usize,
    },
    /// The first bytes are not a Troupe envelope header.
    #[error("unknown envelope header {found:#06x} (expected {expected:#06x})")]
    BadMagic {
        /// Header found.
        found: u16,
        /// Header written by this version.
        expected: u16,
    },
    /// A format version this build does not know how to read.
    #[error("unknown envelope format version {0}")]
    UnknownFormat(u8),
    /// The stored checksum does not match the bytes.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// Checksum stored with the bytes.
        stored: u32,
        /// Checksum of the bytes as read.
        computed: u32,
    },
    /// A length field points past the end of the envelope.
    #[error(
        "truncated while reading {field}: needs {needed} bytes at offset {offset}, {available} left"
    )]
    Truncated {
        /// Field being read.
        field: &'static str,
        /// Offset of the field.
        offset: usize,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left.
        available: usize,
    },
    /// A text field is not UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// Field being read.
        field: &'static str,
    },
    /// An envelope of the wrong kind (an event where a snapshot was expected or the reverse).
    #[error("expected a {expected} envelope, found kind byte {found}")]
    WrongKind {
        /// Kind expected.
        expected: &'static str,
        /// Kind byte found.
        found: u8,
    },
    /// Bytes left over after the last field.
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
}

/// Everything that can go wrong in the journal.
///
/// Variants carry the persistence id, sequence number or tag a caller needs
/// to act on the error.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An optimistic append found the journal ahead of (or behind) the writer.
    #[error(
        "sequence conflict on `{id}`: the writer expected highest sequence {expected}, the journal has {actual}; reload the entity and retry"
    )]
    SeqConflict {
        /// Persistence id written to.
        id: PersistenceId,
        /// Highest sequence the writer believed in.
        expected: u64,
        /// Highest sequence in the journal.
        actual: u64,
    },
    /// A stored event could not be decoded.
    #[error("corrupt event `{id}` #{seq}: {reason}")]
    Corrupt {
        /// Persistence id of the entry.
        id: PersistenceId,
        /// Sequence number of the entry.
        seq: u64,
        /// What is wrong with its bytes.
        reason: EnvelopeError,
    },
    /// A stored snapshot could not be decoded.
    #[error("corrupt snapshot of `{id}`: {reason}")]
    CorruptSnapshot {
        /// Persistence id of the snapshot.
        id: PersistenceId,
        /// What is wrong with its bytes.
        reason: EnvelopeError,
    },
    /// Sequence numbers of one id are not dense: an event is missing.
    #[error("gap in `{id}`: expected sequence {expected}, found {found}")]
    Gap {
        /// Persistence id replayed.
        id: PersistenceId,
        /// Sequence expected next.
        expected: u64,
        /// Sequence found.
        found: u64,
    },
    /// The envelope is sound but its payload does not decode as the requested type.
    #[error("cannot decode `{id}` #{seq} (event type `{event_type}` v{schema_version}): {message}")]
    Decode {
        /// Persistence id of the entry.
        id: PersistenceId,
        /// Sequence number of the entry (0 for a snapshot).
        seq: u64,
        /// Event type stored in the envelope.
        event_type: String,
        /// Schema version stored in the envelope.
        schema_version: u32,
        /// Decoder message.
        message: String,
    },
    /// The envelope names an event type the reader does not expect.
    #[error("`{id}` #{seq} holds event type `{found}`, but `{expected}` was requested")]
    UnknownEventType {
        /// Persistence id of the entry.
        id: PersistenceId,
        /// Sequence number of the entry.
        seq: u64,
        /// Type name the reader expects.
        expected: &'static str,
        /// Type name stored.
        found: String,
    },
    /// An old schema version with no registered upcaster.
    #[error(
        "`{id}` #{seq}: no upcaster registered for event type `{event_type}` from schema version {from_version} (current is {current_version})"
    )]
    MissingUpcaster {
        /// Persistence id of the entry.
        id: PersistenceId,
        /// Sequence number of the entry.
        seq: u64,
        /// Event type.
        event_type: String,
        /// Version stored.
        from_version: u32,
        /// Version the reader understands.
        current_version: u32,
    },
    /// An event could not be encoded.
    #[error("cannot encode `{type_name}`: {message}")]
    Encode {
        /// Type name of the value.
        type_name: String,
        /// Encoder message.
        message: String,
    },
    /// A persistence id or tag that the journal refuses.
    #[error("invalid {what} `{value}`: {reason}")]
    InvalidName {
        /// `persistence id` or `tag`.
        what: &'static str,
        /// The value as given (lossy for non-UTF-8).
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// An append, snapshot or delete the journal refuses as given.
    #[error("invalid request for `{id}`: {reason}")]
    InvalidRequest {
        /// Persistence id.
        id: PersistenceId,
        /// What is wrong.
        reason: String,
    },
    /// The storage engine failed.
    #[error("storage error while {context}: {message}")]
    Storage {
        /// What the journal was doing.
        context: &'static str,
        /// Engine message.
        message: String,
    },
    /// Journal metadata that cannot be read.
    #[error("corrupt journal metadata at key {key:?}: {reason}")]
    CorruptMetadata {
        /// Key (lossy UTF-8).
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The journal was opened read-only.
    #[error("the journal at {path} is open read-only; {operation} is not allowed")]
    ReadOnly {
        /// Data directory.
        path: String,
        /// Refused operation.
        operation: &'static str,
    },
    /// The journal has been closed (or its writer thread is gone).
    #[error("the journal is closed")]
    Closed,
    /// Replay needs a Tokio runtime to run its blocking reads on.
    #[error("{0} must be called from within a Tokio runtime")]
    NoRuntime(&'static str),
    /// A fault injected by [`crate::faulty::FaultyJournal`] or an archive
    /// crash point ([`crate::TieredJournal::crash_at`]).
    #[error("injected fault: {0}")]
    Injected(String),
    /// An archived segment could not be read back.
    #[error("cold segment `{segment}` holding `{id}` #{from}..#{to} is unreadable: {reason}")]
    ColdSegment {
        /// Persistence id.
        id: PersistenceId,
        /// First sequence the segment holds.
        from: u64,
        /// Last sequence the segment holds.
        to: u64,
        /// Object path of the segment in the cold store.
        segment: String,
        /// What is wrong (missing, checksum, header, envelope).
        reason: String,
    },
    /// A referenced blob is not in the blob store.
    #[error("blob {hash} is missing from the blob store")]
    BlobMissing {
        /// `sha256:<hex>`.
        hash: String,
    },
    /// A blob's stored bytes do not match its reference.
    #[error("blob {hash} is corrupt: {reason}")]
    BlobCorrupt {
        /// `sha256:<hex>`.
        hash: String,
        /// What does not match.
        reason: String,
    },
    /// A blob is larger than the configured limit.
    #[error("{media_type} blob exceeds the {limit}-byte limit")]
    BlobTooLarge {
        /// The limit in bytes.
        limit: u64,
        /// Media type of the refused blob.
        media_type: String,
    },
    /// A blob upload's source failed; nothing was stored.
    #[error("uploading a {media_type} blob failed after {received} bytes: {reason}")]
    BlobUpload {
        /// Media type.
        media_type: String,
        /// Bytes received before the failure.
        received: u64,
        /// The source's error.
        reason: String,
    },
}

impl JournalError {
    pub(crate) fn storage(context: &'static str, err: impl std::fmt::Display) -> Self {
        JournalError::Storage {
            context,
            message: err.to_string(),
        }
    }

    /// True when retrying the same request later may succeed (storage
    /// hiccups and injected faults), false for conflicts and bad input.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            JournalError::Storage { .. } | JournalError::Injected(_)
        )
    }
}

/// Result alias for journal operations.
pub type Result<T, E = JournalError> = std::result::Result<T, E>;

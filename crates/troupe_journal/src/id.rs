//! Persistence ids (`kind/key`) and tags.

use std::fmt;
use std::sync::Arc;

use crate::error::{JournalError, Result};

/// Longest persistence id accepted, in bytes.
pub const MAX_ID_LEN: usize = 512;
/// Longest tag accepted, in bytes.
pub const MAX_TAG_LEN: usize = 128;

/// The identity of one event stream: `kind/key`, for example `session/4f1c`.
///
/// Events of one id have dense sequence numbers from 1. Cloning is cheap (a
/// reference count), so replayed events can all carry their id.
///
/// Rules: at most [`MAX_ID_LEN`] bytes; a non-empty kind, a `/`, a non-empty
/// key; no NUL byte (the storage key uses it as a separator). The key may
/// itself contain `/`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PersistenceId(Arc<str>);

impl PersistenceId {
    /// Parses `kind/key`.
    pub fn parse(s: &str) -> Result<Self> {
        let invalid = |reason| JournalError::InvalidName {
            what: "persistence id",
            value: s.to_owned(),
            reason,
        };
        if s.len() > MAX_ID_LEN {
            return Err(invalid("longer than 512 bytes"));
        }
        if s.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        match s.split_once('/') {
            Some((kind, key)) if !kind.is_empty() && !key.is_empty() => Ok(Self(Arc::from(s))),
            _ => Err(invalid("must be `kind/key` with a non-empty kind and key")),
        }
    }

    /// Builds `kind/key` from its parts.
    pub fn new(kind: &str, key: &str) -> Result<Self> {
        Self::parse(&format!("{kind}/{key}"))
    }

    /// The whole id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `/`.
    pub fn kind(&self) -> &str {
        self.0.split_once('/').map(|(k, _)| k).unwrap_or(&self.0)
    }

    /// The part after the first `/`.
    pub fn key(&self) -> &str {
        self.0.split_once('/').map(|(_, k)| k).unwrap_or("")
    }
}

impl fmt::Display for PersistenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PersistenceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl std::str::FromStr for PersistenceId {
    type Err = JournalError;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl TryFrom<String> for PersistenceId {
    type Error = JournalError;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<PersistenceId> for String {
    fn from(id: PersistenceId) -> String {
        id.0.to_string()
    }
}

/// A label on events, for projections that follow every event with the tag
/// across all persistence ids (see [`crate::Journal::subscribe_tag`]).
///
/// Rules: 1 to [`MAX_TAG_LEN`] bytes, no NUL byte.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(Arc<str>);

impl Tag {
    /// Validates a tag.
    pub fn parse(s: &str) -> Result<Self> {
        let invalid = |reason| JournalError::InvalidName {
            what: "tag",
            value: s.to_owned(),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("is empty"));
        }
        if s.len() > MAX_TAG_LEN {
            return Err(invalid("longer than 128 bytes"));
        }
        if s.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        Ok(Self(Arc::from(s)))
    }

    /// A tag read back from a checksummed envelope (validated when written).
    pub(crate) fn from_stored(s: &str) -> Self {
        Self(Arc::from(s))
    }

    /// The tag's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

impl TryFrom<String> for Tag {
    type Error = JournalError;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<Tag> for String {
    fn from(t: Tag) -> String {
        t.0.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_need_kind_and_key_and_no_nul() {
        assert!(PersistenceId::parse("session/4f1c").is_ok());
        assert!(PersistenceId::parse("a/b/c").is_ok());
        for bad in ["", "nokey", "/key", "kind/", "a/\0b"] {
            assert!(PersistenceId::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(PersistenceId::parse(&format!("k/{}", "x".repeat(600))).is_err());
        let id = PersistenceId::parse("saga/a/b").unwrap();
        assert_eq!((id.kind(), id.key()), ("saga", "a/b"));
    }

    #[test]
    fn tags_are_bounded() {
        assert!(Tag::parse("billing").is_ok());
        assert!(Tag::parse("").is_err());
        assert!(Tag::parse("a\0").is_err());
        assert!(Tag::parse(&"t".repeat(129)).is_err());
    }
}

//! Reading old schema versions: upcasters registered per event type.
//!
//! When an event's shape changes, bump [`Schema::SCHEMA_VERSION`] and
//! register an upcaster from the previous version. Reading applies the chain
//! `v1 -> v2 -> ... -> current` to the stored bytes before decoding, so the
//! journal never has to be rewritten.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use troupe_journal::{Schema, Upcasters};
//!
//! #[derive(Serialize, Deserialize)]
//! struct TurnV1 { text: String }
//! #[derive(Serialize, Deserialize)]
//! struct Turn { text: String, tokens: u32 }
//! impl Schema for Turn {
//!     const TYPE_NAME: &'static str = "session.Turn";
//!     const SCHEMA_VERSION: u32 = 2;
//! }
//!
//! let mut upcasters = Upcasters::default();
//! upcasters.register("session.Turn", 1, |old: TurnV1| Turn {
//!     tokens: old.text.split_whitespace().count() as u32,
//!     text: old.text,
//! });
//! ```

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{JournalError, Result};
use crate::event::{PersistedEvent, Schema, Snapshot};
use crate::id::PersistenceId;

type UpcastFn = Arc<dyn Fn(&[u8]) -> std::result::Result<Vec<u8>, String> + Send + Sync>;

/// Most upcasting steps applied to one payload (a bound against a
/// misconfigured chain).
pub const MAX_UPCAST_STEPS: u32 = 64;

/// Upcasters keyed by (type name, version they read).
#[derive(Clone, Default)]
pub struct Upcasters {
    steps: HashMap<(String, u32), UpcastFn>,
}

impl std::fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<_> = self.steps.keys().collect();
        keys.sort();
        f.debug_struct("Upcasters").field("steps", &keys).finish()
    }
}

impl Upcasters {
    /// A shared empty registry.
    pub fn none() -> &'static Upcasters {
        static NONE: OnceLock<Upcasters> = OnceLock::new();
        NONE.get_or_init(Upcasters::default)
    }

    /// Registers a typed step from `from_version` to `from_version + 1`.
    pub fn register<Old, New>(
        &mut self,
        type_name: &str,
        from_version: u32,
        step: impl Fn(Old) -> New + Send + Sync + 'static,
    ) -> &mut Self
    where
        Old: DeserializeOwned,
        New: Serialize,
    {
        self.register_raw(type_name, from_version, move |bytes| {
            let old: Old = rmp_serde::from_slice(bytes).map_err(|e| e.to_string())?;
            rmp_serde::to_vec_named(&step(old)).map_err(|e| e.to_string())
        })
    }

    /// Registers a step on raw payload bytes.
    pub fn register_raw(
        &mut self,
        type_name: &str,
        from_version: u32,
        step: impl Fn(&[u8]) -> std::result::Result<Vec<u8>, String> + Send + Sync + 'static,
    ) -> &mut Self {
        self.steps
            .insert((type_name.to_owned(), from_version), Arc::new(step));
        self
    }

    fn upcast<'a, T: Schema>(
        &self,
        id: &PersistenceId,
        seq: u64,
        stored_type: &str,
        stored_version: u32,
        payload: &'a [u8],
    ) -> Result<std::borrow::Cow<'a, [u8]>> {
        if stored_type != T::TYPE_NAME {
            return Err(JournalError::UnknownEventType {
                id: id.clone(),
                seq,
                expected: T::TYPE_NAME,
                found: stored_type.to_owned(),
            });
        }
        let decode_err = |version, message: String| JournalError::Decode {
            id: id.clone(),
            seq,
            event_type: stored_type.to_owned(),
            schema_version: version,
            message,
        };
        if stored_version > T::SCHEMA_VERSION {
            return Err(decode_err(
                stored_version,
                format!(
                    "written by schema version {stored_version}, newer than this build's {}",
                    T::SCHEMA_VERSION
                ),
            ));
        }
        let mut bytes = std::borrow::Cow::Borrowed(payload);
        let mut version = stored_version;
        while version < T::SCHEMA_VERSION {
            if T::SCHEMA_VERSION - stored_version > MAX_UPCAST_STEPS {
                return Err(decode_err(version, "upcast chain too long".into()));
            }
            let step = self
                .steps
                .get(&(stored_type.to_owned(), version))
                .ok_or_else(|| JournalError::MissingUpcaster {
                    id: id.clone(),
                    seq,
                    event_type: stored_type.to_owned(),
                    from_version: version,
                    current_version: T::SCHEMA_VERSION,
                })?;
            bytes = std::borrow::Cow::Owned(step(&bytes).map_err(|m| decode_err(version, m))?);
            version += 1;
        }
        Ok(bytes)
    }

    /// Decodes an event as `E`, upcasting older versions.
    pub fn decode<E: Schema>(&self, event: &PersistedEvent) -> Result<E> {
        let bytes = self.upcast::<E>(
            &event.id,
            event.seq,
            &event.event_type,
            event.schema_version,
            &event.payload,
        )?;
        rmp_serde::from_slice(&bytes).map_err(|e| JournalError::Decode {
            id: event.id.clone(),
            seq: event.seq,
            event_type: event.event_type.to_string(),
            schema_version: event.schema_version,
            message: e.to_string(),
        })
    }

    /// Decodes snapshot state as `S`, upcasting older versions.
    pub fn decode_snapshot<S: Schema>(&self, snapshot: &Snapshot) -> Result<S> {
        let bytes = self.upcast::<S>(
            &snapshot.id,
            snapshot.seq,
            &snapshot.state_type,
            snapshot.schema_version,
            &snapshot.payload,
        )?;
        rmp_serde::from_slice(&bytes).map_err(|e| JournalError::Decode {
            id: snapshot.id.clone(),
            seq: snapshot.seq,
            event_type: snapshot.state_type.to_string(),
            schema_version: snapshot.schema_version,
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct V1 {
        name: String,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct V2 {
        first: String,
        last: String,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct V3 {
        first: String,
        last: String,
        vip: bool,
    }
    impl Schema for V3 {
        const TYPE_NAME: &'static str = "user.Renamed";
        const SCHEMA_VERSION: u32 = 3;
    }

    fn stored(version: u32, payload: Vec<u8>) -> PersistedEvent {
        NewEvent::raw("user.Renamed", version, payload)
            .unwrap()
            .into_persisted(PersistenceId::parse("user/1").unwrap(), 7)
    }

    #[test]
    fn chains_apply_in_order() {
        let mut up = Upcasters::default();
        up.register("user.Renamed", 1, |v: V1| {
            let (f, l) = v.name.split_once(' ').unwrap_or((&v.name, ""));
            V2 {
                first: f.into(),
                last: l.into(),
            }
        });
        up.register("user.Renamed", 2, |v: V2| V3 {
            first: v.first,
            last: v.last,
            vip: false,
        });
        let ev = stored(
            1,
            rmp_serde::to_vec_named(&V1 {
                name: "Ada Lovelace".into(),
            })
            .unwrap(),
        );
        let v3: V3 = up.decode(&ev).unwrap();
        assert_eq!(
            v3,
            V3 {
                first: "Ada".into(),
                last: "Lovelace".into(),
                vip: false
            }
        );
    }

    #[test]
    fn missing_step_names_type_version_and_position() {
        let ev = stored(
            1,
            rmp_serde::to_vec_named(&V1 { name: "x".into() }).unwrap(),
        );
        let err = ev.decode::<V3>().unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                JournalError::MissingUpcaster {
                    from_version: 1,
                    seq: 7,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("user/1") && msg.contains("#7"), "{msg}");
    }

    #[test]
    fn garbage_payload_is_a_decode_error_naming_the_event() {
        let ev = stored(3, vec![0xc1, 0xff, 0x00]);
        let err = ev.decode::<V3>().unwrap_err();
        assert!(matches!(err, JournalError::Decode { seq: 7, .. }), "{err}");
    }
}

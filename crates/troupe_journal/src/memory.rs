//! The in-memory backend: the same semantics as RocksDB, no durability.
//!
//! Use it for tests and examples, or where losing every event on exit is
//! acceptable ([`Durability::InMemory`](crate::Durability)). Events are kept as
//! encoded envelopes, so decoding, checksums and corruption behave exactly as
//! on disk. Clones share the same store, and [`InMemoryJournal::reopen`]
//! gives a fresh handle on it (what a restart looks like in tests).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

use crate::error::{JournalError, Result};
use crate::event::{
    AppendOutcome, MAX_EVENTS_PER_APPEND, NewEvent, NewSnapshot, PersistedEvent, Snapshot,
    TaggedEvent, TypeNameCache,
};
use crate::id::{PersistenceId, Tag};
use crate::journal::{DEFAULT_REPLAY_BATCH, Journal, Replay, TagSubscription};
use crate::subscription::{self, LIVE_FEED_CAPACITY};

#[derive(Default)]
struct Stream {
    highest: u64,
    events: BTreeMap<u64, Vec<u8>>,
}

#[derive(Default)]
struct Store {
    streams: BTreeMap<PersistenceId, Stream>,
    snapshots: HashMap<PersistenceId, Vec<u8>>,
    tags: BTreeMap<(Tag, u64), (PersistenceId, u64)>,
    next_offset: u64,
}

struct Shared {
    store: Mutex<Store>,
    live: broadcast::Sender<TaggedEvent>,
}

/// A journal held in process memory. See the [module docs](self).
#[derive(Clone)]
pub struct InMemoryJournal {
    shared: Arc<Shared>,
    batch_size: usize,
}

impl Default for InMemoryJournal {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryJournal {
    /// An empty journal.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                store: Mutex::new(Store {
                    next_offset: 1,
                    ..Store::default()
                }),
                live: broadcast::channel(LIVE_FEED_CAPACITY).0,
            }),
            batch_size: DEFAULT_REPLAY_BATCH,
        }
    }

    /// Sets the replay batch size (at least 1).
    pub fn with_replay_batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// A new handle on the same events, as after a restart.
    pub fn reopen(&self) -> Self {
        self.clone()
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock cannot leave the store half-written
        // (every mutation is prepared first and applied without fallible
        // steps), so a poisoned lock is safe to keep using.
        self.shared
            .store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Overwrites the stored bytes of one event (tests of corruption
    /// handling). Returns false if there is no such event.
    pub fn overwrite_raw(&self, id: &PersistenceId, seq: u64, bytes: Vec<u8>) -> bool {
        let mut store = self.store();
        match store
            .streams
            .get_mut(id)
            .and_then(|s| s.events.get_mut(&seq))
        {
            Some(slot) => {
                *slot = bytes;
                true
            }
            None => false,
        }
    }
}

#[async_trait::async_trait]
impl Journal for InMemoryJournal {
    async fn append(
        &self,
        id: &PersistenceId,
        expected_seq: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome> {
        check_append(id, &events)?;
        let mut encoded = Vec::with_capacity(events.len());
        for ev in &events {
            let mut buf = Vec::new();
            ev.encode_envelope(&mut buf);
            encoded.push(buf);
        }
        let mut tagged = Vec::new();
        let outcome = {
            let mut store = self.store();
            let actual = store.streams.get(id).map_or(0, |s| s.highest);
            if actual != expected_seq {
                return Err(JournalError::SeqConflict {
                    id: id.clone(),
                    expected: expected_seq,
                    actual,
                });
            }
            let first_seq = actual + 1;
            let last_seq = actual + events.len() as u64;
            let mut offset = store.next_offset;
            for (i, ev) in events.into_iter().enumerate() {
                let seq = first_seq + i as u64;
                for tag in &ev.tags {
                    store.tags.insert((tag.clone(), offset), (id.clone(), seq));
                }
                if !ev.tags.is_empty() {
                    tagged.push((offset, ev.into_persisted(id.clone(), seq)));
                    offset += 1;
                }
            }
            store.next_offset = offset;
            let stream = store.streams.entry(id.clone()).or_default();
            for (i, bytes) in encoded.into_iter().enumerate() {
                stream.events.insert(first_seq + i as u64, bytes);
            }
            stream.highest = last_seq;
            // Publishing under the lock keeps the live feed in offset order.
            for (offset, event) in tagged {
                let _ = self.shared.live.send(TaggedEvent { offset, event });
            }
            AppendOutcome {
                first_seq,
                last_seq,
            }
        };
        Ok(outcome)
    }

    fn replay(&self, id: &PersistenceId, from_seq: u64, to_seq: u64) -> Replay {
        struct Cursor {
            journal: InMemoryJournal,
            id: PersistenceId,
            next: u64,
            to: u64,
            prev: Option<u64>,
            types: TypeNameCache,
            pending: Option<JournalError>,
            done: bool,
        }
        let cursor = Cursor {
            journal: self.clone(),
            id: id.clone(),
            next: from_seq.max(1),
            to: to_seq,
            prev: None,
            types: TypeNameCache::default(),
            pending: None,
            done: false,
        };
        Replay::from_stream(futures::stream::unfold(cursor, |mut c| async move {
            if let Some(err) = c.pending.take() {
                c.done = true;
                return Some((Err(err), c));
            }
            if c.done || c.next > c.to {
                return None;
            }
            let raw: Vec<(u64, Vec<u8>)> = {
                let store = c.journal.store();
                let stream = store.streams.get(&c.id)?;
                stream
                    .events
                    .range(c.next..=c.to)
                    .take(c.journal.batch_size)
                    .map(|(s, b)| (*s, b.clone()))
                    .collect()
            };
            if raw.is_empty() {
                return None;
            }
            let mut batch = Vec::with_capacity(raw.len());
            for (seq, bytes) in raw {
                if let Some(p) = c.prev
                    && seq != p + 1
                {
                    c.pending = Some(JournalError::Gap {
                        id: c.id.clone(),
                        expected: p + 1,
                        found: seq,
                    });
                    break;
                }
                match PersistedEvent::from_envelope(&c.id, seq, &bytes, &mut c.types) {
                    Ok(ev) => batch.push(ev),
                    Err(e) => {
                        c.pending = Some(e);
                        break;
                    }
                }
                c.prev = Some(seq);
                c.next = seq + 1;
            }
            if batch.is_empty() {
                let err = c.pending.take()?;
                c.done = true;
                return Some((Err(err), c));
            }
            Some((Ok(batch), c))
        }))
    }

    async fn highest_seq(&self, id: &PersistenceId) -> Result<u64> {
        Ok(self.store().streams.get(id).map_or(0, |s| s.highest))
    }

    async fn save_snapshot(&self, id: &PersistenceId, snapshot: NewSnapshot) -> Result<()> {
        let mut buf = Vec::new();
        snapshot.encode_envelope(&mut buf);
        let mut store = self.store();
        let highest = store.streams.get(id).map_or(0, |s| s.highest);
        check_snapshot(id, snapshot.seq, highest)?;
        let newer_exists = store
            .snapshots
            .get(id)
            .and_then(|b| Snapshot::from_envelope(id, b).ok())
            .is_some_and(|s| s.seq > snapshot.seq);
        if !newer_exists {
            store.snapshots.insert(id.clone(), buf);
        }
        Ok(())
    }

    async fn load_snapshot(&self, id: &PersistenceId) -> Result<Option<Snapshot>> {
        let bytes = self.store().snapshots.get(id).cloned();
        bytes.map(|b| Snapshot::from_envelope(id, &b)).transpose()
    }

    async fn delete_events_to(&self, id: &PersistenceId, to_seq: u64) -> Result<()> {
        let mut store = self.store();
        let highest = store.streams.get(id).map_or(0, |s| s.highest);
        check_delete(id, to_seq, highest)?;
        if let Some(stream) = store.streams.get_mut(id) {
            stream.events = stream.events.split_off(&(to_seq + 1));
        }
        Ok(())
    }

    async fn persistence_ids(
        &self,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>> {
        let store = self.store();
        let ids = store
            .streams
            .keys()
            .filter(|k| after.is_none_or(|a| *k > a));
        Ok(ids.take(limit).cloned().collect())
    }

    async fn events_by_tag(
        &self,
        tag: &Tag,
        from_offset: u64,
        limit: usize,
    ) -> Result<Vec<TaggedEvent>> {
        let refs: Vec<(u64, PersistenceId, u64, Option<Vec<u8>>)> = {
            let store = self.store();
            store
                .tags
                .range((tag.clone(), from_offset)..)
                .take_while(|((t, _), _)| t == tag)
                .take(limit)
                .map(|((_, off), (id, seq))| {
                    let bytes = store
                        .streams
                        .get(id)
                        .and_then(|s| s.events.get(seq))
                        .cloned();
                    (*off, id.clone(), *seq, bytes)
                })
                .collect()
        };
        let mut types = TypeNameCache::default();
        let mut out = Vec::with_capacity(refs.len());
        for (offset, id, seq, bytes) in refs {
            if let Some(bytes) = bytes {
                let event = PersistedEvent::from_envelope(&id, seq, &bytes, &mut types)?;
                out.push(TaggedEvent { offset, event });
            }
        }
        Ok(out)
    }

    fn subscribe_tag(&self, tag: &Tag, from_offset: u64) -> TagSubscription {
        let live = self.shared.live.subscribe();
        subscription::spawn(self.clone(), live, tag.clone(), from_offset)
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Checks an append's batch (not empty, within the limits): for backends.
pub fn check_append(id: &PersistenceId, events: &[NewEvent]) -> Result<()> {
    if events.is_empty() {
        return Err(JournalError::InvalidRequest {
            id: id.clone(),
            reason: "an append needs at least one event".into(),
        });
    }
    if events.len() > MAX_EVENTS_PER_APPEND {
        return Err(JournalError::InvalidRequest {
            id: id.clone(),
            reason: format!(
                "{} events in one append exceed the bound of {MAX_EVENTS_PER_APPEND}",
                events.len()
            ),
        });
    }
    Ok(())
}

/// Checks a snapshot's sequence against the highest event: for backends.
pub fn check_snapshot(id: &PersistenceId, seq: u64, highest: u64) -> Result<()> {
    if seq == 0 || seq > highest {
        return Err(JournalError::InvalidRequest {
            id: id.clone(),
            reason: format!("snapshot at sequence {seq} but the highest event is {highest}"),
        });
    }
    Ok(())
}

/// Checks a delete's bound against the highest event: for backends.
pub fn check_delete(id: &PersistenceId, to_seq: u64, highest: u64) -> Result<()> {
    if to_seq > highest {
        return Err(JournalError::InvalidRequest {
            id: id.clone(),
            reason: format!("cannot delete up to {to_seq}: the highest event is {highest}"),
        });
    }
    Ok(())
}

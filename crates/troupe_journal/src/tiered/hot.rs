//! The hot tier: each active entity's most recent events, in memory.

use std::collections::{BTreeMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;
use serde::{Deserialize, Serialize};

use crate::event::PersistedEvent;
use crate::id::PersistenceId;

/// How much of one entity's tail the hot tier keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotLimits {
    /// Most recent events kept per entity (0 turns the hot tier off for
    /// the kind).
    pub max_events: usize,
    /// Most bytes of those events kept per entity.
    pub max_bytes: usize,
}

impl Default for HotLimits {
    /// 256 events or 256 KiB per entity.
    fn default() -> Self {
        Self {
            max_events: 256,
            max_bytes: 256 << 10,
        }
    }
}

/// Settings of the hot tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HotConfig {
    /// Limits for kinds not listed in `kinds`.
    pub default: HotLimits,
    /// Limits per kind (the part of the persistence id before `/`).
    pub kinds: BTreeMap<String, HotLimits>,
    /// Bytes held across all entities; the least recently used entity's
    /// events go first.
    pub max_total_bytes: usize,
    /// Entities held at once.
    pub max_entities: usize,
}

impl Default for HotConfig {
    /// 256 events / 256 KiB per entity, 64 MiB and 10,000 entities in all.
    fn default() -> Self {
        Self {
            default: HotLimits::default(),
            kinds: BTreeMap::new(),
            max_total_bytes: 64 << 20,
            max_entities: 10_000,
        }
    }
}

impl HotConfig {
    /// The limits that apply to `kind`.
    pub fn limits(&self, kind: &str) -> HotLimits {
        self.kinds.get(kind).copied().unwrap_or(self.default)
    }

    /// A hot tier that keeps nothing.
    pub fn disabled() -> Self {
        Self {
            default: HotLimits {
                max_events: 0,
                max_bytes: 0,
            },
            kinds: BTreeMap::new(),
            max_total_bytes: 0,
            max_entities: 1,
        }
    }
}

/// Bytes an event is charged in the hot tier.
fn cost(ev: &PersistedEvent) -> usize {
    ev.payload.len()
        + ev.event_type.len()
        + ev.tags.iter().map(|t| t.as_str().len()).sum::<usize>()
        + 96
}

struct Ring {
    events: VecDeque<PersistedEvent>,
    bytes: usize,
    /// The highest sequence of the id this ring is current with.
    hi: u64,
}

impl Ring {
    fn lo(&self) -> u64 {
        self.events.front().map_or(self.hi + 1, |e| e.seq)
    }
}

struct Inner {
    rings: LruCache<PersistenceId, Ring>,
    bytes: usize,
}

/// Hit and miss counts of one kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HotKindStats {
    /// Entities held.
    pub entities: u64,
    /// Events held.
    pub events: u64,
    /// Bytes charged.
    pub bytes: u64,
    /// Reads served from memory since the journal opened.
    pub hits: u64,
    /// Reads that went to the warm or cold tier.
    pub misses: u64,
}

/// The hot tier. The RocksDB writer feeds it every committed append and
/// delete, in commit order and before the callers hear back (it is the
/// writer's commit hook), so a ring's tail is the id's highest sequence;
/// a read is a hit when the ring holds every requested event.
pub(crate) struct HotCache {
    config: HotConfig,
    inner: Mutex<Inner>,
    counts: Mutex<BTreeMap<String, (u64, u64)>>,
}

impl HotCache {
    pub(crate) fn new(config: HotConfig) -> Self {
        let cap = NonZeroUsize::new(config.max_entities.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            config,
            inner: Mutex::new(Inner {
                rings: LruCache::new(cap),
                bytes: 0,
            }),
            counts: Mutex::new(BTreeMap::new()),
        }
    }

    pub(crate) fn enabled_for(&self, id: &PersistenceId) -> bool {
        let l = self.config.limits(id.kind());
        l.max_events > 0 && l.max_bytes > 0 && self.config.max_total_bytes > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records events `expected + 1 ..` just appended to `id`.
    pub(crate) fn appended(&self, id: &PersistenceId, expected: u64, events: Vec<PersistedEvent>) {
        let Some(last) = events.last().map(|e| e.seq) else {
            return;
        };
        let limits = self.config.limits(id.kind());
        let mut inner = self.lock();
        let inner = &mut *inner;
        let ring = match inner.rings.get_mut(id) {
            Some(r) if r.hi == expected => r,
            Some(r) if r.hi >= last => return, // a late update of older events
            _ => {
                // Unknown tail, or events missing in between: restart here.
                if let Some(old) = inner.rings.pop(id) {
                    inner.bytes -= old.bytes;
                }
                let fresh = Ring {
                    events: VecDeque::new(),
                    bytes: 0,
                    hi: expected,
                };
                if let Some((_, evicted)) = inner.rings.push(id.clone(), fresh) {
                    inner.bytes -= evicted.bytes;
                }
                inner.rings.get_mut(id).expect("just inserted")
            }
        };
        for ev in events {
            let c = cost(&ev);
            ring.bytes += c;
            inner.bytes += c;
            ring.events.push_back(ev);
        }
        ring.hi = last;
        while ring.events.len() > limits.max_events || ring.bytes > limits.max_bytes {
            let Some(old) = ring.events.pop_front() else {
                break;
            };
            let c = cost(&old);
            ring.bytes -= c;
            inner.bytes -= c;
        }
        while inner.bytes > self.config.max_total_bytes {
            let Some((_, old)) = inner.rings.pop_lru() else {
                break;
            };
            inner.bytes -= old.bytes;
        }
        metrics::gauge!("troupe_journal_hot_bytes").set(inner.bytes as f64);
    }

    /// Drops events up to `to_seq` (deleted by the application).
    pub(crate) fn trim(&self, id: &PersistenceId, to_seq: u64) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(ring) = inner.rings.peek_mut(id) {
            while ring.events.front().is_some_and(|e| e.seq <= to_seq) {
                let old = ring.events.pop_front().expect("front exists");
                let c = cost(&old);
                ring.bytes -= c;
                inner.bytes -= c;
            }
        }
    }

    /// The highest sequence of `id`, if its ring is held.
    pub(crate) fn highest(&self, id: &PersistenceId) -> Option<u64> {
        self.lock().rings.peek(id).map(|r| r.hi)
    }

    /// The events of `id` in `from..=to` if the ring holds all of them.
    pub(crate) fn read(
        &self,
        id: &PersistenceId,
        from: u64,
        to: u64,
    ) -> Option<Vec<PersistedEvent>> {
        if !self.enabled_for(id) {
            return None;
        }
        let hit = {
            let mut inner = self.lock();
            match inner.rings.get(id) {
                Some(ring) if from >= ring.lo() => Some(
                    ring.events
                        .iter()
                        .skip((from - ring.lo()) as usize)
                        .take_while(|e| e.seq <= to)
                        .cloned()
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            }
        };
        let kind = id.kind();
        if hit.is_some() {
            metrics::counter!("troupe_journal_hot_hits_total", "kind" => kind.to_owned())
                .increment(1);
        } else {
            metrics::counter!("troupe_journal_hot_misses_total", "kind" => kind.to_owned())
                .increment(1);
        }
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match counts.get_mut(kind) {
            Some(c) => {
                if hit.is_some() {
                    c.0 += 1
                } else {
                    c.1 += 1
                }
            }
            None => {
                counts.insert(kind.to_owned(), if hit.is_some() { (1, 0) } else { (0, 1) });
            }
        }
        hit
    }

    /// Per-kind figures.
    pub(crate) fn stats(&self) -> BTreeMap<String, HotKindStats> {
        let mut out: BTreeMap<String, HotKindStats> = BTreeMap::new();
        {
            let inner = self.lock();
            for (id, ring) in inner.rings.iter() {
                let s = out.entry(id.kind().to_owned()).or_default();
                s.entities += 1;
                s.events += ring.events.len() as u64;
                s.bytes += ring.bytes as u64;
            }
        }
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        for (kind, (h, m)) in counts.iter() {
            let s = out.entry(kind.clone()).or_default();
            s.hits = *h;
            s.misses = *m;
        }
        out
    }

    /// Total bytes charged.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

impl crate::rocks::CommitHook for HotCache {
    fn wants(&self, id: &PersistenceId) -> bool {
        self.enabled_for(id)
    }
    fn appended(&self, id: &PersistenceId, expected: u64, events: Vec<PersistedEvent>) {
        HotCache::appended(self, id, expected, events);
    }
    fn deleted(&self, id: &PersistenceId, to_seq: u64) {
        self.trim(id, to_seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;

    fn evs(id: &PersistenceId, from: u64, n: u64) -> Vec<PersistedEvent> {
        (from..from + n)
            .map(|s| {
                NewEvent::raw("t.E", 1, vec![0; 10])
                    .unwrap()
                    .into_persisted(id.clone(), s)
            })
            .collect()
    }

    #[test]
    fn a_ring_keeps_the_tail_within_its_limits_and_only_serves_what_it_holds() {
        let mut c = HotConfig::default();
        c.default.max_events = 4;
        let hot = HotCache::new(c);
        let id = PersistenceId::parse("chat/1").unwrap();
        assert!(hot.read(&id, 1, u64::MAX).is_none());
        hot.appended(&id, 0, evs(&id, 1, 3));
        hot.appended(&id, 3, evs(&id, 4, 3));
        let got: Vec<u64> = hot
            .read(&id, 3, u64::MAX)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(got, vec![3, 4, 5, 6]);
        assert!(hot.read(&id, 2, u64::MAX).is_none(), "2 was evicted");
        assert_eq!(
            hot.read(&id, 7, u64::MAX).unwrap(),
            vec![],
            "nothing after the tail"
        );
        // A late update of older events changes nothing.
        hot.appended(&id, 1, evs(&id, 2, 2));
        assert_eq!(hot.read(&id, 6, 6).unwrap().len(), 1);
        // A gap restarts the ring.
        hot.appended(&id, 8, evs(&id, 9, 1));
        assert!(hot.read(&id, 6, u64::MAX).is_none());
        assert_eq!(hot.read(&id, 9, u64::MAX).unwrap().len(), 1);
        hot.trim(&id, 9);
        assert_eq!(hot.read(&id, 10, u64::MAX).unwrap(), vec![]);
        let s = hot.stats()["chat"];
        assert_eq!((s.hits, s.misses), (5, 3));
    }

    #[test]
    fn the_total_bound_evicts_least_recently_used_entities() {
        let hot = HotCache::new(HotConfig {
            max_total_bytes: 3 * (10 + 3 + 96),
            ..HotConfig::default()
        });
        let a = PersistenceId::parse("chat/a").unwrap();
        let b = PersistenceId::parse("chat/b").unwrap();
        hot.appended(&a, 0, evs(&a, 1, 2));
        hot.appended(&b, 0, evs(&b, 1, 2));
        assert!(hot.read(&a, 1, 2).is_none());
        assert_eq!(hot.read(&b, 1, 2).unwrap().len(), 2);
        assert!(hot.bytes() <= 3 * (10 + 3 + 96));
    }
}

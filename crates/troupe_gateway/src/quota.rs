//! Per-tenant shares that need more than a counter: the bytes of blobs a
//! tenant holds (`quota.max_blob_bytes`) and the workflows it has running
//! (`quota.max_workflows`).
//!
//! Blob storage is shared and deduplicated, and access is per tenant (an
//! owner record `owner/blob.{tenant}.{hash}` says a tenant uploaded a
//! blob). A tenant's usage is the size of every blob it owns whose bytes
//! are still stored: read from the owner records the first time the tenant
//! uploads after a start, then kept in memory; uploads in flight reserve
//! their bytes as they arrive, so concurrent uploads cannot overshoot
//! together. Blobs the collector removed are noticed when a tenant reaches
//! its quota (each owned blob is looked up again, only if the store has
//! deleted any blob since the last look), so they count no more.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use troupe_journal::{BlobHash, BlobStore, Journal, PersistenceId};

use crate::GatewayError;

/// Owner records read per page while a tenant's usage is loaded.
const LOAD_PAGE: usize = 1_000;

/// The blob bytes of every tenant that uploaded since the start.
#[derive(Default)]
pub(crate) struct BlobUsage {
    tenants: Mutex<HashMap<String, Arc<TenantBlobs>>>,
}

/// One tenant's blobs and the bytes charged to it.
pub(crate) struct TenantBlobs {
    loaded: tokio::sync::OnceCell<()>,
    /// Bytes of the owned blobs plus the reservations of uploads in flight.
    used: AtomicU64,
    owned: Mutex<HashMap<BlobHash, u64>>,
    /// [`BlobStore::deletions`] when the owned blobs were last looked up.
    looked_at: AtomicU64,
}

impl BlobUsage {
    /// `tenant`'s ledger, read from its owner records on first use.
    pub async fn tenant(
        &self,
        tenant: &str,
        journal: &dyn Journal,
        blobs: &BlobStore,
    ) -> Result<Arc<TenantBlobs>, GatewayError> {
        let t = self
            .tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.to_owned())
            .or_insert_with(|| {
                Arc::new(TenantBlobs {
                    loaded: tokio::sync::OnceCell::new(),
                    used: AtomicU64::new(0),
                    owned: Mutex::default(),
                    looked_at: AtomicU64::new(0),
                })
            })
            .clone();
        t.loaded
            .get_or_try_init(|| t.load(tenant, journal, blobs))
            .await?;
        Ok(t)
    }
}

impl TenantBlobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BlobHash, u64>> {
        self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn load(
        &self,
        tenant: &str,
        journal: &dyn Journal,
        blobs: &BlobStore,
    ) -> Result<(), GatewayError> {
        self.looked_at.store(blobs.deletions(), Ordering::Relaxed);
        let prefix = format!("blob.{tenant}.");
        let mut after = PersistenceId::new("owner", &prefix)?;
        loop {
            let page = journal.persistence_ids(Some(&after), LOAD_PAGE).await?;
            let Some(last) = page.last().cloned() else {
                return Ok(());
            };
            for pid in &page {
                let Some(hash) = (pid.kind() == "owner")
                    .then(|| pid.key().strip_prefix(&prefix))
                    .flatten()
                else {
                    return Ok(());
                };
                let Ok(hash) = hash.parse::<BlobHash>() else {
                    continue;
                };
                if let Some(size) = blobs.size_of(&hash).await? {
                    self.lock().insert(hash, size);
                    self.used.fetch_add(size, Ordering::Relaxed);
                }
            }
            after = last;
        }
    }

    /// Bytes charged now (owned blobs and uploads in flight).
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether the tenant owns blob `hash` per this ledger.
    #[cfg(test)]
    pub fn owns(&self, hash: &BlobHash) -> bool {
        self.lock().contains_key(hash)
    }

    /// Drops the blobs whose bytes the collector has removed; returns the
    /// bytes given back. Looks nothing up when the store has deleted no
    /// blob since the last look (a tenant at its quota retrying costs no
    /// I/O).
    pub async fn reconcile(&self, blobs: &BlobStore) -> Result<u64, GatewayError> {
        let deletions = blobs.deletions();
        if self.looked_at.swap(deletions, Ordering::Relaxed) == deletions {
            return Ok(0);
        }
        let owned: Vec<BlobHash> = self.lock().keys().copied().collect();
        let mut freed = 0;
        for hash in owned {
            if blobs.size_of(&hash).await?.is_none()
                && let Some(size) = self.lock().remove(&hash)
            {
                self.used.fetch_sub(size, Ordering::Relaxed);
                freed += size;
            }
        }
        Ok(freed)
    }

    /// `n` more bytes unless that passes `max`.
    fn reserve(&self, n: u64, max: u64) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(n).filter(|&t| t <= max)
            })
            .is_ok()
    }
}

/// The bytes one upload has reserved: given back when dropped, unless
/// [`Charge::keep`] made them the blob's.
pub(crate) struct Charge {
    tenant: Arc<TenantBlobs>,
    max: u64,
    reserved: AtomicU64,
    kept: AtomicBool,
    /// Set once a part was refused: the upload went past the quota.
    exceeded: AtomicBool,
}

impl Charge {
    /// A charge of nothing yet against `tenant`, which may hold `max`.
    pub fn new(tenant: Arc<TenantBlobs>, max: u64) -> Self {
        Self {
            tenant,
            max,
            reserved: AtomicU64::new(0),
            kept: AtomicBool::new(false),
            exceeded: AtomicBool::new(false),
        }
    }

    /// Reserves `n` more bytes; false (and remembered) past the quota.
    pub fn add(&self, n: u64) -> bool {
        if self.tenant.reserve(n, self.max) {
            self.reserved.fetch_add(n, Ordering::Relaxed);
            true
        } else {
            self.exceeded.store(true, Ordering::Relaxed);
            false
        }
    }

    /// Whether a part was refused.
    pub fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }

    /// The upload stored blob `hash` of `size` bytes for the tenant: the
    /// reservation becomes the blob's, unless the tenant owned the blob
    /// already (then it is given back: the bytes are counted once).
    pub fn keep(&self, hash: BlobHash, size: u64) {
        let mut owned = self.tenant.lock();
        if owned.contains_key(&hash) {
            return;
        }
        owned.insert(hash, size);
        let reserved = self.reserved.swap(0, Ordering::Relaxed);
        // The stream's parts add up to the blob's size; should they not,
        // the ledger follows the size stored.
        if size >= reserved {
            self.tenant
                .used
                .fetch_add(size - reserved, Ordering::Relaxed);
        } else {
            self.tenant
                .used
                .fetch_sub(reserved - size, Ordering::Relaxed);
        }
        self.kept.store(true, Ordering::Relaxed);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if !self.kept.load(Ordering::Relaxed) {
            let n = self.reserved.swap(0, Ordering::Relaxed);
            self.tenant.used.fetch_sub(n, Ordering::Relaxed);
        }
    }
}

/// Workflows started per tenant and not yet ended.
#[derive(Default)]
pub(crate) struct Workflows {
    /// Tenant, then workflow id and whether its start has returned (an id
    /// still starting is not judged by whether it runs).
    m: Mutex<HashMap<String, HashMap<String, bool>>>,
}

impl Workflows {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, bool>>> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts workflow `id` against `tenant` unless it already has `max`
    /// running (`runs` says whether a started one still runs). Returns
    /// how many it has when refused.
    pub fn take(
        &self,
        tenant: &str,
        id: &str,
        max: usize,
        runs: impl Fn(&str) -> bool,
    ) -> Result<(), usize> {
        let mut m = self.lock();
        let ids = m.entry(tenant.to_owned()).or_default();
        if ids.contains_key(id) {
            return Ok(());
        }
        ids.retain(|id, started| !*started || runs(id));
        if ids.len() >= max {
            return Err(ids.len());
        }
        ids.insert(id.to_owned(), false);
        Ok(())
    }

    /// Workflows of `tenant` counted now (those started that no longer
    /// run are dropped first).
    pub fn count(&self, tenant: &str, runs: impl Fn(&str) -> bool) -> usize {
        let mut m = self.lock();
        let Some(ids) = m.get_mut(tenant) else {
            return 0;
        };
        ids.retain(|id, started| !*started || runs(id));
        ids.len()
    }

    /// Workflow `id`'s start has returned: from now on it counts while it runs.
    pub fn started(&self, tenant: &str, id: &str) {
        if let Some(started) = self.lock().get_mut(tenant).and_then(|ids| ids.get_mut(id)) {
            *started = true;
        }
    }

    /// Workflow `id` did not start: it counts no more.
    pub fn forget(&self, tenant: &str, id: &str) {
        let mut m = self.lock();
        if let Some(ids) = m.get_mut(tenant) {
            ids.remove(id);
            if ids.is_empty() {
                m.remove(tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflows_count_until_they_stop_running() {
        let w = Workflows::default();
        let running = Mutex::new(vec!["a", "b"]);
        let runs = |id: &str| running.lock().unwrap().contains(&id);
        assert_eq!(w.take("t", "a", 2, runs), Ok(()));
        assert_eq!(w.take("t", "b", 2, runs), Ok(()));
        // Neither has returned from its start: both count.
        assert_eq!(w.take("t", "c", 2, runs), Err(2));
        // Another tenant has its own share.
        assert_eq!(w.take("u", "c", 2, runs), Ok(()));
        w.started("t", "a");
        w.started("t", "b");
        assert_eq!(w.take("t", "c", 2, runs), Err(2));
        running.lock().unwrap().retain(|id| *id != "a");
        assert_eq!(w.take("t", "c", 2, runs), Ok(()));
        // Taking an id it already counts is no second count.
        assert_eq!(w.take("t", "c", 2, runs), Ok(()));
        w.forget("t", "c");
        assert_eq!(w.take("t", "d", 2, runs), Ok(()));
    }

    fn ledger() -> Arc<TenantBlobs> {
        Arc::new(TenantBlobs {
            loaded: tokio::sync::OnceCell::new(),
            used: AtomicU64::new(0),
            owned: Mutex::default(),
            looked_at: AtomicU64::new(0),
        })
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A part of `n` bytes for upload `u`.
        Part(usize, u64),
        /// Upload `u` stored blob `b` (its bytes are the parts it sent).
        Stored(usize, u8),
        /// Upload `u` failed.
        Failed(usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..4usize, 0..40u64).prop_map(|(u, n)| Op::Part(u, n)),
            2 => (0..4usize, 0..3u8).prop_map(|(u, b)| Op::Stored(u, b)),
            1 => (0..4usize).prop_map(Op::Failed),
        ]
    }

    proptest::proptest! {
        /// Uploads interleaved at random never charge past the quota, and
        /// the charge is always the owned blobs plus what is in flight.
        #[test]
        fn no_interleaving_of_uploads_passes_the_quota(
            ops in proptest::collection::vec(op(), 1..60),
            max in 1..120u64,
        ) {
            let t = ledger();
            // Per upload slot: its charge and the bytes it sent.
            let mut live: Vec<Option<(Charge, u64)>> = (0..4).map(|_| None).collect();
            let mut owned: HashMap<u8, u64> = HashMap::new();
            for op in ops {
                match op {
                    Op::Part(u, n) => {
                        let (c, sent) = live[u].get_or_insert_with(|| (Charge::new(t.clone(), max), 0));
                        if c.add(n) {
                            *sent += n;
                        } else {
                            // The upload is cut: its reservation goes.
                            live[u] = None;
                        }
                    }
                    Op::Stored(u, b) => {
                        if let Some((c, sent)) = live[u].take() {
                            // Same bytes, same size: a blob stored again
                            // has the size it had.
                            let size = *owned.get(&b).unwrap_or(&sent);
                            if size == sent {
                                c.keep(BlobHash::of(&[b]), size);
                                owned.entry(b).or_insert(size);
                            }
                        }
                    }
                    Op::Failed(u) => live[u] = None,
                }
                let in_flight: u64 = live.iter().flatten().map(|(c, _)| c.reserved.load(Ordering::Relaxed)).sum();
                let kept: u64 = owned.values().sum();
                proptest::prop_assert_eq!(t.used(), kept + in_flight);
                proptest::prop_assert!(t.used() <= max, "{} > {max}", t.used());
            }
            drop(live);
            proptest::prop_assert_eq!(t.used(), owned.values().sum::<u64>());
        }
    }

    #[test]
    fn charges_never_overshoot_and_count_a_blob_once() {
        let t = ledger();
        let (a, b) = (BlobHash::of(b"a"), BlobHash::of(b"b"));
        let first = Charge::new(t.clone(), 100);
        let second = Charge::new(t.clone(), 100);
        assert!(first.add(60));
        // Together they would pass 100.
        assert!(!second.add(50));
        assert!(second.exceeded());
        drop(second);
        assert_eq!(t.used(), 60);
        first.keep(a, 60);
        drop(first);
        assert_eq!(t.used(), 60);
        // The same bytes again: reserved while streaming, then given back.
        let again = Charge::new(t.clone(), 100);
        assert!(again.add(30));
        again.keep(a, 60);
        drop(again);
        assert_eq!(t.used(), 60);
        // A failed upload gives its reservation back.
        let failed = Charge::new(t.clone(), 100);
        assert!(failed.add(40));
        drop(failed);
        assert_eq!(t.used(), 60);
        let last = Charge::new(t.clone(), 100);
        assert!(last.add(40));
        last.keep(b, 40);
        drop(last);
        assert_eq!(t.used(), 100);
        assert!(t.owns(&a) && t.owns(&b));
    }
}

//! Tiered storage: hot events in memory, warm in RocksDB, cold in
//! compressed segments on an object store, and large payloads as blobs.
//!
//! [`TieredJournal`] is a [`Journal`] over a [`RocksJournal`]; callers see
//! one stream per id whichever tier holds its events.
//!
//! | tier | holds | read when |
//! |---|---|---|
//! | hot ([`HotConfig`]) | each active entity's latest events (per kind, by count and bytes) | a replay starts inside the cached tail: resumes of live sessions |
//! | warm ([`RocksJournal`]) | everything not archived; LZ4 on upper levels, zstd at the bottom ([`crate::WarmCompression`]) | any other replay |
//! | cold ([`ArchivePolicy`]) | events older than `archive_after_s`, or covered by a snapshot and older than `snapshot_retention_s`, in zstd segments on an [`ObjectStore`] | a replay reaches below the warm tier |
//! | blobs ([`BlobStore`]) | payloads too large for events, by SHA-256 | the application asks |
//!
//! ## Archiving is crash-safe
//!
//! [`TieredJournal::archive_id`] reads a run of eligible events, writes them
//! as one segment (fsynced on a local store), reads the segment back and
//! checks it, and only then, in **one** RocksDB write, records the segment
//! in the id's manifest and deletes the events from the warm tier. A crash
//! before that write leaves the events warm (and at worst an unreferenced
//! segment, removed by the next run); a crash after it leaves them cold. At
//! no point is an event in neither tier, or read twice: the manifest says
//! which tier owns each sequence.
//!
//! ## Blobs are kept while referenced
//!
//! An event declares the blobs it refers to ([`crate::NewEvent::with_blob`]);
//! the reference is indexed in the same write as the event, and an append
//! whose blob is missing is refused. [`TieredJournal::collect_blobs`] deletes
//! a blob once every event referring to it has been deleted (archived
//! events still count) and it is older than [`BlobConfig::gc_grace_s`].

mod blob;
mod hot;
pub mod segment;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

pub use blob::{BlobConfig, BlobHash, BlobRef, BlobStore, MAX_MEDIA_TYPE_LEN, StoredBlob};
pub use hot::{HotConfig, HotKindStats, HotLimits};
pub use segment::{Manifest, SegmentEntry};

use crate::error::{JournalError, Result};
use crate::event::{AppendOutcome, NewEvent, NewSnapshot, PersistedEvent, Snapshot, TaggedEvent};
use crate::id::{PersistenceId, Tag};
use crate::journal::{Journal, Replay, TagSubscription};
use crate::memory::check_delete;
use crate::rocks::{self, RocksJournal};
use hot::HotCache;

/// When events leave the warm tier, and how segments are cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchivePolicy {
    /// Archive events older than this many seconds (None: never by age).
    pub archive_after_s: Option<u64>,
    /// Archive events covered by the id's snapshot and older than this
    /// many seconds (None: never by snapshot).
    pub snapshot_retention_s: Option<u64>,
    /// Do not cut a segment of fewer events while younger events follow
    /// (an idle id's last events are archived whatever their number).
    pub min_segment_events: usize,
    /// Most events in one segment.
    pub max_segment_events: usize,
    /// Most envelope bytes in one segment.
    pub max_segment_bytes: usize,
    /// zstd level of segments (1 fastest .. 19 smallest).
    pub zstd_level: i32,
    /// How often the background archiver runs (seconds; None: only when
    /// asked, e.g. by `troupe journal archive`).
    pub interval_s: Option<u64>,
}

impl Default for ArchivePolicy {
    /// Archive after 7 days, or 1 day once covered by a snapshot; segments
    /// of 64 to 4,096 events and at most 8 MiB, zstd level 9; no
    /// background runs.
    fn default() -> Self {
        Self {
            archive_after_s: Some(7 * 86_400),
            snapshot_retention_s: Some(86_400),
            min_segment_events: 64,
            max_segment_events: 4096,
            max_segment_bytes: 8 << 20,
            zstd_level: 9,
            interval_s: None,
        }
    }
}

/// Where the cold tier and the blobs live.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ColdConfig {
    /// Object store URL: `file:///abs/path` (default: a `cold` directory
    /// beside the journal's), `memory://`, or `s3://`, `gs://`,
    /// `az://` when built with the `s3`, `gcs` or `azure` feature.
    pub url: Option<String>,
    /// Store options (credentials, region...) passed to `object_store`.
    pub options: BTreeMap<String, String>,
}

/// Settings of the tiers above and below the warm RocksDB journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TierConfig {
    /// The in-memory tail per entity.
    pub hot: HotConfig,
    /// The cold store.
    pub cold: ColdConfig,
    /// When to archive.
    pub archive: ArchivePolicy,
    /// Blob limits.
    pub blobs: BlobConfig,
}

impl TierConfig {
    /// Checks the bounds (segment sizes, zstd level, blob limits).
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: &'static str| {
            Err(JournalError::InvalidName {
                what: "tier configuration",
                value: String::new(),
                reason,
            })
        };
        let a = &self.archive;
        if a.max_segment_events == 0 || a.max_segment_bytes == 0 {
            return bad("archive.max_segment_events and max_segment_bytes must be at least 1");
        }
        if a.max_segment_bytes as u64 > segment::MAX_SEGMENT_RAW_BYTES / 2 {
            return bad("archive.max_segment_bytes must be at most 128 MiB");
        }
        if !(1..=19).contains(&a.zstd_level) {
            return bad("archive.zstd_level must be 1 to 19");
        }
        if a.interval_s == Some(0) {
            return bad("archive.interval_s must be at least 1 (or absent)");
        }
        if self.blobs.chunk_bytes < (5 << 20)
            && self
                .cold
                .url
                .as_deref()
                .is_some_and(|u| u.starts_with("s3://"))
        {
            return bad(
                "blobs.chunk_bytes must be at least 5 MiB on S3 (its smallest multipart part)",
            );
        }
        if self.blobs.chunk_bytes == 0 || self.blobs.max_blob_bytes == 0 {
            return bad("blobs.chunk_bytes and blobs.max_blob_bytes must be at least 1");
        }
        Ok(())
    }
}

/// A step of archiving one segment, where [`TieredJournal::crash_at`] can
/// stop the archiver as a crash would.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArchiveStep {
    /// The events were read from the warm tier.
    EventsRead,
    /// The segment was written (and synced) to the cold store.
    SegmentWritten,
    /// The segment was read back and checked.
    SegmentVerified,
    /// The manifest was updated and the events deleted from RocksDB.
    Committed,
    /// An application delete committed its manifest; the segments it
    /// dropped are not yet removed.
    DeleteCommitted,
}

impl ArchiveStep {
    /// Every step, in order.
    pub const ALL: [ArchiveStep; 5] = [
        ArchiveStep::EventsRead,
        ArchiveStep::SegmentWritten,
        ArchiveStep::SegmentVerified,
        ArchiveStep::Committed,
        ArchiveStep::DeleteCommitted,
    ];
}

/// What one archive run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveReport {
    /// Ids looked at.
    pub ids_scanned: u64,
    /// Ids with at least one new segment.
    pub ids_archived: u64,
    /// Events moved to the cold tier.
    pub events: u64,
    /// Segments written.
    pub segments: u64,
    /// Segment bytes written.
    pub bytes: u64,
    /// Envelope bytes those segments hold.
    pub raw_bytes: u64,
    /// Unreferenced segments removed (left by a crash or a delete).
    pub orphans_removed: u64,
    /// Ids whose archiving stopped at bad data (a corrupt event, a gap, an
    /// unreadable manifest or segment), with the reason: the events before
    /// it are archived, the rest stays warm, and the run goes on with the
    /// other ids. At most [`MAX_REPORTED_FAILURES`].
    pub failures: Vec<(PersistenceId, String)>,
    /// Ids that failed (may exceed `failures.len()`).
    pub failure_count: u64,
}

/// Most failed ids an [`ArchiveReport`] lists.
pub const MAX_REPORTED_FAILURES: usize = 100;

impl ArchiveReport {
    fn add(&mut self, other: &ArchiveReport) {
        self.events += other.events;
        self.segments += other.segments;
        self.bytes += other.bytes;
        self.raw_bytes += other.raw_bytes;
    }
}

/// What one blob collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlobGcReport {
    /// Blobs looked at.
    pub scanned: u64,
    /// Blobs still referenced (or within their grace period).
    pub kept: u64,
    /// Blobs deleted.
    pub collected: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// References to deleted events removed from the index.
    pub stale_refs_removed: u64,
    /// Abandoned uploads removed.
    pub abandoned_uploads_removed: u64,
}

/// Events and bytes of one kind, per tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KindTierStats {
    /// Hot tier (this process's memory).
    pub hot: HotKindStats,
    /// Events in RocksDB.
    pub warm_events: u64,
    /// Their envelope bytes (uncompressed).
    pub warm_raw_bytes: u64,
    /// RocksDB's estimate of their bytes on disk (compressed).
    pub warm_disk_bytes: u64,
    /// Events in cold segments.
    pub cold_events: u64,
    /// Cold segments.
    pub cold_segments: u64,
    /// Segment bytes (compressed).
    pub cold_bytes: u64,
    /// Envelope bytes those segments hold.
    pub cold_raw_bytes: u64,
}

/// Figures per tier and kind ([`TieredJournal::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Per kind.
    pub kinds: BTreeMap<String, KindTierStats>,
    /// Blobs stored.
    pub blobs: u64,
    /// Their bytes.
    pub blob_bytes: u64,
}

/// An object store, and its root directory when it is the local file
/// system: `object_store` does not fsync local writes, so Troupe syncs the
/// file and its directory itself before it counts a write as durable.
#[derive(Clone, Debug)]
pub struct Objects {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// Root directory of a local store.
    pub local_root: Option<PathBuf>,
}

impl Objects {
    /// A remote (or in-memory) store, durable once a write returns.
    pub fn remote(store: Arc<dyn ObjectStore>) -> Self {
        Self {
            store,
            local_root: None,
        }
    }

    /// Makes a written object durable (fsync of the file and its
    /// directories on a local store; nothing elsewhere).
    pub(crate) async fn sync(&self, path: &Path) -> Result<()> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let file = root.join(path.as_ref());
        let root = root.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::File::open(&file)?.sync_all()?;
            let mut dir = file.parent();
            while let Some(d) = dir {
                std::fs::File::open(d)?.sync_all()?;
                if d == root {
                    break;
                }
                dir = d.parent();
            }
            Ok(())
        })
        .await
        .map_err(|e| JournalError::storage("syncing an object", e))?
        .map_err(|e| JournalError::storage("syncing an object", e))
    }
}

/// Opens the object store a [`ColdConfig`] names; `default_dir` is used
/// when it names none.
pub fn open_object_store(config: &ColdConfig, default_dir: &FsPath) -> Result<Objects> {
    let fail = |message: String| JournalError::Storage {
        context: "opening the cold store",
        message,
    };
    let local = |dir: &FsPath| -> Result<Objects> {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        let root = dir
            .canonicalize()
            .map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(&root)
            .map_err(|e| fail(e.to_string()))?
            .with_automatic_cleanup(true);
        Ok(Objects {
            store: Arc::new(fs),
            local_root: Some(root),
        })
    };
    let Some(url) = &config.url else {
        return local(default_dir);
    };
    if let Some(path) = url.strip_prefix("file://") {
        return local(FsPath::new(path));
    }
    let parsed = url::Url::parse(url).map_err(|e| fail(format!("`{url}`: {e}")))?;
    let (store, prefix) = object_store::parse_url_opts(&parsed, config.options.iter()).map_err(|e| {
        fail(format!(
            "`{url}`: {e} (cloud stores need troupe built with the `s3`, `gcs` or `azure` feature)"
        ))
    })?;
    let store: Arc<dyn ObjectStore> = Arc::from(store);
    Ok(Objects::remote(if prefix.as_ref().is_empty() {
        store
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
    }))
}

/// The default cold directory for a journal directory: `cold` beside it.
pub fn default_cold_dir(journal_dir: &FsPath) -> PathBuf {
    match journal_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join("cold"),
        _ => PathBuf::from("cold"),
    }
}

struct Inner {
    /// The cold store was claimed (or found ours) once: no need to look again.
    claimed: std::sync::atomic::AtomicBool,
    warm: RocksJournal,
    hot: Arc<HotCache>,
    cold: Arc<dyn ObjectStore>,
    objects: Objects,
    blobs: BlobStore,
    policy: ArchivePolicy,
    /// Serialises archiving, application deletes and blob collection.
    archive_lock: tokio::sync::Mutex<()>,
    /// Appends that refer to blobs hold it shared; the collector exclusive.
    blob_gate: tokio::sync::RwLock<()>,
    /// Set before the first manifest is committed; replays skip the
    /// manifest lookup while it is false.
    has_cold: AtomicBool,
    crash_at: std::sync::Mutex<Option<ArchiveStep>>,
}

/// The tiered journal. See the [module docs](self).
#[derive(Clone)]
pub struct TieredJournal {
    inner: Arc<Inner>,
}

/// Maps an object store error to a storage error naming what was being done.
pub(crate) fn store_err(context: &'static str) -> impl Fn(object_store::Error) -> JournalError {
    move |e| JournalError::Storage {
        context,
        message: e.to_string(),
    }
}

impl TieredJournal {
    /// Tiers around `warm`, with cold segments and blobs in `cold`.
    pub fn new(warm: RocksJournal, cold: Objects, config: TierConfig) -> Result<Self> {
        config.validate()?;
        let has_cold = rocks::any_cold_manifest(warm.db())?;
        let hot = Arc::new(HotCache::new(config.hot));
        warm.set_commit_hook(hot.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                claimed: std::sync::atomic::AtomicBool::new(false),
                hot,
                blobs: BlobStore::new(cold.clone(), config.blobs),
                cold: cold.store.clone(),
                objects: cold,
                warm,
                policy: config.archive,
                archive_lock: tokio::sync::Mutex::new(()),
                blob_gate: tokio::sync::RwLock::new(()),
                has_cold: AtomicBool::new(has_cold),
                crash_at: std::sync::Mutex::new(None),
            }),
        })
    }

    /// Opens the warm journal and the cold store [`TierConfig::cold`]
    /// names (a `cold` directory beside the journal's by default).
    pub fn open(warm: rocks::RocksConfig, config: TierConfig) -> Result<Self> {
        let cold = open_object_store(&config.cold, &default_cold_dir(&warm.path))?;
        Self::new(RocksJournal::open(warm)?, cold, config)
    }

    /// The warm tier.
    pub fn warm(&self) -> &RocksJournal {
        &self.inner.warm
    }

    /// The blob store (on the cold store, under `blobs/`).
    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    /// The archive policy.
    pub fn policy(&self) -> &ArchivePolicy {
        &self.inner.policy
    }

    /// Makes the archiver stop at `step` as if the process had crashed
    /// there (crash tests); None clears it.
    pub fn crash_at(&self, step: Option<ArchiveStep>) {
        *self
            .inner
            .crash_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = step;
    }

    fn step(&self, step: ArchiveStep) -> Result<()> {
        if *self
            .inner
            .crash_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            == Some(step)
        {
            return Err(JournalError::Injected(format!(
                "archiver stopped at {step:?}"
            )));
        }
        Ok(())
    }

    /// The cold manifest of `id`, if any of its events were archived.
    pub async fn manifest(&self, id: &PersistenceId) -> Result<Option<Manifest>> {
        let id2 = id.clone();
        let bytes = self
            .inner
            .warm
            .with_db(move |db| rocks::read_cold_manifest(db, &id2))
            .await?;
        bytes.map(|b| Manifest::decode(id, &b)).transpose()
    }

    /// The manifest to extend for `id`: the stored one, or a fresh one
    /// that carries the application's earlier deletes.
    async fn manifest_or_new(&self, id: &PersistenceId) -> Result<Manifest> {
        if let Some(m) = self.manifest(id).await? {
            return Ok(m);
        }
        let id2 = id.clone();
        let deleted = self
            .inner
            .warm
            .with_db(move |db| rocks::deleted_to_mark(db, &id2))
            .await?;
        Ok(Manifest {
            version: 1,
            deleted_to: deleted,
            archived_to: deleted,
            segments: Vec::new(),
        })
    }

    /// The events of a segment from `from_seq` on, checked end to end.
    async fn fetch_segment(
        &self,
        id: &PersistenceId,
        seg: &SegmentEntry,
        from_seq: u64,
    ) -> Result<Vec<PersistedEvent>> {
        let err = |reason: String| JournalError::ColdSegment {
            id: id.clone(),
            from: seg.from,
            to: seg.to,
            segment: seg.object.clone(),
            reason,
        };
        let path = Path::from(seg.object.as_str());
        let bytes = match self.inner.cold.get(&path).await {
            Ok(got) => got.bytes().await.map_err(|e| err(e.to_string()))?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(err("the segment is missing from the cold store".into()));
            }
            Err(e) => return Err(err(e.to_string())),
        };
        metrics::counter!("troupe_journal_cold_segment_reads_total").increment(1);
        Self::decode_segment(id, seg, bytes, from_seq).await
    }

    /// Checks and decodes a segment's bytes (on the blocking pool) from
    /// `from_seq` on.
    async fn decode_segment(
        id: &PersistenceId,
        seg: &SegmentEntry,
        bytes: bytes::Bytes,
        from_seq: u64,
    ) -> Result<Vec<PersistedEvent>> {
        let (id2, seg2) = (id.clone(), seg.clone());
        let decoded = tokio::task::spawn_blocking(move || {
            segment::decode_from(&id2, &seg2, &bytes, from_seq)
        })
        .await
        .map_err(|e| JournalError::storage("decoding a segment", e))?;
        decoded.map_err(|reason| JournalError::ColdSegment {
            id: id.clone(),
            from: seg.from,
            to: seg.to,
            segment: seg.object.clone(),
            reason,
        })
    }

    /// Archives what the policy allows of one id. Returns what was moved.
    pub async fn archive_id(&self, id: &PersistenceId, now_ms: u64) -> Result<ArchiveReport> {
        let _guard = self.inner.archive_lock.lock().await;
        self.claim_store().await?;
        self.archive_id_locked(id, now_ms).await
    }

    async fn archive_id_locked(&self, id: &PersistenceId, now_ms: u64) -> Result<ArchiveReport> {
        let mut report = ArchiveReport::default();
        self.archive_into(id, now_ms, &mut report).await?;
        Ok(report)
    }

    /// Archives what the policy allows of `id`, adding what it moved to
    /// `report` (also when it then stops at bad data).
    async fn archive_into(
        &self,
        id: &PersistenceId,
        now_ms: u64,
        report: &mut ArchiveReport,
    ) -> Result<()> {
        let policy = &self.inner.policy;
        if policy.archive_after_s.is_none() && policy.snapshot_retention_s.is_none() {
            return Ok(());
        }
        let snapshot_seq = match policy.snapshot_retention_s {
            Some(_) => self
                .inner
                .warm
                .load_snapshot(id)
                .await?
                .map_or(0, |s| s.seq),
            None => 0,
        };
        let eligible = |seq: u64, ts: u64| {
            let age_ms = now_ms.saturating_sub(ts);
            policy.archive_after_s.is_some_and(|a| age_ms >= a * 1000)
                || (seq <= snapshot_seq
                    && policy
                        .snapshot_retention_s
                        .is_some_and(|r| age_ms >= r * 1000))
        };
        let max_events = policy.max_segment_events.max(1);
        let max_bytes = policy.max_segment_bytes.max(1);
        loop {
            let mut manifest = self.manifest_or_new(id).await?;
            let start = manifest.archived_to + 1;
            let id2 = id.clone();
            let raw = self
                .inner
                .warm
                .with_db(move |db| rocks::read_raw(db, &id2, start, max_events, max_bytes))
                .await?;
            let mut take = 0;
            // Bad data stops the run for this id after the good events
            // before it are archived (they cannot move past it anyway).
            let mut blocked = None;
            for (i, (seq, env)) in raw.iter().enumerate() {
                if *seq != start + i as u64 {
                    blocked = Some(JournalError::Gap {
                        id: id.clone(),
                        expected: start + i as u64,
                        found: *seq,
                    });
                    break;
                }
                let env = match crate::envelope::decode_event(env) {
                    Ok(env) => env,
                    Err(reason) => {
                        blocked = Some(JournalError::Corrupt {
                            id: id.clone(),
                            seq: *seq,
                            reason,
                        });
                        break;
                    }
                };
                if !eligible(*seq, env.timestamp_ms) {
                    break;
                }
                take += 1;
            }
            let younger_follow = take < raw.len();
            let too_few = younger_follow && take < policy.min_segment_events;
            if take == 0 || (too_few && blocked.is_none()) {
                return match blocked {
                    Some(e) => Err(e),
                    None => Ok(()),
                };
            }
            self.step(ArchiveStep::EventsRead)?;
            let envelopes: Vec<Vec<u8>> = raw.into_iter().take(take).map(|(_, e)| e).collect();
            let to = start + take as u64 - 1;
            let (id2, level) = (id.clone(), policy.zstd_level);
            let (bytes, raw_bytes) = tokio::task::spawn_blocking(move || {
                segment::encode(&id2, start, &envelopes, level, crate::event::now_ms())
            })
            .await
            .map_err(|e| JournalError::storage("encoding a segment", e))?
            .map_err(|e| JournalError::storage("compressing a segment", e))?;
            let object = segment::object_path(id, start, to);
            let entry = SegmentEntry {
                from: start,
                to,
                object: object.clone(),
                bytes: bytes.len() as u64,
                raw_bytes,
                crc: segment::crc_of(&bytes),
                created_ms: now_ms,
            };
            let path = Path::from(object.as_str());
            let written = bytes::Bytes::from(bytes);
            self.inner
                .cold
                .put(&path, PutPayload::from(written.clone()))
                .await
                .map_err(store_err("writing a segment"))?;
            self.inner.objects.sync(&path).await?;
            self.step(ArchiveStep::SegmentWritten)?;
            let back = self
                .inner
                .cold
                .get(&path)
                .await
                .map_err(store_err("reading a segment back"))?
                .bytes()
                .await
                .map_err(store_err("reading a segment back"))?;
            if back != written {
                return Err(JournalError::ColdSegment {
                    id: id.clone(),
                    from: start,
                    to,
                    segment: object,
                    reason: "read back different bytes than were written".into(),
                });
            }
            // The bytes just read back are the stored object: decode those.
            let checked = Self::decode_segment(id, &entry, back, start).await?;
            if checked.len() != take {
                return Err(JournalError::ColdSegment {
                    id: id.clone(),
                    from: start,
                    to,
                    segment: object,
                    reason: format!("read back {} events, wrote {take}", checked.len()),
                });
            }
            self.step(ArchiveStep::SegmentVerified)?;
            manifest.version = 1;
            manifest.archived_to = to;
            manifest.segments.push(entry.clone());
            self.inner.has_cold.store(true, Ordering::SeqCst);
            self.inner
                .warm
                .delete_with_manifest(id, to, manifest.encode(), false)
                .await?;
            metrics::counter!("troupe_journal_archived_events_total").increment(take as u64);
            metrics::counter!("troupe_journal_archived_bytes_total").increment(entry.bytes);
            report.events += take as u64;
            report.segments += 1;
            report.bytes += entry.bytes;
            report.raw_bytes += entry.raw_bytes;
            self.step(ArchiveStep::Committed)?;
            if let Some(e) = blocked {
                return Err(e);
            }
            if younger_follow {
                return Ok(());
            }
        }
    }

    /// Makes sure the cold store is this journal's: the first run writes
    /// the journal's id into it, and a store claimed by another journal is
    /// refused (its segments and blobs would look like orphans here).
    async fn claim_store(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.inner.claimed.load(Ordering::Acquire) {
            return Ok(());
        }
        self.claim_store_once().await?;
        self.inner.claimed.store(true, Ordering::Release);
        Ok(())
    }

    async fn claim_store_once(&self) -> Result<()> {
        let mine = self.inner.warm.with_db(rocks::journal_id).await?;
        let path = Path::from("troupe-journal-id");
        match self.inner.cold.get(&path).await {
            Ok(got) => {
                let theirs = got
                    .bytes()
                    .await
                    .map_err(store_err("reading the cold store's owner"))?;
                if theirs.as_ref() != mine.as_bytes() {
                    return Err(JournalError::Storage {
                        context: "claiming the cold store",
                        message: format!(
                            "the cold store {} belongs to another journal ({}); give each journal its own cold.url",
                            self.inner.cold,
                            String::from_utf8_lossy(&theirs)
                        ),
                    });
                }
                Ok(())
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.inner
                    .cold
                    .put(&path, PutPayload::from(mine.into_bytes()))
                    .await
                    .map_err(store_err("claiming the cold store"))?;
                self.inner.objects.sync(&path).await
            }
            Err(e) => Err(store_err("reading the cold store's owner")(e)),
        }
    }

    /// Removes segments no manifest refers to (left by a crash between a
    /// segment write and its commit, or by a delete).
    async fn remove_orphans_locked(&self) -> Result<u64> {
        let manifests = self.inner.warm.with_db(rocks::all_cold_manifests).await?;
        let mut live = HashSet::new();
        for (id, bytes) in &manifests {
            // An unreadable manifest stops the sweep: its segments must not
            // be taken for orphans.
            for s in Manifest::decode(id, bytes)?.segments {
                live.insert(s.object);
            }
        }
        let prefix = Path::from("segments");
        let mut listing = self.inner.cold.list(Some(&prefix));
        let mut orphans = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(store_err("listing segments"))?;
            if !live.contains(meta.location.as_ref()) {
                orphans.push(meta.location);
            }
        }
        drop(listing);
        for p in &orphans {
            match self.inner.cold.delete(p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_err("removing an orphan segment")(e)),
            }
        }
        Ok(orphans.len() as u64)
    }

    /// Archives every id the policy allows, first removing orphan
    /// segments. `progress(done, total)` is called after each id.
    pub async fn archive_all(
        &self,
        now_ms: u64,
        mut progress: impl FnMut(u64, u64) + Send,
    ) -> Result<ArchiveReport> {
        self.archive_all_with(now_ms, Some(&mut progress)).await
    }

    /// `archive_all`; without a progress callback the ids are not counted
    /// first (one scan of the ids instead of two).
    async fn archive_all_with(
        &self,
        now_ms: u64,
        mut progress: Option<&mut (dyn FnMut(u64, u64) + Send)>,
    ) -> Result<ArchiveReport> {
        let _guard = self.inner.archive_lock.lock().await;
        self.claim_store().await?;
        let mut report = ArchiveReport {
            orphans_removed: self.remove_orphans_locked().await?,
            ..ArchiveReport::default()
        };
        let total = match progress {
            Some(_) => self.count_ids().await?,
            None => 0,
        };
        let mut after: Option<PersistenceId> = None;
        loop {
            let page = self
                .inner
                .warm
                .persistence_ids(after.as_ref(), 1000)
                .await?;
            let Some(last) = page.last().cloned() else {
                break;
            };
            for id in &page {
                let mut r = ArchiveReport::default();
                match self.archive_into(id, now_ms, &mut r).await {
                    Ok(()) => {}
                    Err(
                        e @ (JournalError::Corrupt { .. }
                        | JournalError::Gap { .. }
                        | JournalError::ColdSegment { .. }
                        | JournalError::CorruptMetadata { .. }),
                    ) => {
                        tracing::warn!(%id, error = %e, "archiving stopped at bad data");
                        report.failure_count += 1;
                        if report.failures.len() < MAX_REPORTED_FAILURES {
                            report.failures.push((id.clone(), e.to_string()));
                        }
                    }
                    Err(e) => return Err(e),
                }
                report.ids_scanned += 1;
                if r.segments > 0 {
                    report.ids_archived += 1;
                }
                report.add(&r);
                if let Some(p) = progress.as_mut() {
                    p(report.ids_scanned, total.max(report.ids_scanned));
                }
            }
            after = Some(last);
        }
        Ok(report)
    }

    async fn count_ids(&self) -> Result<u64> {
        let mut n = 0u64;
        let mut after: Option<PersistenceId> = None;
        loop {
            let page = self
                .inner
                .warm
                .persistence_ids(after.as_ref(), 10_000)
                .await?;
            n += page.len() as u64;
            match page.last() {
                Some(l) => after = Some(l.clone()),
                None => return Ok(n),
            }
        }
    }

    /// Deletes blobs no stored event refers to any more and that are older
    /// than the grace period, drops index entries of deleted events, and
    /// removes abandoned uploads.
    pub async fn collect_blobs(&self, now_ms: u64) -> Result<BlobGcReport> {
        let _archive = self.inner.archive_lock.lock().await;
        self.claim_store().await?;
        let grace_ms = self.inner.blobs.config().gc_grace_s.saturating_mul(1000);
        let mut report = BlobGcReport::default();
        let mut floors: HashMap<PersistenceId, u64> = HashMap::new();
        // No append may add a reference while blobs are judged; appends
        // that refer to blobs wait for the collection to end.
        let _gate = self.inner.blob_gate.write().await;
        // An append whose caller gave up may still be queued in the writer
        // with its references: let everything queued commit first.
        self.inner.warm.flush().await?;
        for blob in self.inner.blobs.list().await? {
            report.scanned += 1;
            let hash = blob.hash;
            let refs = self
                .inner
                .warm
                .with_db(move |db| rocks::blob_refs(db, &hash.0))
                .await?;
            let mut live = false;
            let mut stale = Vec::new();
            for (id, seq) in refs {
                let floor = match floors.get(&id) {
                    Some(f) => *f,
                    None => {
                        let f = self.manifest_or_new(&id).await?.deleted_to;
                        floors.insert(id.clone(), f);
                        f
                    }
                };
                if seq <= floor {
                    stale.push((id, seq));
                } else {
                    live = true;
                }
            }
            report.stale_refs_removed += stale.len() as u64;
            self.inner
                .warm
                .with_db(move |db| rocks::remove_blob_refs(db, &hash.0, &stale))
                .await?;
            if live || blob.modified_ms.saturating_add(grace_ms) > now_ms {
                report.kept += 1;
                continue;
            }
            // Uploaded again since the listing? Then it is young again.
            match self.inner.blobs.stored(&blob.hash).await? {
                Some(now) if now.modified_ms.saturating_add(grace_ms) > now_ms => {
                    report.kept += 1;
                    continue;
                }
                None => continue,
                Some(_) => {}
            }
            self.inner.blobs.delete(&blob.hash).await?;
            report.collected += 1;
            report.bytes_freed += blob.size;
        }
        report.abandoned_uploads_removed = self
            .inner
            .blobs
            .remove_stale_uploads(now_ms.saturating_sub(grace_ms))
            .await?;
        metrics::counter!("troupe_blobs_collected_total").increment(report.collected);
        Ok(report)
    }

    /// Events and bytes per tier and kind. Scans every warm event;
    /// `progress(events_scanned)` is called as it goes.
    pub async fn stats(&self, progress: impl FnMut(u64) + Send + 'static) -> Result<TierStats> {
        let mut out = TierStats::default();
        let (warm, manifests) = self
            .inner
            .warm
            .with_db(move |db| {
                let mut warm: BTreeMap<String, (u64, u64)> = BTreeMap::new();
                rocks::scan_event_sizes(
                    db,
                    |kind, len| {
                        let e = match warm.get_mut(kind) {
                            Some(e) => e,
                            None => warm.entry(kind.to_owned()).or_default(),
                        };
                        e.0 += 1;
                        e.1 += len as u64;
                    },
                    progress,
                )?;
                let mut disk = BTreeMap::new();
                for kind in warm.keys() {
                    disk.insert(kind.clone(), rocks::approximate_kind_bytes(db, kind)?);
                }
                Ok(((warm, disk), rocks::all_cold_manifests(db)?))
            })
            .await?;
        let (counts, disk) = warm;
        for (kind, (events, raw)) in counts {
            let k = out.kinds.entry(kind.clone()).or_default();
            k.warm_events = events;
            k.warm_raw_bytes = raw;
            k.warm_disk_bytes = disk.get(&kind).copied().unwrap_or(0);
        }
        for (id, bytes) in manifests {
            let m = Manifest::decode(&id, &bytes)?;
            let k = out.kinds.entry(id.kind().to_owned()).or_default();
            k.cold_events += m.cold_events();
            k.cold_segments += m.segments.len() as u64;
            k.cold_bytes += m.segments.iter().map(|s| s.bytes).sum::<u64>();
            k.cold_raw_bytes += m.segments.iter().map(|s| s.raw_bytes).sum::<u64>();
        }
        for (kind, hot) in self.inner.hot.stats() {
            out.kinds.entry(kind).or_default().hot = hot;
        }
        for b in self.inner.blobs.list().await? {
            out.blobs += 1;
            out.blob_bytes += b.size;
        }
        Ok(out)
    }

    /// Runs [`archive_all`](Self::archive_all) and
    /// [`collect_blobs`](Self::collect_blobs) every `interval` until the
    /// returned task is aborted (or the journal closes).
    pub fn spawn_archiver(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let journal = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = crate::event::now_ms();
                match journal.archive_all_with(now, None).await {
                    Ok(r) => tracing::info!(
                        events = r.events,
                        segments = r.segments,
                        bytes = r.bytes,
                        orphans = r.orphans_removed,
                        "archive run finished"
                    ),
                    Err(JournalError::Closed) => return,
                    Err(e) => tracing::error!(error = %e, "archive run failed"),
                }
                match journal.collect_blobs(now).await {
                    Ok(r) => tracing::info!(
                        collected = r.collected,
                        bytes = r.bytes_freed,
                        "blob collection finished"
                    ),
                    Err(JournalError::Closed) => return,
                    Err(e) => tracing::error!(error = %e, "blob collection failed"),
                }
            }
        })
    }

    /// Reads the warm tier's total SST bytes of events after flushing and
    /// compacting it to the bottommost level (benchmarks, tools).
    pub fn warm_compacted_bytes(&self) -> Result<u64> {
        rocks::compact_events(&self.inner.warm)?;
        rocks::events_sst_bytes(&self.inner.warm)
    }

    /// Stops the warm journal's writer (see [`RocksJournal::close`]).
    pub async fn close(&self) {
        self.inner.warm.close().await;
    }

    async fn check_blobs(&self, events: &[NewEvent]) -> Result<()> {
        let mut seen = HashSet::new();
        for r in events.iter().flat_map(|e| &e.blobs) {
            if !seen.insert(r.hash) {
                continue;
            }
            match self.inner.blobs.size_of(&r.hash).await? {
                None => {
                    return Err(JournalError::BlobMissing {
                        hash: r.hash.to_string(),
                    });
                }
                Some(size) if size != r.size => {
                    return Err(JournalError::BlobCorrupt {
                        hash: r.hash.to_string(),
                        reason: format!("stored with {size} bytes, referenced as {}", r.size),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn replay_stream(
        self,
        id: PersistenceId,
        from: u64,
        to: u64,
    ) -> impl futures::Stream<Item = Result<Vec<PersistedEvent>>> + Send + 'static {
        async_stream::try_stream! {
        let batch = self.inner.warm.replay_batch_size();
        let mut next = from;
        let mut manifest = if self.inner.has_cold.load(Ordering::SeqCst) {
            self.manifest(&id).await?
        } else {
            None
        };
        loop {
            if let Some(m) = &manifest {
                next = next.max(m.deleted_to + 1);
                for seg in &m.segments {
                    if next > to || next > m.archived_to {
                        break;
                    }
                    if seg.to < next {
                        continue;
                    }
                    if seg.from > next {
                        Err(JournalError::ColdSegment {
                            id: id.clone(),
                            from: seg.from,
                            to: seg.to,
                            segment: seg.object.clone(),
                            reason: format!("the manifest has no segment holding #{next}"),
                        })?;
                    }
                    let events = self.fetch_segment(&id, seg, next).await?;
                    let wanted: Vec<PersistedEvent> = events
                        .into_iter()
                        .filter(|e| e.seq >= next && e.seq <= to)
                        .collect();
                    for chunk in wanted.chunks(batch) {
                        yield chunk.to_vec();
                    }
                    next = seg.to.min(to) + 1;
                }
                if next > to {
                    return;
                }
                if next <= m.archived_to {
                    Err(JournalError::Gap {
                        id: id.clone(),
                        expected: next,
                        found: m.archived_to + 1,
                    })?;
                }
            }
            let mut warm = self.inner.warm.replay(&id, next, to);
            let mut first = true;
            let mut recheck = false;
            while let Some(b) = warm.next().await {
                let b = b?;
                if first {
                    first = false;
                    if b.first().is_some_and(|e| e.seq != next)
                        && self.inner.has_cold.load(Ordering::SeqCst)
                    {
                        // Deleted events, or archived since the manifest
                        // was read: the manifest says which.
                        let now = self.manifest(&id).await?;
                        if now.as_ref().is_some_and(|m| m.archived_to >= next) {
                            manifest = now;
                            recheck = true;
                            break;
                        }
                    }
                }
                if let Some(last) = b.last() {
                    next = last.seq + 1;
                }
                yield b;
            }
            if recheck {
                continue;
            }
            if first && next <= to && self.inner.has_cold.load(Ordering::SeqCst) {
                let now = self.manifest(&id).await?;
                if now.as_ref().is_some_and(|m| m.archived_to >= next) {
                    manifest = now;
                    continue;
                }
            }
            return;
        }
        }
    }
}

#[async_trait::async_trait]
impl Journal for TieredJournal {
    async fn append(
        &self,
        id: &PersistenceId,
        expected_seq: u64,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome> {
        if events.iter().any(|e| !e.blobs.is_empty()) {
            let _gate = self.inner.blob_gate.read().await;
            self.check_blobs(&events).await?;
            self.inner.warm.append(id, expected_seq, events).await
        } else {
            self.inner.warm.append(id, expected_seq, events).await
        }
    }

    fn replay(&self, id: &PersistenceId, from_seq: u64, to_seq: u64) -> Replay {
        let from = from_seq.max(1);
        if from > to_seq {
            return Replay::from_stream(futures::stream::empty());
        }
        if let Some(events) = self.inner.hot.read(id, from, to_seq) {
            let batch = self.inner.warm.replay_batch_size();
            let batches: Vec<Result<Vec<PersistedEvent>>> =
                events.chunks(batch).map(|c| Ok(c.to_vec())).collect();
            return Replay::from_stream(futures::stream::iter(batches));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Replay::failed(JournalError::NoRuntime("replay"));
        }
        Replay::from_stream(self.clone().replay_stream(id.clone(), from, to_seq))
    }

    async fn highest_seq(&self, id: &PersistenceId) -> Result<u64> {
        if let Some(h) = self.inner.hot.highest(id) {
            return Ok(h);
        }
        self.inner.warm.highest_seq(id).await
    }

    async fn save_snapshot(&self, id: &PersistenceId, snapshot: NewSnapshot) -> Result<()> {
        self.inner.warm.save_snapshot(id, snapshot).await
    }

    async fn load_snapshot(&self, id: &PersistenceId) -> Result<Option<Snapshot>> {
        self.inner.warm.load_snapshot(id).await
    }

    async fn delete_events_to(&self, id: &PersistenceId, to_seq: u64) -> Result<()> {
        let _guard = self.inner.archive_lock.lock().await;
        let Some(mut m) = self.manifest(id).await? else {
            return self.inner.warm.delete_events_to(id, to_seq).await;
        };
        let highest = self.inner.warm.highest_seq(id).await?;
        check_delete(id, to_seq, highest)?;
        let (dropped, kept): (Vec<_>, Vec<_>) =
            m.segments.into_iter().partition(|s| s.to <= to_seq);
        m.segments = kept;
        m.deleted_to = m.deleted_to.max(to_seq);
        m.archived_to = m.archived_to.max(to_seq);
        self.inner
            .warm
            .delete_with_manifest(id, m.archived_to, m.encode(), true)
            .await?;
        // The dropped segments are left to the next archive run's orphan
        // sweep: a replay still holding the old manifest can finish
        // reading them, and with buffered durability a power loss that
        // brings the old manifest back finds them still there.
        self.step(ArchiveStep::DeleteCommitted)?;
        drop(dropped);
        Ok(())
    }

    async fn persistence_ids(
        &self,
        after: Option<&PersistenceId>,
        limit: usize,
    ) -> Result<Vec<PersistenceId>> {
        self.inner.warm.persistence_ids(after, limit).await
    }

    async fn events_by_tag(
        &self,
        tag: &Tag,
        from_offset: u64,
        limit: usize,
    ) -> Result<Vec<TaggedEvent>> {
        let tag2 = tag.clone();
        let entries = self
            .inner
            .warm
            .with_db(move |db| rocks::tag_entries(db, &tag2, from_offset, limit))
            .await?;
        let mut types = crate::event::TypeNameCache::default();
        let mut manifests: HashMap<PersistenceId, Option<Manifest>> = HashMap::new();
        // One decoded segment at a time: entries of one id and segment
        // tend to be adjacent, and memory stays bounded by one segment.
        let mut segment: Option<(String, Vec<PersistedEvent>)> = None;
        let mut out = Vec::with_capacity(entries.len());
        for (offset, id, seq, value) in entries {
            if let Some(bytes) = value {
                let event = PersistedEvent::from_envelope(&id, seq, &bytes, &mut types)?;
                out.push(TaggedEvent { offset, event });
                continue;
            }
            if !self.inner.has_cold.load(Ordering::SeqCst) {
                continue;
            }
            if !manifests.contains_key(&id) {
                let m = self.manifest(&id).await?;
                manifests.insert(id.clone(), m);
            }
            let Some(Some(m)) = manifests.get(&id) else {
                continue;
            };
            if seq <= m.deleted_to || seq > m.archived_to {
                continue;
            }
            let Some(seg) = m.segments.iter().find(|s| s.from <= seq && seq <= s.to) else {
                continue;
            };
            if segment.as_ref().is_none_or(|(o, _)| o != &seg.object) {
                let events = self.fetch_segment(&id, seg, seg.from).await?;
                segment = Some((seg.object.clone(), events));
            }
            if let Some((_, events)) = &segment
                && let Some(event) = events.get((seq - seg.from) as usize).cloned()
            {
                out.push(TaggedEvent { offset, event });
            }
        }
        Ok(out)
    }

    fn subscribe_tag(&self, tag: &Tag, from_offset: u64) -> TagSubscription {
        let live = self.inner.warm.live_feed();
        crate::subscription::spawn(self.clone(), live, tag.clone(), from_offset)
    }

    async fn flush(&self) -> Result<()> {
        self.inner.warm.flush().await
    }

    async fn close(&self) {
        TieredJournal::close(self).await
    }
}

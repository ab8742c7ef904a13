//! Content-addressed blobs for payloads that do not belong in events.
//!
//! A blob is stored once under its SHA-256 (`blobs/sha256/ab/abcd...`) in
//! an object store; events carry a [`BlobRef`] (hash, size, media type)
//! and declare it with [`crate::NewEvent::with_blob`]. Bytes are streamed
//! in and out in chunks of [`BlobConfig::chunk_bytes`], never held whole,
//! and checked against the hash on the way out.

use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::store_err;
use crate::error::{JournalError, Result};

/// Longest media type, in bytes.
pub const MAX_MEDIA_TYPE_LEN: usize = 127;
/// Parts of one multipart upload in flight at once.
const UPLOAD_CONCURRENCY: usize = 4;

/// The SHA-256 of a blob's bytes; shown and serialized as `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobHash(pub [u8; 32]);

impl BlobHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Lower-case hex digits.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub(crate) fn object_path(&self) -> Path {
        let hex = self.hex();
        Path::from(format!("blobs/sha256/{}/{hex}", &hex[..2]))
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for BlobHash {
    type Err = JournalError;
    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason: &'static str| JournalError::InvalidName {
            what: "blob hash",
            value: s.chars().take(80).collect(),
            reason,
        };
        let hex_part = s
            .strip_prefix("sha256:")
            .ok_or_else(|| invalid("must start with `sha256:`"))?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out)
            .map_err(|_| invalid("must be 64 hex digits after `sha256:`"))?;
        Ok(Self(out))
    }
}

impl Serialize for BlobHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BlobHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What an event carries instead of a large payload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    /// SHA-256 of the bytes.
    pub hash: BlobHash,
    /// Length in bytes.
    pub size: u64,
    /// Media type, such as `image/png` or `audio/wav`.
    pub media_type: String,
}

/// Settings of a [`BlobStore`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlobConfig {
    /// Largest blob accepted (bytes); a longer upload stops with
    /// [`JournalError::BlobTooLarge`] and leaves nothing behind.
    pub max_blob_bytes: u64,
    /// Upload part and buffer size (bytes); blobs up to this size are
    /// written with one request.
    pub chunk_bytes: usize,
    /// An unreferenced blob younger than this is kept by the collector
    /// (seconds): the window in which a freshly uploaded blob must be
    /// referenced by an appended event.
    pub gc_grace_s: u64,
}

impl Default for BlobConfig {
    /// 4 GiB blobs, 8 MiB parts, one hour of grace.
    fn default() -> Self {
        Self {
            max_blob_bytes: 4 << 30,
            chunk_bytes: 8 << 20,
            gc_grace_s: 3600,
        }
    }
}

fn check_media_type(media_type: &str) -> Result<()> {
    let ok = !media_type.is_empty()
        && media_type.len() <= MAX_MEDIA_TYPE_LEN
        && media_type
            .split_once('/')
            .is_some_and(|(a, b)| !a.is_empty() && !b.is_empty())
        && media_type.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(JournalError::InvalidName {
            what: "media type",
            value: media_type.chars().take(MAX_MEDIA_TYPE_LEN + 1).collect(),
            reason: "must be `type/subtype`, printable ASCII, at most 127 bytes",
        })
    }
}

/// A blob stored in the object store, as the collector lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    /// Its hash.
    pub hash: BlobHash,
    /// Its size.
    pub size: u64,
    /// When it was last written (ms since the Unix epoch).
    pub modified_ms: u64,
}

/// Content-addressed blob storage on any [`ObjectStore`].
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    objects: super::Objects,
    config: BlobConfig,
    /// Blobs this store has deleted since it was opened (shared by clones).
    deleted: Arc<std::sync::atomic::AtomicU64>,
}

impl fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStore")
            .field("store", &self.store.to_string())
            .field("config", &self.config)
            .finish()
    }
}

impl BlobStore {
    /// Blobs in `objects`.
    pub fn new(objects: super::Objects, config: BlobConfig) -> Self {
        Self {
            store: objects.store.clone(),
            objects,
            config,
            deleted: Arc::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &BlobConfig {
        &self.config
    }

    /// Stores the bytes of `body` as they arrive and returns their
    /// reference. At most one part is buffered; the hash is computed on
    /// the way. A stream error or a body past
    /// [`BlobConfig::max_blob_bytes`] aborts the upload.
    pub async fn put_stream<S, B, E>(&self, media_type: &str, body: S) -> Result<BlobRef>
    where
        S: Stream<Item = std::result::Result<B, E>> + Send,
        B: Into<Bytes>,
        E: fmt::Display,
    {
        check_media_type(media_type)?;
        let chunk = self.config.chunk_bytes.max(1);
        let tmp = Path::from(format!("blobs/tmp/{:032x}", rand::random::<u128>()));
        let mut body = std::pin::pin!(body);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut first = Vec::new();
        let mut upload: Option<WriteMultipart> = None;
        let too_large = || JournalError::BlobTooLarge {
            limit: self.config.max_blob_bytes,
            media_type: media_type.to_owned(),
        };
        let failure = loop {
            let part: Bytes = match body.next().await {
                None => break None,
                Some(Err(e)) => {
                    break Some(JournalError::BlobUpload {
                        media_type: media_type.to_owned(),
                        received: size,
                        reason: e.to_string(),
                    });
                }
                Some(Ok(b)) => b.into(),
            };
            size += part.len() as u64;
            if size > self.config.max_blob_bytes {
                break Some(too_large());
            }
            hasher.update(&part);
            match &mut upload {
                Some(w) => {
                    if let Err(e) = w.wait_for_capacity(UPLOAD_CONCURRENCY).await {
                        break Some(store_err("uploading a blob")(e));
                    }
                    w.put(part);
                }
                None => {
                    first.extend_from_slice(&part);
                    if first.len() >= chunk {
                        let started = match self.store.put_multipart(&tmp).await {
                            Ok(u) => u,
                            Err(e) => break Some(store_err("starting a blob upload")(e)),
                        };
                        let mut w = WriteMultipart::new_with_chunk_size(started, chunk);
                        w.put(Bytes::from(std::mem::take(&mut first)));
                        upload = Some(w);
                    }
                }
            }
        };
        if let Some(err) = failure {
            if let Some(w) = upload {
                let _ = w.abort().await;
            }
            return Err(err);
        }
        match upload {
            Some(w) => {
                w.finish()
                    .await
                    .map_err(store_err("finishing a blob upload"))?;
            }
            None => {
                self.store
                    .put(&tmp, PutPayload::from(first))
                    .await
                    .map_err(store_err("writing a blob"))?;
            }
        }
        let hash = BlobHash(hasher.finalize().into());
        // Same bytes, same name: replacing an existing copy is harmless and
        // refreshes its age for the collector.
        let path = hash.object_path();
        self.store
            .rename(&tmp, &path)
            .await
            .map_err(store_err("publishing a blob"))?;
        self.objects.sync(&path).await?;
        metrics::counter!("troupe_blob_bytes_written_total").increment(size);
        Ok(BlobRef {
            hash,
            size,
            media_type: media_type.to_owned(),
        })
    }

    /// Stores bytes already in memory.
    pub async fn put(&self, media_type: &str, bytes: impl Into<Bytes>) -> Result<BlobRef> {
        let bytes: Bytes = bytes.into();
        let chunk = self.config.chunk_bytes.max(1);
        let parts: Vec<std::result::Result<Bytes, std::convert::Infallible>> = (0..bytes.len())
            .step_by(chunk)
            .map(|at| Ok(bytes.slice(at..(at + chunk).min(bytes.len()))))
            .collect();
        self.put_stream(media_type, futures::stream::iter(parts))
            .await
    }

    /// Streams the blob's bytes in parts of [`BlobConfig::chunk_bytes`]
    /// (two ranged reads in flight). The stream ends with
    /// [`JournalError::BlobCorrupt`] if the bytes do not match the hash; a
    /// blob that is not there is [`JournalError::BlobMissing`], one of
    /// another size [`JournalError::BlobCorrupt`] at once.
    pub async fn get_stream(&self, blob: &BlobRef) -> Result<BoxStream<'static, Result<Bytes>>> {
        let path = blob.hash.object_path();
        let stored = match self.store.head(&path).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(JournalError::BlobMissing {
                    hash: blob.hash.to_string(),
                });
            }
            Err(e) => return Err(store_err("reading a blob")(e)),
        };
        if stored != blob.size {
            return Err(JournalError::BlobCorrupt {
                hash: blob.hash.to_string(),
                reason: format!("{stored} bytes stored, {} expected", blob.size),
            });
        }
        let chunk = self.config.chunk_bytes.max(1) as u64;
        let store = self.store.clone();
        let ranges: Vec<std::ops::Range<u64>> = (0..blob.size)
            .step_by(chunk as usize)
            .map(|at| at..(at + chunk).min(blob.size))
            .collect();
        let parts = futures::stream::iter(ranges)
            .map(move |r| {
                let (store, path) = (store.clone(), path.clone());
                async move { store.get_range(&path, r).await }
            })
            .buffered(2);
        Ok(Box::pin(Verifying {
            inner: Box::pin(parts),
            hasher: Sha256::new(),
            seen: 0,
            expected: blob.clone(),
            done: false,
        }))
    }

    /// Reads a whole blob into memory, refusing one larger than `max_bytes`.
    pub async fn get_bytes(&self, blob: &BlobRef, max_bytes: u64) -> Result<Vec<u8>> {
        if blob.size > max_bytes {
            return Err(JournalError::BlobTooLarge {
                limit: max_bytes,
                media_type: blob.media_type.clone(),
            });
        }
        let mut s = self.get_stream(blob).await?;
        let mut out = Vec::with_capacity(blob.size as usize);
        while let Some(part) = s.next().await {
            out.extend_from_slice(&part?);
        }
        Ok(out)
    }

    /// Size of the stored blob, or None if it is not stored.
    pub async fn size_of(&self, hash: &BlobHash) -> Result<Option<u64>> {
        match self.store.head(&hash.object_path()).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err("looking up a blob")(e)),
        }
    }

    /// The stored blob with this hash, if any.
    pub async fn stored(&self, hash: &BlobHash) -> Result<Option<StoredBlob>> {
        match self.store.head(&hash.object_path()).await {
            Ok(meta) => Ok(Some(StoredBlob {
                hash: *hash,
                size: meta.size,
                modified_ms: meta.last_modified.timestamp_millis().max(0) as u64,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(store_err("looking up a blob")(e)),
        }
    }

    /// Every stored blob.
    pub async fn list(&self) -> Result<Vec<StoredBlob>> {
        let prefix = Path::from("blobs/sha256");
        let mut out = Vec::new();
        let mut listing = self.store.list(Some(&prefix));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(store_err("listing blobs"))?;
            let Some(name) = meta.location.filename() else {
                continue;
            };
            let Ok(hash) = format!("sha256:{name}").parse::<BlobHash>() else {
                continue; // not a blob (an upload's staging file)
            };
            out.push(StoredBlob {
                hash,
                size: meta.size,
                modified_ms: meta.last_modified.timestamp_millis().max(0) as u64,
            });
        }
        Ok(out)
    }

    /// Uploads abandoned before they were published, older than `before_ms`.
    pub(crate) async fn remove_stale_uploads(&self, before_ms: u64) -> Result<u64> {
        let prefix = Path::from("blobs/tmp");
        let mut listing = self.store.list(Some(&prefix));
        let mut stale = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(store_err("listing abandoned uploads"))?;
            if (meta.last_modified.timestamp_millis().max(0) as u64) < before_ms {
                stale.push(meta.location);
            }
        }
        drop(listing);
        for p in &stale {
            self.store
                .delete(p)
                .await
                .map_err(store_err("removing an abandoned upload"))?;
        }
        Ok(stale.len() as u64)
    }

    pub(crate) async fn delete(&self, hash: &BlobHash) -> Result<()> {
        let r = match self.store.delete(&hash.object_path()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err("deleting a blob")(e)),
        };
        self.deleted
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        r
    }

    /// How many blobs this store (this process) has deleted since it was
    /// opened: while it stays the same, no blob looked up before has gone.
    pub fn deletions(&self) -> u64 {
        self.deleted.load(std::sync::atomic::Ordering::Acquire)
    }
}

struct Verifying {
    inner: BoxStream<'static, object_store::Result<Bytes>>,
    hasher: Sha256,
    seen: u64,
    expected: BlobRef,
    done: bool,
}

impl Verifying {
    fn corrupt(&mut self, reason: String) -> Poll<Option<Result<Bytes>>> {
        self.done = true;
        Poll::Ready(Some(Err(JournalError::BlobCorrupt {
            hash: self.expected.hash.to_string(),
            reason,
        })))
    }
}

impl Stream for Verifying {
    type Item = Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(b))) => {
                self.seen += b.len() as u64;
                if self.seen > self.expected.size {
                    let (seen, size) = (self.seen, self.expected.size);
                    return self.corrupt(format!(
                        "more than the {size} bytes expected ({seen} so far)"
                    ));
                }
                self.hasher.update(&b);
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                Poll::Ready(Some(Err(store_err("reading a blob")(e))))
            }
            Poll::Ready(None) => {
                if self.seen != self.expected.size {
                    let (seen, size) = (self.seen, self.expected.size);
                    return self.corrupt(format!("{seen} bytes stored, {size} expected"));
                }
                let got: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
                if got != self.expected.hash.0 {
                    let got = BlobHash(got);
                    return self.corrupt(format!("stored bytes hash to {got}"));
                }
                self.done = true;
                Poll::Ready(None)
            }
        }
    }
}

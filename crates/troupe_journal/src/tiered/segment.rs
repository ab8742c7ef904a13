//! Cold segment files and the per-id manifest that lists them.
//!
//! A segment holds a contiguous range of one id's events, exactly as they
//! were stored in RocksDB (each envelope keeps its own CRC-32):
//!
//! ```text
//! magic "TRPSEG01" (8) | header len u32 | header (rmp-serde SegmentHeader)
//! body len u64 | body: zstd( (envelope len u32 | envelope)* )
//! crc32 u32 of everything before it
//! ```
//!
//! Integers are little-endian. The checksum is checked before any length
//! is trusted, the decompressed size is bounded by the header (itself
//! bounded by [`MAX_SEGMENT_RAW_BYTES`]), and the header's id, range and
//! count must match the manifest entry that points at the segment.

use serde::{Deserialize, Serialize};

use crate::event::{PersistedEvent, TypeNameCache};
use crate::id::PersistenceId;

const MAGIC: &[u8; 8] = b"TRPSEG01";
/// Largest uncompressed body a segment may declare (256 MiB).
pub const MAX_SEGMENT_RAW_BYTES: u64 = 256 << 20;
const MAX_HEADER_LEN: u32 = 64 << 10;

/// The header written at the start of every segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentHeader {
    /// Persistence id whose events the segment holds.
    pub id: String,
    /// First sequence number.
    pub from: u64,
    /// Last sequence number.
    pub to: u64,
    /// Number of events (`to - from + 1`).
    pub events: u64,
    /// Uncompressed body length.
    pub raw_bytes: u64,
    /// When the segment was written (ms since the Unix epoch).
    pub created_ms: u64,
}

/// One segment as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    /// First sequence number.
    pub from: u64,
    /// Last sequence number.
    pub to: u64,
    /// Object path in the cold store.
    pub object: String,
    /// Segment length in bytes.
    pub bytes: u64,
    /// Sum of the envelope lengths it holds (uncompressed).
    pub raw_bytes: u64,
    /// CRC-32 of the whole segment (including its trailing checksum).
    pub crc: u32,
    /// When the segment was written (ms since the Unix epoch).
    pub created_ms: u64,
}

impl SegmentEntry {
    /// Events in the segment.
    pub fn events(&self) -> u64 {
        self.to - self.from + 1
    }
}

/// Which of an id's events live in the cold tier, stored in RocksDB next
/// to the id's metadata and written atomically with the deletion of the
/// archived events from the warm tier.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version (1).
    pub version: u8,
    /// Events up to here were deleted by the application
    /// ([`crate::Journal::delete_events_to`]); archived events above it
    /// are still part of the stream.
    pub deleted_to: u64,
    /// Events up to here have left the warm tier (archived or deleted).
    pub archived_to: u64,
    /// Segments in sequence order, contiguous, none wholly at or below
    /// `deleted_to`.
    pub segments: Vec<SegmentEntry>,
}

impl Manifest {
    pub(crate) fn decode(id: &PersistenceId, bytes: &[u8]) -> crate::Result<Self> {
        let m: Manifest =
            rmp_serde::from_slice(bytes).map_err(|e| crate::JournalError::CorruptMetadata {
                key: format!("cold manifest of `{id}`"),
                reason: e.to_string(),
            })?;
        let bad = |reason: String| crate::JournalError::CorruptMetadata {
            key: format!("cold manifest of `{id}`"),
            reason,
        };
        if m.version != 1 {
            return Err(bad(format!("unknown manifest version {}", m.version)));
        }
        if m.deleted_to > m.archived_to || m.archived_to == u64::MAX {
            return Err(bad(format!(
                "deleted to {} but archived to {}",
                m.deleted_to, m.archived_to
            )));
        }
        let mut prev: Option<u64> = None;
        for seg in &m.segments {
            let contiguous = prev.is_none_or(|p| seg.from == p + 1);
            if seg.from == 0 || seg.to < seg.from || seg.to > m.archived_to || !contiguous {
                return Err(bad(format!(
                    "segment #{}..#{} out of order (archived to {})",
                    seg.from, seg.to, m.archived_to
                )));
            }
            prev = Some(seg.to);
        }
        let covered = m.segments.last().map_or(m.deleted_to, |s| s.to);
        if covered != m.archived_to {
            return Err(bad(format!(
                "segments end at #{covered}, archived to #{}",
                m.archived_to
            )));
        }
        if let Some(first) = m.segments.first()
            && first.from > m.deleted_to + 1
        {
            return Err(bad(format!(
                "no segment holds #{} (the first starts at #{})",
                m.deleted_to + 1,
                first.from
            )));
        }
        Ok(m)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("manifests always encode")
    }

    /// Events held in cold segments (above the deleted-to mark).
    pub fn cold_events(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.to.saturating_sub(s.from.max(self.deleted_to + 1)) + 1)
            .sum()
    }
}

/// Builds a segment from envelopes with consecutive sequences. Returns the
/// bytes and the sum of the envelope lengths.
pub(crate) fn encode(
    id: &PersistenceId,
    first_seq: u64,
    envelopes: &[Vec<u8>],
    zstd_level: i32,
    created_ms: u64,
) -> std::io::Result<(Vec<u8>, u64)> {
    let raw_len: usize = envelopes.iter().map(|e| 4 + e.len()).sum();
    let mut raw = Vec::with_capacity(raw_len);
    for env in envelopes {
        raw.extend_from_slice(&(env.len() as u32).to_le_bytes());
        raw.extend_from_slice(env);
    }
    let mut body = vec![0u8; zstd_safe::compress_bound(raw.len())];
    let n = zstd_safe::compress(&mut body[..], &raw, zstd_level)
        .map_err(|code| std::io::Error::other(zstd_safe::get_error_name(code)))?;
    body.truncate(n);
    let header = SegmentHeader {
        id: id.as_str().to_owned(),
        from: first_seq,
        to: first_seq + envelopes.len() as u64 - 1,
        events: envelopes.len() as u64,
        raw_bytes: raw.len() as u64,
        created_ms,
    };
    let header = rmp_serde::to_vec_named(&header).expect("headers always encode");
    let mut out = Vec::with_capacity(8 + 4 + header.len() + 8 + body.len() + 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let payload: u64 = envelopes.iter().map(|e| e.len() as u64).sum();
    Ok((out, payload))
}

/// CRC-32 of a whole segment, as the manifest records it.
pub(crate) fn crc_of(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Decodes a segment fetched for `entry`, checking it end to end. The
/// error is the reason only; the caller names the id, range and object.
#[cfg(test)]
pub(crate) fn decode(
    id: &PersistenceId,
    entry: &SegmentEntry,
    bytes: &[u8],
) -> std::result::Result<Vec<PersistedEvent>, String> {
    decode_from(id, entry, bytes, entry.from)
}

/// Like [`decode`], returning only the events from `from_seq` on (the
/// checksum still covers the whole segment; earlier envelopes are skipped
/// without being decoded).
pub(crate) fn decode_from(
    id: &PersistenceId,
    entry: &SegmentEntry,
    bytes: &[u8],
    from_seq: u64,
) -> std::result::Result<Vec<PersistedEvent>, String> {
    if bytes.len() as u64 != entry.bytes {
        return Err(format!(
            "segment is {} bytes, the manifest recorded {}",
            bytes.len(),
            entry.bytes
        ));
    }
    if bytes.len() < 8 + 4 + 8 + 4 {
        return Err(format!("segment is only {} bytes", bytes.len()));
    }
    let (content, crc_bytes) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes"));
    let computed = crc32fast::hash(content);
    if stored != computed {
        return Err(format!(
            "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    if crc_of(bytes) != entry.crc {
        return Err("segment differs from the one the manifest recorded".into());
    }
    if &content[..8] != MAGIC {
        return Err("not a Troupe segment (bad magic)".into());
    }
    let header_len = u32::from_le_bytes(content[8..12].try_into().expect("4 bytes"));
    if header_len > MAX_HEADER_LEN || 12 + header_len as usize + 8 > content.len() {
        return Err(format!("header length {header_len} out of bounds"));
    }
    let header_end = 12 + header_len as usize;
    let header: SegmentHeader = rmp_serde::from_slice(&content[12..header_end])
        .map_err(|e| format!("unreadable header: {e}"))?;
    if header.id != id.as_str() || header.from != entry.from || header.to != entry.to {
        return Err(format!(
            "header says `{}` #{}..#{}, expected `{id}` #{}..#{}",
            header.id, header.from, header.to, entry.from, entry.to
        ));
    }
    if header.events != entry.events() || header.raw_bytes > MAX_SEGMENT_RAW_BYTES {
        return Err(format!(
            "header declares {} events and {} bytes",
            header.events, header.raw_bytes
        ));
    }
    let body_len = u64::from_le_bytes(
        content[header_end..header_end + 8]
            .try_into()
            .expect("8 bytes"),
    );
    let body = &content[header_end + 8..];
    if body_len != body.len() as u64 {
        return Err(format!(
            "body length {body_len} does not match the {} bytes present",
            body.len()
        ));
    }
    let mut raw = vec![0u8; header.raw_bytes as usize];
    let n = zstd_safe::decompress(&mut raw[..], body)
        .map_err(|code| format!("cannot decompress: {}", zstd_safe::get_error_name(code)))?;
    raw.truncate(n);
    if raw.len() as u64 != header.raw_bytes {
        return Err(format!(
            "body decompressed to {} bytes, header declares {}",
            raw.len(),
            header.raw_bytes
        ));
    }
    let mut events = Vec::with_capacity(header.events as usize);
    let mut types = TypeNameCache::default();
    let mut at = 0usize;
    let mut seq = entry.from;
    let mut count = 0u64;
    while at < raw.len() {
        if at + 4 > raw.len() {
            return Err(format!("truncated entry at body offset {at}"));
        }
        let len = u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes")) as usize;
        at += 4;
        if at + len > raw.len() {
            return Err(format!("entry #{seq} overruns the body"));
        }
        if seq >= from_seq {
            let ev = PersistedEvent::from_envelope(id, seq, &raw[at..at + len], &mut types)
                .map_err(|e| e.to_string())?;
            events.push(ev);
        }
        at += len;
        seq += 1;
        count += 1;
    }
    if count != header.events {
        return Err(format!(
            "holds {count} events, header declares {}",
            header.events
        ));
    }
    Ok(events)
}

/// The object path of a segment: `segments/<kind>/<key>/<from>-<to>.seg`.
/// Keys that are not plain (`[A-Za-z0-9._-]`, at most 100 bytes, not
/// starting with a dot) are replaced by their SHA-256 (`h-...`); the header
/// inside still names the full id.
pub(crate) fn object_path(id: &PersistenceId, from: u64, to: u64) -> String {
    format!(
        "segments/{}/{}/{from:020}-{to:020}.seg",
        path_part(id.kind()),
        path_part(id.key())
    )
}

fn path_part(s: &str) -> String {
    let plain = !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        format!("k-{s}")
    } else {
        use sha2::Digest;
        format!("h-{}", hex::encode(sha2::Sha256::digest(s.as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;

    fn envelopes(n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let mut b = Vec::new();
                NewEvent::raw("t.E", 1, format!("event {i}").into_bytes())
                    .unwrap()
                    .encode_envelope(&mut b);
                b
            })
            .collect()
    }

    fn entry(bytes: &[u8], from: u64, to: u64) -> SegmentEntry {
        SegmentEntry {
            from,
            to,
            object: "x".into(),
            bytes: bytes.len() as u64,
            raw_bytes: 0,
            crc: crc_of(bytes),
            created_ms: 0,
        }
    }

    #[test]
    fn a_segment_round_trips_and_every_flipped_byte_is_caught() {
        let id = PersistenceId::parse("chat/a").unwrap();
        let (bytes, _) = encode(&id, 5, &envelopes(20), 3, 1).unwrap();
        let e = entry(&bytes, 5, 24);
        let events = decode(&id, &e, &bytes).unwrap();
        assert_eq!(events.len(), 20);
        assert_eq!(events[0].seq, 5);
        assert_eq!(events[19].payload, b"event 19");
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(decode(&id, &e, &bad).is_err(), "flip at {i} undetected");
        }
        assert!(decode(&id, &e, &bytes[..bytes.len() - 1]).is_err());
        let other = PersistenceId::parse("chat/b").unwrap();
        assert!(decode(&other, &e, &bytes).unwrap_err().contains("chat/a"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 512, failure_persistence: None, ..Default::default() })]

        /// Arbitrary bytes, and valid segments with arbitrary damage, decode
        /// to a typed error or to the right events, never a panic; the
        /// same for manifests and single envelopes.
        #[test]
        fn damaged_segments_manifests_and_envelopes_are_errors_not_panics(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2_048),
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), 1u8..=255), 0..8),
            cut in proptest::prelude::any::<usize>(),
        ) {
            let id = PersistenceId::parse("chat/a").unwrap();
            let (bytes, _) = encode(&id, 1, &envelopes(12), 3, 1).unwrap();
            let mut bad = bytes.clone();
            for (at, x) in &flips {
                let i = at % bad.len();
                bad[i] ^= x;
            }
            bad.truncate(bad.len() - cut % (bad.len() / 4 + 1));
            let e = entry(&bytes, 1, 12);
            match decode(&id, &e, &bad) {
                Ok(events) => {
                    proptest::prop_assert_eq!(&bad, &bytes);
                    proptest::prop_assert_eq!(events.len(), 12);
                }
                Err(reason) => proptest::prop_assert!(!reason.is_empty()),
            }
            let _ = decode(&id, &entry(&junk, 1, 12), &junk);
            let _ = decode_from(&id, &e, &bad, 7);
            let _ = Manifest::decode(&id, &junk);
            let mut types = crate::event::TypeNameCache::default();
            let _ = PersistedEvent::from_envelope(&id, 1, &junk, &mut types);
            let _ = crate::event::Snapshot::from_envelope(&id, &junk);
        }
    }

    #[test]
    fn odd_keys_get_hashed_paths() {
        let plain = PersistenceId::parse("session/abc-1").unwrap();
        assert_eq!(
            object_path(&plain, 1, 2),
            "segments/k-session/k-abc-1/00000000000000000001-00000000000000000002.seg"
        );
        let odd = PersistenceId::parse("session/../x y").unwrap();
        assert!(object_path(&odd, 1, 2).starts_with("segments/k-session/h-"));
    }
}

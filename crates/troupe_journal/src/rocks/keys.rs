//! Key layouts of the column families (public for tools and baselines).
//!
//! | column family | key | value |
//! |---|---|---|
//! | `events` | id, `0x00`, seq (u64 big-endian) | event envelope |
//! | `snapshots` | id | snapshot envelope |
//! | `tags` | tag, `0x00`, offset (u64 big-endian) | seq (u64 big-endian), id |
//! | `meta` | `i`, id | deleted-to seq (u64 big-endian) |
//! | `meta` | `\x01next_offset` | next tag offset (u64 big-endian) |
//! | `meta` | `c`, id | cold manifest of the id (tiered storage; rmp-serde) |
//! | `meta` | `r`, blob hash (32 bytes), id, `0x00`, seq | empty: event `seq` of `id` refers to the blob |
//!
//! Ids and tags contain no NUL byte, so `id 0x00` is a prefix of exactly one
//! id's keys and big-endian sequence numbers sort numerically: one id's
//! events are one ordered range.

use crate::id::PersistenceId;

/// Column family of event envelopes.
pub const CF_EVENTS: &str = "events";
/// Column family of the latest snapshot per id.
pub const CF_SNAPSHOTS: &str = "snapshots";
/// Column family of the tag index.
pub const CF_TAGS: &str = "tags";
/// Column family of per-id and global metadata.
pub const CF_META: &str = "meta";

/// Metadata key of the next global tag offset.
pub const META_NEXT_OFFSET: &[u8] = b"\x01next_offset";
/// Prefix of per-id metadata keys.
pub const META_ID_PREFIX: u8 = b'i';

/// Prefix of cold manifest keys.
pub const META_COLD_PREFIX: u8 = b'c';
/// Prefix of blob reference keys.
pub const META_BLOB_REF_PREFIX: u8 = b'r';

/// The cold manifest key of `id`.
pub fn cold_manifest_key(id: &PersistenceId) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.as_str().len() + 1);
    k.push(META_COLD_PREFIX);
    k.extend_from_slice(id.as_str().as_bytes());
    k
}

/// `r hash id 0x00 seq` into `out`: event `seq` of `id` refers to blob `hash`.
pub fn blob_ref_key(out: &mut Vec<u8>, hash: &[u8; 32], id: &PersistenceId, seq: u64) {
    out.clear();
    out.push(META_BLOB_REF_PREFIX);
    out.extend_from_slice(hash);
    out.extend_from_slice(id.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(&seq.to_be_bytes());
}

/// The prefix of every reference key of blob `hash`.
pub fn blob_ref_prefix(hash: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(META_BLOB_REF_PREFIX);
    k.extend_from_slice(hash);
    k
}

/// `name 0x00 n` into `out`.
pub fn seq_key(out: &mut Vec<u8>, name: &str, n: u64) {
    out.clear();
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.extend_from_slice(&n.to_be_bytes());
}

/// The key of event `seq` of `id`.
pub fn event_key(id: &PersistenceId, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.as_str().len() + 9);
    seq_key(&mut k, id.as_str(), seq);
    k
}

/// First key after every `name 0x00 ...` key.
pub fn upper_bound(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1);
    k.extend_from_slice(name.as_bytes());
    k.push(1);
    k
}

/// Splits `name 0x00 n`; None if the key does not have that shape.
pub fn split_seq_key(key: &[u8]) -> Option<(&[u8], u64)> {
    if key.len() < 10 || key[key.len() - 9] != 0 {
        return None;
    }
    let (name, rest) = key.split_at(key.len() - 9);
    let mut n = [0u8; 8];
    n.copy_from_slice(&rest[1..]);
    Some((name, u64::from_be_bytes(n)))
}

/// The metadata key of `id`.
pub fn meta_id_key(id: &PersistenceId) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.as_str().len() + 1);
    k.push(META_ID_PREFIX);
    k.extend_from_slice(id.as_str().as_bytes());
    k
}

/// A tag index value: `seq` big-endian, then the id, into `out`.
pub fn tag_value(out: &mut Vec<u8>, id: &PersistenceId, seq: u64) {
    out.clear();
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(id.as_str().as_bytes());
}

/// Splits a tag index value into sequence and id bytes.
pub fn split_tag_value(v: &[u8]) -> Option<(u64, &[u8])> {
    if v.len() < 9 {
        return None;
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&v[..8]);
    Some((u64::from_be_bytes(n), &v[8..]))
}

/// Reads an 8-byte big-endian integer.
pub fn be_u64(v: &[u8]) -> Option<u64> {
    let arr: [u8; 8] = v.try_into().ok()?;
    Some(u64::from_be_bytes(arr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_id_sort_by_sequence_and_never_mix_with_a_longer_id() {
        let a = PersistenceId::parse("k/a").unwrap();
        let ab = PersistenceId::parse("k/ab").unwrap();
        let mut keys = [
            event_key(&ab, 1),
            event_key(&a, 256),
            event_key(&a, 2),
            event_key(&a, u64::MAX),
        ];
        keys.sort();
        assert_eq!(keys[0], event_key(&a, 2));
        assert_eq!(keys[1], event_key(&a, 256));
        assert_eq!(keys[2], event_key(&a, u64::MAX));
        assert!(keys[2] < upper_bound("k/a") && upper_bound("k/a") < keys[3]);
        assert_eq!(split_seq_key(&keys[1]), Some((&b"k/a"[..], 256)));
        assert_eq!(split_seq_key(b"short"), None);
    }
}

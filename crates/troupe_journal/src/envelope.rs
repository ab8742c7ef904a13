//! The on-disk envelope around every stored event and snapshot.
//!
//! Layout (little-endian integers), followed by a CRC-32 of everything before it:
//!
//! ```text
//! magic "TJ" (2) | format 1 (1) | kind (1: event, 2: snapshot)
//! [snapshot only: sequence u64]
//! schema version u32 | timestamp (ms since the Unix epoch) u64
//! event type: len u16 + UTF-8 | tags: count u16 + (len u16 + UTF-8)*
//! payload: len u32 + bytes (rmp-serde) | crc32 u32
//! ```
//!
//! The framing is a fixed binary layout rather than a serde format so that a
//! reader can check the checksum before trusting any length field, and so that
//! every way the bytes can be wrong maps to a precise [`EnvelopeError`].
//! Decoding never panics: every read is bounds-checked.

use crate::error::EnvelopeError;

const MAGIC: [u8; 2] = *b"TJ";
const FORMAT: u8 = 1;
const KIND_EVENT: u8 = 1;
const KIND_SNAPSHOT: u8 = 2;
/// magic + format + kind + version + timestamp + type len + tag count + payload len + crc
const MIN_LEN: usize = 2 + 1 + 1 + 4 + 8 + 2 + 2 + 4 + 4;

/// The decoded fields of an envelope, borrowing from the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeRef<'a> {
    /// Sequence number, for snapshots only.
    pub snapshot_seq: Option<u64>,
    /// Schema version of the payload.
    pub schema_version: u32,
    /// Milliseconds since the Unix epoch when the event was written.
    pub timestamp_ms: u64,
    /// Event (or snapshot) type name.
    pub event_type: &'a str,
    /// Tags.
    pub tags: Vec<&'a str>,
    /// Encoded payload.
    pub payload: &'a [u8],
}

/// Encodes an event envelope into `out` (cleared first).
pub fn encode_event(
    out: &mut Vec<u8>,
    schema_version: u32,
    timestamp_ms: u64,
    event_type: &str,
    tags: &[&str],
    payload: &[u8],
) {
    encode(
        out,
        None,
        schema_version,
        timestamp_ms,
        event_type,
        tags,
        payload,
    )
}

/// Encodes a snapshot envelope into `out` (cleared first).
pub fn encode_snapshot(
    out: &mut Vec<u8>,
    seq: u64,
    schema_version: u32,
    timestamp_ms: u64,
    snapshot_type: &str,
    payload: &[u8],
) {
    encode(
        out,
        Some(seq),
        schema_version,
        timestamp_ms,
        snapshot_type,
        &[],
        payload,
    )
}

fn encode(
    out: &mut Vec<u8>,
    snapshot_seq: Option<u64>,
    schema_version: u32,
    timestamp_ms: u64,
    event_type: &str,
    tags: &[&str],
    payload: &[u8],
) {
    out.clear();
    out.reserve(MIN_LEN + 8 + event_type.len() + payload.len() + tags.len() * 16);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT);
    match snapshot_seq {
        None => out.push(KIND_EVENT),
        Some(seq) => {
            out.push(KIND_SNAPSHOT);
            out.extend_from_slice(&seq.to_le_bytes());
        }
    }
    out.extend_from_slice(&schema_version.to_le_bytes());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    // Lengths were bounded when the names and payload were validated
    // (`crate::event::MAX_PAYLOAD_LEN`, `MAX_TAG_LEN`, type names <= 255).
    out.extend_from_slice(&(event_type.len() as u16).to_le_bytes());
    out.extend_from_slice(event_type.as_bytes());
    out.extend_from_slice(&(tags.len() as u16).to_le_bytes());
    for tag in tags {
        out.extend_from_slice(&(tag.len() as u16).to_le_bytes());
        out.extend_from_slice(tag.as_bytes());
    }
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(out);
    out.extend_from_slice(&crc.to_le_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], EnvelopeError> {
        let available = self.buf.len() - self.pos;
        if n > available {
            return Err(EnvelopeError::Truncated {
                field,
                offset: self.pos,
                needed: n,
                available,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], EnvelopeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, EnvelopeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, EnvelopeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, EnvelopeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn str(&mut self, len: usize, field: &'static str) -> Result<&'a str, EnvelopeError> {
        std::str::from_utf8(self.take(len, field)?)
            .map_err(|_| EnvelopeError::InvalidUtf8 { field })
    }
}

/// Decodes and verifies an envelope.
pub fn decode(bytes: &[u8]) -> Result<EnvelopeRef<'_>, EnvelopeError> {
    if bytes.len() < MIN_LEN {
        return Err(EnvelopeError::TooShort {
            len: bytes.len(),
            min: MIN_LEN,
        });
    }
    if bytes[..2] != MAGIC {
        return Err(EnvelopeError::BadMagic {
            found: u16::from_be_bytes([bytes[0], bytes[1]]),
            expected: u16::from_be_bytes(MAGIC),
        });
    }
    if bytes[2] != FORMAT {
        return Err(EnvelopeError::UnknownFormat(bytes[2]));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(EnvelopeError::ChecksumMismatch { stored, computed });
    }
    let mut r = Reader { buf: body, pos: 3 };
    let kind = r.array::<1>("kind")?[0];
    let snapshot_seq = match kind {
        KIND_EVENT => None,
        KIND_SNAPSHOT => Some(r.u64("snapshot sequence")?),
        other => {
            return Err(EnvelopeError::WrongKind {
                expected: "event or snapshot",
                found: other,
            });
        }
    };
    let schema_version = r.u32("schema version")?;
    let timestamp_ms = r.u64("timestamp")?;
    let type_len = r.u16("event type length")? as usize;
    let event_type = r.str(type_len, "event type")?;
    let tag_count = r.u16("tag count")? as usize;
    let mut tags = Vec::new();
    for _ in 0..tag_count {
        let len = r.u16("tag length")? as usize;
        tags.push(r.str(len, "tag")?);
    }
    let payload_len = r.u32("payload length")? as usize;
    let payload = r.take(payload_len, "payload")?;
    if r.pos != body.len() {
        return Err(EnvelopeError::TrailingBytes(body.len() - r.pos));
    }
    Ok(EnvelopeRef {
        snapshot_seq,
        schema_version,
        timestamp_ms,
        event_type,
        tags,
        payload,
    })
}

/// Decodes an envelope that must hold an event.
pub fn decode_event(bytes: &[u8]) -> Result<EnvelopeRef<'_>, EnvelopeError> {
    let env = decode(bytes)?;
    if env.snapshot_seq.is_some() {
        return Err(EnvelopeError::WrongKind {
            expected: "event",
            found: KIND_SNAPSHOT,
        });
    }
    Ok(env)
}

/// Decodes an envelope that must hold a snapshot.
pub fn decode_snapshot(bytes: &[u8]) -> Result<(u64, EnvelopeRef<'_>), EnvelopeError> {
    let env = decode(bytes)?;
    match env.snapshot_seq {
        Some(seq) => Ok((seq, env)),
        None => Err(EnvelopeError::WrongKind {
            expected: "snapshot",
            found: KIND_EVENT,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn event_round_trips() {
        let mut buf = Vec::new();
        encode_event(&mut buf, 3, 42, "counter.Added", &["a", "bb"], b"payload");
        let env = decode_event(&buf).unwrap();
        assert_eq!(env.schema_version, 3);
        assert_eq!(env.timestamp_ms, 42);
        assert_eq!(env.event_type, "counter.Added");
        assert_eq!(env.tags, vec!["a", "bb"]);
        assert_eq!(env.payload, b"payload");
        assert!(decode_snapshot(&buf).is_err());
    }

    #[test]
    fn snapshot_round_trips() {
        let mut buf = Vec::new();
        encode_snapshot(&mut buf, 77, 1, 9, "counter.State", b"s");
        let (seq, env) = decode_snapshot(&buf).unwrap();
        assert_eq!((seq, env.payload), (77, &b"s"[..]));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let mut buf = Vec::new();
        encode_event(&mut buf, 1, 1, "t", &["x"], &[7; 40]);
        for len in 0..buf.len() {
            assert!(
                decode(&buf[..len]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        encode_event(&mut buf, 1, 1, "t", &["x"], &[7; 40]);
        for i in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(decode(&b).is_err(), "flip of bit {i} went unnoticed");
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn garbage_with_a_valid_header_and_checksum_never_panics(body in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut b = b"TJ\x01".to_vec();
            b.extend_from_slice(&body);
            let crc = crc32fast::hash(&b);
            b.extend_from_slice(&crc.to_le_bytes());
            let _ = decode(&b);
        }
    }
}

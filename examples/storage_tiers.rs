//! A support agent's long memory, in tiers: a month of conversation where
//! customers send photos and voice notes. The photos and recordings go to
//! the blob store and the events carry references; events older than a
//! week move to compressed cold segments; the latest turns stay hot in
//! memory. Replaying the conversation reads all three tiers in order,
//! and deleting old history lets the blob collector free the media only
//! that history referred to.
//!
//! Run with `cargo run --release --example storage_tiers`.
//! `--quick` writes fewer days; `--data-dir DIR` chooses where.

use std::path::PathBuf;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use troupe::journal::{ArchiveReport, HotLimits, tiered::KindTierStats};
use troupe::prelude::*;

// ANCHOR: events
/// What the conversation journals. Media travels as a [`BlobRef`]: hash,
/// size and media type, never the bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
enum ChatEvent {
    Said {
        who: String,
        text: String,
    },
    SentMedia {
        who: String,
        media: BlobRef,
        caption: String,
    },
}

impl Schema for ChatEvent {
    const TYPE_NAME: &'static str = "chat.Event";
}
// ANCHOR_END: events

const DAY_MS: u64 = 86_400_000;

fn check(ok: bool, what: &str) -> troupe::Result<()> {
    if ok {
        println!("  ok: {what}");
        Ok(())
    } else {
        Err(format!("FAILED: {what}").into())
    }
}

/// Fake media: `n` bytes of a repeating pattern, handed over in parts as
/// an upload would arrive.
fn media(n: usize, seed: u8) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    let parts: Vec<_> = (0..n)
        .step_by(64 << 10)
        .map(move |at| {
            let len = (64 << 10).min(n - at);
            Ok((0..len)
                .map(|i| ((at + i) as u8).wrapping_mul(seed))
                .collect())
        })
        .collect();
    futures::stream::iter(parts)
}

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let data_dir = args
        .iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("troupe-data/storage-tiers"));
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }
    let days = if quick { 10 } else { 30 };

    // ANCHOR: open
    let mut tiers = TierConfig::default();
    // The latest 64 events of every chat stay in memory for resumes.
    tiers.hot.kinds.insert(
        "chat".into(),
        HotLimits {
            max_events: 64,
            max_bytes: 256 << 10,
        },
    );
    // Older than a week: cold.
    tiers.archive.archive_after_s = Some(7 * 86_400);
    tiers.archive.min_segment_events = 16;
    tiers.blobs.max_blob_bytes = 64 << 20;
    tiers.blobs.gc_grace_s = 0; // collect as soon as nothing refers to a blob
    let journal = JournalConfig {
        data_dir: data_dir.join("journal"),
        durability: Durability::Fsync,
        tiers: Some(tiers),
    }
    .open_tiered()?
    .expect("tiers are configured");
    // ANCHOR_END: open
    println!(
        "journal at {}, cold segments and blobs in {}",
        data_dir.join("journal").display(),
        data_dir.join("cold").display()
    );

    // ANCHOR: write
    let chat = PersistenceId::parse("chat/alice")?;
    let now = troupe::journal::now_ms();
    let start = now - days * DAY_MS;
    let blobs = journal.blobs().clone();
    let mut seq = 0;
    let mut first_photo = None;
    for day in 0..days {
        let at = start + day * DAY_MS;
        let mut events = Vec::new();
        for turn in 0..12 {
            let (who, text) = if turn % 2 == 0 {
                (
                    "alice",
                    format!(
                        "Day {day}: my order still shows 'processing', can you check? ({turn})"
                    ),
                )
            } else {
                (
                    "agent",
                    format!("I checked order A-{day:04}: it left the warehouse today ({turn})"),
                )
            };
            let mut e = NewEvent::new(&ChatEvent::Said {
                who: who.into(),
                text,
            })?;
            e.timestamp_ms = at + turn * 60_000;
            events.push(e);
        }
        if day % 3 == 0 {
            // A photo of the parcel, streamed into the blob store.
            let photo = blobs
                .put_stream("image/jpeg", media(300_000 + day as usize, 7))
                .await?;
            first_photo.get_or_insert_with(|| photo.clone());
            let sent = ChatEvent::SentMedia {
                who: "alice".into(),
                media: photo.clone(),
                caption: format!("the box on day {day}"),
            };
            // The event declares its blob: the blob is kept while the event is.
            let mut e = NewEvent::new(&sent)?.with_blob(&photo)?;
            e.timestamp_ms = at + 13 * 60_000;
            events.push(e);
        }
        let n = events.len() as u64;
        journal.append(&chat, seq, events).await?;
        seq += n;
    }
    // ANCHOR_END: write
    println!("wrote {seq} events over {days} days");

    // ANCHOR: archive
    let report: ArchiveReport = journal.archive_all(now, |_, _| {}).await?;
    println!(
        "archived {} events into {} segments: {} bytes, {:.0} % of their {} raw bytes",
        report.events,
        report.segments,
        report.bytes,
        100.0 * report.bytes as f64 / report.raw_bytes.max(1) as f64,
        report.raw_bytes
    );
    let stats = journal.stats(|_| {}).await?;
    let k: KindTierStats = stats.kinds["chat"];
    println!(
        "chat: hot {} events | warm {} events | cold {} events in {} segments | {} blobs, {} bytes",
        k.hot.events, k.warm_events, k.cold_events, k.cold_segments, stats.blobs, stats.blob_bytes
    );
    // ANCHOR_END: archive
    check(
        report.events > 0 && k.cold_events == report.events,
        "week-old events are cold",
    )?;
    check(
        k.warm_events + k.cold_events == seq,
        "every event is in exactly one of warm and cold",
    )?;
    check(k.hot.events == 64, "the latest 64 events are hot")?;

    // ANCHOR: replay
    // One replay, three tiers: cold segments, then RocksDB.
    let all = journal.replay(&chat, 1, u64::MAX).collect_all().await?;
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    // A resume near the end is served from memory.
    let tail = journal
        .replay(&chat, seq - 5, u64::MAX)
        .collect_all()
        .await?;
    // Media referenced by an archived event still streams back, checked.
    let first_photo = first_photo.expect("day 0 sent a photo");
    let mut bytes = 0;
    let mut s = blobs.get_stream(&first_photo).await?;
    while let Some(part) = s.next().await {
        bytes += part?.len() as u64;
    }
    // ANCHOR_END: replay
    check(
        seqs == (1..=seq).collect::<Vec<_>>(),
        "the replay returns every event once, in order",
    )?;
    check(tail.len() == 6, "a resume inside the hot tail")?;
    let hot = journal.stats(|_| {}).await?.kinds["chat"].hot;
    check(hot.hits >= 1, "served from memory (hot hits counted)")?;
    check(
        bytes == first_photo.size,
        "an archived event's photo streams back whole",
    )?;

    // ANCHOR: forget
    // Forget the first half; media only it referred to is freed.
    let cutoff = all
        .iter()
        .rfind(|e| e.timestamp_ms < start + days / 2 * DAY_MS)
        .map_or(0, |e| e.seq);
    journal.delete_events_to(&chat, cutoff).await?;
    let gc = journal.collect_blobs(troupe::journal::now_ms()).await?;
    println!(
        "deleted events 1..={cutoff}; blob collector: {} collected ({} bytes), {} kept",
        gc.collected, gc.bytes_freed, gc.kept
    );
    // ANCHOR_END: forget
    check(gc.collected > 0, "media of deleted history is collected")?;
    let missing = blobs.get_stream(&first_photo).await;
    check(
        matches!(missing, Err(JournalError::BlobMissing { .. })),
        "a collected blob is gone",
    )?;
    let left = journal.replay(&chat, 1, u64::MAX).collect_all().await?;
    check(
        left.first().map(|e| e.seq) == Some(cutoff + 1),
        "the rest of the history still replays",
    )?;
    let still = left.iter().filter_map(|e| match e.decode::<ChatEvent>() {
        Ok(ChatEvent::SentMedia { media, .. }) => Some(media),
        _ => None,
    });
    for m in still {
        check(
            blobs.size_of(&m.hash).await? == Some(m.size),
            "media still referred to is kept",
        )?;
    }
    journal.close().await;
    println!("storage_tiers: all checks passed");
    Ok(())
}

//! The tiers suite: what realistic chat events cost in the warm and cold
//! tiers, how fast a client resumes from each tier, and blob throughput.
//!
//! Events are the agent sessions' own `SessionEvent`s (user turns, turn
//! starts, streamed chunks of a few words, tool calls and results, turn
//! completions), with text drawn from an English word list.
//!
//! Baselines, measured in the same run: the plain RocksDB journal for the
//! warm and hot resumes, reading the segment file straight from disk for
//! the cold resume, and `std::fs` writes (with fsync) and reads of the
//! same bytes for blobs.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use troupe_agent::{SessionEvent, ToolCall, Usage};
use troupe_journal::tiered::open_object_store;
use troupe_journal::{
    ColdConfig, Compression, Durability, HotConfig, Journal, NewEvent, PersistenceId, RocksConfig,
    RocksJournal, TierConfig, TieredJournal, WarmCompression,
};

use super::{Report, percentile};

type BoxError = Box<dyn std::error::Error>;

const WORDS: &[&str] = &[
    "the",
    "order",
    "I",
    "you",
    "to",
    "a",
    "and",
    "is",
    "it",
    "of",
    "for",
    "my",
    "your",
    "was",
    "on",
    "that",
    "we",
    "can",
    "please",
    "with",
    "this",
    "be",
    "have",
    "not",
    "account",
    "help",
    "refund",
    "shipping",
    "package",
    "delivery",
    "tracking",
    "number",
    "customer",
    "support",
    "thanks",
    "would",
    "like",
    "could",
    "check",
    "status",
    "arrived",
    "yesterday",
    "today",
    "tomorrow",
    "address",
    "payment",
    "card",
    "charged",
    "twice",
    "invoice",
    "email",
    "sent",
    "received",
    "damaged",
    "replace",
    "return",
    "label",
    "warehouse",
    "days",
    "business",
    "within",
    "policy",
    "eligible",
    "credit",
    "issued",
    "apologize",
    "inconvenience",
    "let",
    "me",
    "look",
    "into",
    "see",
    "here",
    "there",
    "what",
    "when",
    "where",
    "how",
    "why",
    "which",
    "product",
    "size",
    "color",
    "model",
    "version",
    "update",
    "settings",
    "password",
    "reset",
    "login",
    "error",
    "message",
    "screen",
    "app",
    "browser",
    "phone",
    "laptop",
    "subscription",
    "plan",
    "upgrade",
    "cancel",
    "renewal",
    "discount",
    "code",
    "price",
    "total",
    "tax",
    "fee",
    "estimated",
    "arrival",
    "courier",
    "signature",
    "required",
    "weekend",
    "morning",
    "evening",
    "happy",
    "sorry",
    "great",
    "sure",
    "absolutely",
    "understand",
    "confirm",
    "details",
    "below",
    "above",
    "attached",
    "photo",
    "receipt",
    "store",
    "online",
    "team",
    "manager",
    "escalate",
    "ticket",
    "case",
    "reference",
    "priority",
    "urgent",
    "resolved",
    "pending",
    "processing",
    "shipped",
    "out",
    "for",
    "will",
    "should",
    "might",
    "also",
    "just",
    "only",
    "all",
    "any",
    "some",
    "more",
    "less",
    "new",
    "old",
    "same",
    "different",
    "first",
    "last",
    "next",
    "again",
];

fn sentence(rng: &mut StdRng, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        if i > 0 {
            s.push(' ');
        }
        // Zipf-like: common words far more often than rare ones.
        let r: f64 = rng.random();
        let idx = ((r * r * r) * WORDS.len() as f64) as usize;
        s.push_str(WORDS[idx.min(WORDS.len() - 1)]);
    }
    s.push('.');
    s
}

/// One session's events: `turns` turns of user text, a streamed answer,
/// sometimes a tool call.
fn session_events(rng: &mut StdRng, session: usize, turns: u32) -> Vec<SessionEvent> {
    let mut out = vec![SessionEvent::Opened {
        id: format!("s-{session}"),
        agent: "support".into(),
        tenant: Some("acme".into()),
        context_limit: 32,
    }];
    for turn in 1..=turns {
        let n = rng.random_range(12..80);
        out.push(SessionEvent::UserTurn {
            turn,
            text: sentence(rng, n),
            attachments: Vec::new(),
            key: None,
        });
        out.push(SessionEvent::TurnStarted {
            turn,
            attempt: 1,
            model: "llama-3.1-8b-instruct".into(),
            keeps_tool_results: true,
        });
        if rng.random_bool(0.3) {
            let call_id = format!("call_{}", rng.random::<u32>());
            out.push(SessionEvent::ToolCalled {
                turn,
                call: ToolCall {
                    id: call_id.clone(),
                    name: "lookup_order".into(),
                    arguments: format!(
                        "{{\"order_id\":\"A-{}\"}}",
                        rng.random_range(10_000..99_999)
                    ),
                },
            });
            out.push(SessionEvent::ToolResult {
                turn,
                call_id,
                ok: true,
                output: format!(
                    "{{\"status\":\"shipped\",\"carrier\":\"UPS\",\"eta_days\":{},\"items\":{}}}",
                    rng.random_range(1..7),
                    rng.random_range(1..5)
                ),
            });
        }
        for _ in 0..rng.random_range(8..24) {
            let n = rng.random_range(2..9);
            out.push(SessionEvent::ModelChunk {
                turn,
                text: sentence(rng, n),
            });
        }
        out.push(SessionEvent::TurnCompleted {
            turn,
            finish_reason: "stop".into(),
            usage: Some(Usage {
                prompt_tokens: rng.random_range(200..3000),
                completion_tokens: rng.random_range(20..400),
            }),
        });
    }
    out
}

struct Params {
    sessions: usize,
    turns: u32,
    samples: usize,
    blob_mib: usize,
}

fn note(msg: &str) {
    eprintln!("# {msg}");
}

fn open_tiered(
    dir: &Path,
    hot: HotConfig,
    compression: WarmCompression,
) -> Result<TieredJournal, BoxError> {
    let mut warm = RocksConfig::new(dir.join("journal")).durability(Durability::Buffered);
    warm.compression = compression;
    let mut config = TierConfig {
        hot,
        ..TierConfig::default()
    };
    config.archive.archive_after_s = Some(3600);
    config.archive.snapshot_retention_s = None;
    config.archive.min_segment_events = 1;
    let cold = open_object_store(&ColdConfig::default(), &dir.join("cold"))?;
    Ok(TieredJournal::new(RocksJournal::open(warm)?, cold, config)?)
}

/// Writes every session, returning ids, event counts and envelope bytes.
async fn write_sessions(
    j: &dyn Journal,
    p: &Params,
    base_ms: u64,
) -> Result<(Vec<PersistenceId>, u64, u64), BoxError> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut ids = Vec::new();
    let (mut events, mut raw) = (0u64, 0u64);
    let mut clock = base_ms;
    for s in 0..p.sessions {
        let id = PersistenceId::new("session", &format!("s-{s}"))?;
        let mut seq = 0;
        for chunk in session_events(&mut rng, s, p.turns).chunks(64) {
            let batch: Vec<NewEvent> = chunk
                .iter()
                .map(|e| {
                    let mut ev = NewEvent::new(e)?;
                    clock += 50;
                    ev.timestamp_ms = clock;
                    let mut buf = Vec::new();
                    ev.encode_envelope(&mut buf);
                    raw += buf.len() as u64;
                    Ok(ev)
                })
                .collect::<Result<_, troupe_journal::JournalError>>()?;
            events += batch.len() as u64;
            let n = batch.len() as u64;
            j.append(&id, seq, batch).await?;
            seq += n;
        }
        ids.push(id);
    }
    Ok((ids, events, raw))
}

async fn first_event_ms(j: &dyn Journal, id: &PersistenceId, from: u64) -> Result<f64, BoxError> {
    let started = Instant::now();
    let mut replay = j.replay(id, from, u64::MAX);
    match replay.next().await {
        Some(Ok(batch)) if !batch.is_empty() => Ok(started.elapsed().as_secs_f64() * 1000.0),
        other => Err(format!("resume of {id} at {from} gave {other:?}").into()),
    }
}

pub fn run(quick: bool) -> Result<(), BoxError> {
    let p = if quick {
        Params {
            sessions: 200,
            turns: 6,
            samples: 200,
            blob_mib: 16,
        }
    } else {
        Params {
            sessions: 2000,
            turns: 8,
            samples: 1000,
            blob_mib: 100,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(p))
}

async fn run_async(p: Params) -> Result<(), BoxError> {
    let report = Report;
    let dir = tempfile::tempdir()?;
    let now = troupe_journal::now_ms();
    let old = now - 30 * 86_400_000;

    // --- Sizes: the same events under zstd-at-the-bottom and LZ4 only.
    note(&format!(
        "writing {} sessions x {} turns of chat events",
        p.sessions, p.turns
    ));
    let lz4 = open_tiered(
        &dir.path().join("lz4"),
        HotConfig::disabled(),
        WarmCompression {
            upper: Compression::Lz4,
            bottommost: Compression::Lz4,
            zstd_level: 6,
        },
    )?;
    write_sessions(&lz4, &p, old).await?;
    let lz4_bytes = lz4.warm_compacted_bytes()?;
    lz4.close().await;
    drop(lz4);

    let tiers = open_tiered(
        &dir.path().join("tiers"),
        HotConfig::default(),
        WarmCompression::default(),
    )?;
    let (ids, events, raw) = write_sessions(&tiers, &p, old).await?;
    let warm_bytes = tiers.warm_compacted_bytes()?;
    report.figure("events_written", events as f64, "events");
    report.figure("bytes_per_event_raw", raw as f64 / events as f64, "bytes");
    report.figure(
        "bytes_per_event_warm",
        warm_bytes as f64 / events as f64,
        "bytes",
    );
    report.figure(
        "bytes_per_event_warm_lz4_only",
        lz4_bytes as f64 / events as f64,
        "bytes",
    );
    report.figure("warm_storage_ratio", warm_bytes as f64 / raw as f64, "x");

    // --- Hot resumes: sessions whose tails were just appended.
    let hot_ids: Vec<&PersistenceId> = ids.iter().rev().take(p.samples.min(ids.len())).collect();
    let mut hot = Vec::new();
    for id in &hot_ids {
        let h = tiers.highest_seq(id).await?;
        hot.push(first_event_ms(&tiers, id, h.saturating_sub(5).max(1)).await?);
    }
    let stats = tiers.stats(|_| {}).await?;
    let session = stats.kinds.get("session").copied().unwrap_or_default();
    report.figure("resume_hot_p50", percentile(&hot, 0.5), "ms");
    report.figure("resume_hot_p99", percentile(&hot, 0.99), "ms");
    report.figure("resume_hot_hits", session.hot.hits as f64, "reads");
    tiers.close().await;
    drop(tiers);

    // --- Warm resumes: the same journal reopened (nothing hot).
    let tiers = open_tiered(
        &dir.path().join("tiers"),
        HotConfig::default(),
        WarmCompression::default(),
    )?;
    let mut rng = StdRng::seed_from_u64(11);
    let mut warm = Vec::new();
    let mut plain = Vec::new();
    let mut picks = Vec::new();
    for _ in 0..p.samples {
        let id = &ids[rng.random_range(0..ids.len())];
        let h = tiers.highest_seq(id).await?;
        picks.push((id.clone(), rng.random_range(1..=h)));
    }
    for (id, from) in &picks {
        warm.push(first_event_ms(&tiers, id, *from).await?);
    }
    report.figure("resume_warm_p50", percentile(&warm, 0.5), "ms");
    report.figure("resume_warm_p99", percentile(&warm, 0.99), "ms");
    for (id, from) in &picks {
        plain.push(first_event_ms(tiers.warm(), id, *from).await?);
    }
    report.figure("baseline_rocks_resume_p99", percentile(&plain, 0.99), "ms");
    report.ratio(
        "resume_warm_p99",
        percentile(&warm, 0.99),
        percentile(&plain, 0.99),
    );

    // --- Cold: archive everything, then resume inside the archived range.
    let started = Instant::now();
    let archived = tiers.archive_all(now, |_, _| {}).await?;
    let archive_s = started.elapsed().as_secs_f64();
    report.figure(
        "archive_rate",
        archived.events as f64 / archive_s,
        "events/s",
    );
    report.figure(
        "bytes_per_event_cold",
        archived.bytes as f64 / archived.events.max(1) as f64,
        "bytes",
    );
    report.figure(
        "cold_storage_ratio",
        archived.bytes as f64 / raw as f64,
        "x",
    );
    let mut cold = Vec::new();
    let mut file_reads = Vec::new();
    for (id, from) in &picks {
        cold.push(first_event_ms(&tiers, id, *from).await?);
        let m = tiers
            .manifest(id)
            .await?
            .ok_or("archived id without manifest")?;
        let seg = m
            .segments
            .iter()
            .find(|s| s.from <= *from && *from <= s.to)
            .ok_or("no segment")?;
        let path = dir.path().join("tiers/cold").join(&seg.object);
        let t = Instant::now();
        let bytes = tokio::fs::read(&path).await?;
        std::hint::black_box(bytes);
        file_reads.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    report.figure("resume_cold_p50", percentile(&cold, 0.5), "ms");
    report.figure("resume_cold_p99", percentile(&cold, 0.99), "ms");
    report.figure(
        "baseline_segment_file_read_p99",
        percentile(&file_reads, 0.99),
        "ms",
    );
    report.ratio(
        "resume_cold_p99",
        percentile(&cold, 0.99),
        percentile(&file_reads, 0.99),
    );

    // --- Blobs: one blob of blob_mib MiB in and out, against std::fs.
    let size = p.blob_mib << 20;
    let chunk = 1 << 20;
    let data: Arc<Vec<u8>> = Arc::new({
        let mut rng = StdRng::seed_from_u64(3);
        (0..size).map(|_| rng.random::<u8>()).collect()
    });
    let blobs = tiers.blobs().clone();
    let d = data.clone();
    let parts = futures::stream::iter((0..size).step_by(chunk).map(move |at| {
        Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(
            &d[at..(at + chunk).min(size)],
        ))
    }));
    let t = Instant::now();
    let blob = blobs.put_stream("video/mp4", parts).await?;
    let in_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut s = blobs.get_stream(&blob).await?;
    let mut got = 0usize;
    while let Some(part) = s.next().await {
        got += part?.len();
    }
    let out_s = t.elapsed().as_secs_f64();
    if got != size {
        return Err(format!("read {got} of {size} blob bytes").into());
    }
    let mib = p.blob_mib as f64;
    report.figure("blob_size", mib, "MiB");
    report.figure("blob_throughput_in", mib / in_s, "MiB/s");
    report.figure("blob_throughput_out", mib / out_s, "MiB/s");
    report.figure("blob_throughput", 2.0 * mib / (in_s + out_s), "MiB/s");
    let raw_path = dir.path().join("raw-blob");
    let d = data.clone();
    let rp = raw_path.clone();
    let t = Instant::now();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&rp)?;
        for at in (0..size).step_by(chunk) {
            f.write_all(&d[at..(at + chunk).min(size)])?;
        }
        f.sync_all()
    })
    .await??;
    let raw_in = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let rp = raw_path.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<usize> {
        use std::io::Read;
        let mut f = std::fs::File::open(&rp)?;
        let mut buf = vec![0u8; chunk];
        let mut n = 0;
        loop {
            let k = f.read(&mut buf)?;
            if k == 0 {
                return Ok(n);
            }
            n += k;
        }
    })
    .await??;
    let raw_out = t.elapsed().as_secs_f64();
    report.figure("baseline_fs_write", mib / raw_in, "MiB/s");
    report.figure("baseline_fs_read", mib / raw_out, "MiB/s");
    report.ratio("blob_throughput_in", mib / in_s, mib / raw_in);
    report.ratio("blob_throughput_out", mib / out_s, mib / raw_out);
    tiers.close().await;
    Ok(())
}

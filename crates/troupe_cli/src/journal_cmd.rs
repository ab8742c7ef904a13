//! `troupe journal ...`: list, dump and verify a journal; archive old
//! events to the cold tier; figures per tier.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use troupe_journal::tiered::{default_cold_dir, open_object_store};
use troupe_journal::{
    ColdConfig, Journal, PersistedEvent, PersistenceId, RocksConfig, RocksJournal, TierConfig,
    TieredJournal,
};

#[derive(Subcommand)]
pub enum JournalCommand {
    /// List persistence ids with their highest sequence number.
    Ls,
    /// Print the events of one persistence id as JSON lines.
    Dump {
        /// Persistence id (`kind/key`).
        id: String,
        /// First sequence number to print.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Cold store URL, for archived events (default: a `cold`
        /// directory beside the journal's, when there is one).
        #[arg(long)]
        cold: Option<String>,
    },
    /// Decode every stored envelope; list bad entries; exit 1 if any.
    Verify,
    /// Move old events to the cold tier (the journal must not be open in a
    /// server; a server archives by itself when `archive.interval_s` is set).
    Archive {
        /// Archive events older than this (`7d`, `12h`, `90m`...).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Archive events covered by a snapshot and older than this.
        #[arg(long, value_parser = humantime::parse_duration)]
        snapshot_retention: Option<std::time::Duration>,
        /// Cold store URL (default: a `cold` directory beside the journal's).
        #[arg(long)]
        cold: Option<String>,
        /// zstd level of the segments (1..=19; default 9).
        #[arg(long)]
        zstd_level: Option<i32>,
        /// Also delete blobs no event refers to any more.
        #[arg(long)]
        collect_blobs: bool,
        /// Take the policy and the cold store (URL and options) from the
        /// `[storage]` section of a `troupe serve` configuration; flags
        /// given as well win.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Events and bytes per tier and per kind, and blobs.
    Stats {
        /// Cold store URL (default: a `cold` directory beside the journal's).
        #[arg(long)]
        cold: Option<String>,
        /// Take the cold store from the `[storage]` section of a `troupe
        /// serve` configuration.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
}

/// The `[storage]` section of a server configuration file.
fn storage_of(config: Option<&Path>) -> Result<Option<TierConfig>, Box<dyn std::error::Error>> {
    let Some(path) = config else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let parsed = troupe_gateway::GatewayConfig::from_toml(&text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Some(parsed.storage.ok_or_else(|| {
        format!("{} has no [storage] section", path.display())
    })?))
}

fn cold_config(url: Option<String>) -> ColdConfig {
    ColdConfig {
        url,
        ..ColdConfig::default()
    }
}

/// The journal with its cold tier, for reading; the plain journal when no
/// cold store exists yet.
fn open_for_reading(
    data_dir: &Path,
    cold: ColdConfig,
) -> Result<TieredJournal, Box<dyn std::error::Error>> {
    let warm = RocksJournal::open_read_only(data_dir)?;
    let default_dir = default_cold_dir(data_dir);
    let objects = if cold.url.is_none() && !default_dir.exists() {
        // Nothing was ever archived: read the warm tier alone, create nothing.
        troupe_journal::Objects::remote(std::sync::Arc::new(object_store::memory::InMemory::new()))
    } else {
        open_object_store(&cold, &default_dir)?
    };
    Ok(TieredJournal::new(
        warm,
        objects,
        TierConfig {
            hot: troupe_journal::HotConfig::disabled(),
            ..TierConfig::default()
        },
    )?)
}

fn runtime() -> Result<tokio::runtime::Runtime, Box<dyn std::error::Error>> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub fn run(
    data_dir: &Path,
    command: JournalCommand,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let out = std::io::stdout();
    let mut out = out.lock();
    match command {
        JournalCommand::Archive {
            older_than,
            snapshot_retention,
            cold,
            zstd_level,
            collect_blobs,
            config,
        } => {
            return archive(
                data_dir,
                older_than,
                snapshot_retention,
                cold,
                zstd_level,
                collect_blobs,
                storage_of(config.as_deref())?,
            );
        }
        JournalCommand::Stats { cold, config } => {
            let mut c = storage_of(config.as_deref())?
                .map(|s| s.cold)
                .unwrap_or_default();
            if cold.is_some() {
                c.url = cold;
            }
            return stats(data_dir, c);
        }
        _ => {}
    }
    let journal = RocksJournal::open_read_only(data_dir)?;
    match command {
        JournalCommand::Archive { .. } | JournalCommand::Stats { .. } => {
            unreachable!("handled above")
        }
        JournalCommand::Ls => {
            runtime()?.block_on(async {
                let mut after: Option<PersistenceId> = None;
                loop {
                    let page = journal.persistence_ids(after.as_ref(), 1000).await?;
                    if page.is_empty() {
                        break;
                    }
                    for id in &page {
                        let highest = journal.highest_seq(id).await?;
                        writeln!(out, "{id}\t{highest}")?;
                    }
                    after = page.last().cloned();
                }
                Ok::<_, Box<dyn std::error::Error>>(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        JournalCommand::Dump { id, from, cold } => {
            let id = PersistenceId::parse(&id)?;
            drop(journal);
            let journal = open_for_reading(data_dir, cold_config(cold))?;
            let failed = runtime()?.block_on(async {
                use futures::StreamExt;
                let mut replay = journal.replay(&id, from, u64::MAX);
                while let Some(batch) = replay.next().await {
                    match batch {
                        Ok(events) => {
                            for ev in events {
                                writeln!(out, "{}", dump_line(&ev))?;
                            }
                        }
                        Err(e) => {
                            eprintln!("error: {e}");
                            return Ok::<_, Box<dyn std::error::Error>>(true);
                        }
                    }
                }
                Ok(false)
            })?;
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        JournalCommand::Verify => {
            let total = journal.estimate_event_count();
            let bar = ProgressBar::new(total.max(1));
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} verifying {pos}/{len} events ({per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            // Short journals finish before a bar is worth drawing.
            if total < 100_000 {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let report = journal.verify(|done| bar.set_position(done))?;
            bar.finish_and_clear();
            for bad in &report.bad {
                match bad.seq {
                    Some(seq) => writeln!(out, "BAD {} #{}: {}", bad.id, seq, bad.reason)?,
                    None => writeln!(out, "BAD {}: {}", bad.id, bad.reason)?,
                }
            }
            if report.bad_count as usize > report.bad.len() {
                writeln!(
                    out,
                    "... and {} more",
                    report.bad_count as usize - report.bad.len()
                )?;
            }
            writeln!(
                out,
                "checked {} events and {} snapshots: {} bad",
                report.events_checked, report.snapshots_checked, report.bad_count
            )?;
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn dump_line(ev: &PersistedEvent) -> String {
    let payload = rmp_serde::from_slice::<serde_json::Value>(&ev.payload)
        .unwrap_or_else(|_| serde_json::Value::String(format!("0x{}", hex(&ev.payload))));
    serde_json::json!({
        "seq": ev.seq,
        "type": &*ev.event_type,
        "version": ev.schema_version,
        "timestamp_ms": ev.timestamp_ms,
        "tags": ev.tags.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        "payload": payload,
    })
    .to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len.max(1));
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} {{pos}}/{{len}} ({{per_sec}}, eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

fn archive(
    data_dir: &Path,
    older_than: Option<std::time::Duration>,
    snapshot_retention: Option<std::time::Duration>,
    cold: Option<String>,
    zstd_level: Option<i32>,
    collect_blobs: bool,
    from_file: Option<TierConfig>,
) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if !data_dir.join("CURRENT").exists() {
        return Err(format!("no journal at {}", data_dir.display()).into());
    }
    let mut config = from_file.unwrap_or_default();
    config.hot = troupe_journal::HotConfig::disabled();
    if cold.is_some() {
        config.cold.url = cold;
    }
    // Each flag given wins over the file's value; the others stay.
    if let Some(d) = older_than {
        config.archive.archive_after_s = Some(d.as_secs());
    }
    if let Some(d) = snapshot_retention {
        config.archive.snapshot_retention_s = Some(d.as_secs());
    }
    if let Some(level) = zstd_level {
        config.archive.zstd_level = level;
    }
    config.validate()?;
    let rt = runtime()?;
    let (report, gc) = rt.block_on(async {
        let journal = TieredJournal::open(RocksConfig::new(data_dir), config).map_err(|e| {
            format!("{e} (is a server running on this journal? it archives by itself when archive.interval_s is set)")
        })?;
        let bar = bar(0, "archiving ids");
        let now = troupe_journal::now_ms();
        let report = journal
            .archive_all(now, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .await;
        bar.finish_and_clear();
        let gc = match (&report, collect_blobs) {
            (Ok(_), true) => Some(journal.collect_blobs(now).await),
            _ => None,
        };
        journal.close().await;
        Ok::<_, Box<dyn std::error::Error>>((report?, gc.transpose()?))
    })?;
    let ratio = if report.raw_bytes > 0 {
        report.bytes as f64 / report.raw_bytes as f64
    } else {
        0.0
    };
    println!(
        "archived {} events of {} ids ({} scanned) into {} segments: {} bytes ({} uncompressed, {ratio:.3} x); {} orphan segments removed",
        report.events,
        report.ids_archived,
        report.ids_scanned,
        report.segments,
        report.bytes,
        report.raw_bytes,
        report.orphans_removed
    );
    for (id, reason) in &report.failures {
        println!("NOT ARCHIVED {id}: {reason}");
    }
    if let Some(gc) = gc {
        println!(
            "blobs: {} scanned, {} kept, {} collected ({} bytes), {} stale references and {} abandoned uploads removed",
            gc.scanned,
            gc.kept,
            gc.collected,
            gc.bytes_freed,
            gc.stale_refs_removed,
            gc.abandoned_uploads_removed
        );
    }
    Ok(if report.failure_count == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn stats(data_dir: &Path, cold: ColdConfig) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let journal = open_for_reading(data_dir, cold)?;
    let total = journal.warm().estimate_event_count();
    let bar = bar(total, "scanning events");
    if total < 100_000 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let progress = bar.clone();
    let stats = runtime()?.block_on(journal.stats(move |n| progress.set_position(n)))?;
    bar.finish_and_clear();
    println!(
        "{:<16} {:>12} {:>14} {:>14} {:>12} {:>9} {:>14} {:>14}",
        "kind",
        "warm events",
        "warm raw B",
        "warm disk B",
        "cold events",
        "segments",
        "cold B",
        "cold raw B"
    );
    let mut sum = troupe_journal::tiered::KindTierStats::default();
    for (kind, k) in &stats.kinds {
        println!(
            "{kind:<16} {:>12} {:>14} {:>14} {:>12} {:>9} {:>14} {:>14}",
            k.warm_events,
            k.warm_raw_bytes,
            k.warm_disk_bytes,
            k.cold_events,
            k.cold_segments,
            k.cold_bytes,
            k.cold_raw_bytes
        );
        sum.warm_events += k.warm_events;
        sum.warm_raw_bytes += k.warm_raw_bytes;
        sum.warm_disk_bytes += k.warm_disk_bytes;
        sum.cold_events += k.cold_events;
        sum.cold_segments += k.cold_segments;
        sum.cold_bytes += k.cold_bytes;
        sum.cold_raw_bytes += k.cold_raw_bytes;
    }
    println!(
        "{:<16} {:>12} {:>14} {:>14} {:>12} {:>9} {:>14} {:>14}",
        "total",
        sum.warm_events,
        sum.warm_raw_bytes,
        sum.warm_disk_bytes,
        sum.cold_events,
        sum.cold_segments,
        sum.cold_bytes,
        sum.cold_raw_bytes
    );
    println!("blobs: {} ({} bytes)", stats.blobs, stats.blob_bytes);
    println!(
        "hot: held in the serving process's memory; see troupe_journal_hot_hits_total and troupe_journal_hot_misses_total on /metrics"
    );
    Ok(ExitCode::SUCCESS)
}

//! `troupe journal ...`: list, dump and verify a RocksDB journal.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use troupe_journal::{Journal, PersistedEvent, PersistenceId, RocksJournal};

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
    },
    /// Decode every stored envelope; list bad entries; exit 1 if any.
    Verify,
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
    let journal = RocksJournal::open_read_only(data_dir)?;
    let out = std::io::stdout();
    let mut out = out.lock();
    match command {
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
        JournalCommand::Dump { id, from } => {
            let id = PersistenceId::parse(&id)?;
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

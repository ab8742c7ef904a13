//! The `troupe` command: journal tools and benchmarks.
//!
//! - `troupe journal ls | dump ID | verify --data-dir DIR`: inspect a
//!   journal (opened read-only, so it works beside a running server).
//! - `troupe bench journal [--quick]`: measure the journal against raw
//!   RocksDB, one `name: value unit` line per figure.

// The journal's reader and writer threads allocate events that other
// threads free; glibc's per-thread arenas make every such free slow.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod journal_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "troupe",
    version,
    about = "Troupe: durable, GPU-aware actors for AI agent systems"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect and check an event journal.
    Journal {
        /// Journal data directory.
        #[arg(long, default_value = "troupe-data/journal")]
        data_dir: PathBuf,
        #[command(subcommand)]
        command: journal_cmd::JournalCommand,
    },
    /// Run a benchmark suite and print one `name: value unit` line per figure.
    Bench {
        #[command(subcommand)]
        suite: bench::Suite,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Journal { data_dir, command } => journal_cmd::run(&data_dir, command),
        Command::Bench { suite } => bench::run(suite),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

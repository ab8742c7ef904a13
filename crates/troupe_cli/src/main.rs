//! The `troupe` command: the gateway server, journal tools and benchmarks.
//!
//! - `troupe serve [--config troupe.toml]`: the HTTP gateway (embedded
//!   defaults: data in `./troupe-data`, simulated GPUs without a driver,
//!   127.0.0.1:8080, the local model backend).
//! - `troupe journal ls | dump ID | verify --data-dir DIR`: inspect a
//!   journal (opened read-only, so it works beside a running server).
//! - `troupe bench journal [--quick]`: measure the journal against raw
//!   RocksDB, one `name: value unit` line per figure.

// The journal's reader and writer threads allocate events that other
// threads free; glibc's per-thread arenas make every such free slow.
#[global_allocator]
static ALLOCATOR: alloc_count::Counting = alloc_count::Counting;

/// mimalloc, with an optional count of live bytes for memory benchmarks.
pub mod alloc_count {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

    static ON: AtomicBool = AtomicBool::new(false);
    static LIVE: AtomicI64 = AtomicI64::new(0);

    /// The global allocator of the `troupe` binary.
    pub struct Counting;

    // SAFETY: every call is forwarded unchanged to mimalloc; the counter
    // is bookkeeping only.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            if ON.load(Ordering::Relaxed) {
                LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
            }
            // SAFETY: forwarded with the caller's layout.
            unsafe { mimalloc::MiMalloc.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            if ON.load(Ordering::Relaxed) {
                LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
            }
            // SAFETY: forwarded with the caller's pointer and layout.
            unsafe { mimalloc::MiMalloc.dealloc(p, l) }
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            if ON.load(Ordering::Relaxed) {
                LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
            }
            // SAFETY: forwarded with the caller's layout.
            unsafe { mimalloc::MiMalloc.alloc_zeroed(l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            if ON.load(Ordering::Relaxed) {
                LIVE.fetch_add(new as i64 - l.size() as i64, Ordering::Relaxed);
            }
            // SAFETY: forwarded with the caller's pointer, layout and size.
            unsafe { mimalloc::MiMalloc.realloc(p, l, new) }
        }
    }

    /// Starts counting (bytes allocated before are not seen).
    pub fn start() {
        ON.store(true, Ordering::SeqCst);
    }

    /// Bytes allocated minus bytes freed since counting started.
    pub fn live() -> i64 {
        LIVE.load(Ordering::SeqCst)
    }
}

mod bench;
mod journal_cmd;
mod serve;

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
    /// Run the HTTP gateway until Ctrl-C or SIGTERM (then drain and flush).
    Serve {
        /// TOML configuration (every field optional; see config/troupe.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
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

fn init_logs(default: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        init_logs("warn", false);
    }
    let result = match cli.command {
        Command::Serve { config } => serve::run(config.as_deref()),
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

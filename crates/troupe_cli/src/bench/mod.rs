//! `troupe bench <suite>`: benchmark suites.
//!
//! Every suite prints one `name: value unit` line per figure on stdout and,
//! for each figure with a baseline measured in the same run, a line
//! `name_ratio: R x` (Troupe divided by the baseline). Progress notes go to
//! stderr.

#[cfg(feature = "cluster")]
mod cluster;
mod gateway;
mod journal;
mod leases;
mod mailbox;
mod saga;
mod sessions;
mod tiers;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Suite {
    /// The event journal against raw RocksDB.
    Journal {
        /// Smaller counts, well under a minute.
        #[arg(long)]
        quick: bool,
    },
    /// Troupe handles and durable actors against raw ractor and tokio.
    Mailbox {
        /// Smaller counts, well under a minute.
        #[arg(long)]
        quick: bool,
    },
    /// GPU admission against a plain FIFO queue, and lease latency.
    Leases {
        /// Smaller counts, well under a minute.
        #[arg(long)]
        quick: bool,
    },
    /// DAG workflows: parallelism, framework time per step, throughput.
    Saga {
        /// Smaller counts, well under a minute.
        #[arg(long)]
        quick: bool,
    },
    /// Agent sessions: turns per second, resume latency, memory.
    Sessions {
        /// Smaller counts, well under a minute.
        #[arg(long)]
        quick: bool,
    },
    /// The HTTP gateway: 202s per second and their latency while 1,000 SSE
    /// streams are open, against a bare axum handler that journals too.
    Gateway {
        /// Smaller counts, well under a minute.
        #[arg(long)]
        quick: bool,
    },
    /// Tiered storage: bytes per event warm and cold, resume latency per
    /// tier, blob throughput.
    Tiers {
        /// Smaller counts, well under a minute.
        #[arg(long)]
        quick: bool,
    },
    /// Tells and asks between two node processes (ractor_cluster on
    /// 127.0.0.1) against the same calls within one node. Needs a binary
    /// built with `--features cluster`.
    Cluster {
        /// Smaller counts, well under a minute.
        #[arg(long)]
        quick: bool,
    },
    /// (internal) The peer node of `bench cluster`.
    #[command(hide = true)]
    ClusterPeer {
        #[arg(long)]
        port: u16,
    },
    /// (internal) Replay one id and print the process's peak RSS.
    #[command(hide = true)]
    ReplayRss {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        id: String,
    },
}

pub fn run(suite: Suite) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match suite {
        Suite::Journal { quick } => journal::run(quick)?,
        Suite::Mailbox { quick } => mailbox::run(quick)?,
        Suite::Leases { quick } => leases::run(quick)?,
        Suite::Saga { quick } => saga::run(quick)?,
        Suite::Sessions { quick } => sessions::run(quick)?,
        Suite::Gateway { quick } => gateway::run(quick)?,
        Suite::Tiers { quick } => tiers::run(quick)?,
        #[cfg(feature = "cluster")]
        Suite::Cluster { quick } => cluster::run(quick)?,
        #[cfg(feature = "cluster")]
        Suite::ClusterPeer { port } => cluster::peer(port)?,
        #[cfg(not(feature = "cluster"))]
        Suite::Cluster { .. } | Suite::ClusterPeer { .. } => {
            return Err("this troupe binary was built without the cluster feature: \
                        cargo run --release -p troupe_cli --features cluster -- bench cluster"
                .into());
        }
        Suite::ReplayRss { data_dir, id } => journal::replay_rss_child(&data_dir, &id)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints figures as they are measured.
pub struct Report;

impl Report {
    pub fn figure(&self, name: &str, value: f64, unit: &str) {
        println!("{name}: {} {unit}", fmt(value));
    }

    pub fn ratio(&self, name: &str, troupe: f64, baseline: f64) {
        let r = if baseline > 0.0 {
            troupe / baseline
        } else {
            0.0
        };
        println!("{name}_ratio: {r:.3} x");
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 0.1 || v == 0.0 {
        format!("{v:.2}")
    } else {
        // Small figures (sub-0.1 ms latencies) keep three significant digits.
        format!("{v:.3e}")
    }
}

/// The `q` quantile (0 to 1) of `v`, nearest rank; 0 for no values.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// Peak resident set size of this process in KiB (Linux `VmHWM`).
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Current resident set size of this process in KiB (Linux `VmRSS`).
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

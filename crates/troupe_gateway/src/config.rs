//! The gateway's configuration: TOML, with embedded defaults for every
//! field, so `troupe serve` runs with no file at all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use troupe_journal::Durability;

use crate::error::GatewayError;

/// A tenant: its name and the bearer token that identifies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    /// Tenant name (scopes every id it creates).
    pub name: String,
    /// Bearer token.
    pub token: String,
}

/// The model backend sessions and tasks use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelConfig {
    /// The deterministic local backend.
    Local {
        /// Words per reply.
        #[serde(default = "default_words")]
        words: usize,
        /// Milliseconds between chunks (and before the first).
        #[serde(default)]
        chunk_ms: u64,
    },
    /// An OpenAI-compatible server.
    Openai {
        /// Base URL, e.g. `http://127.0.0.1:8000/v1`.
        base_url: String,
        /// Model name the server knows.
        model: String,
        /// Environment variable holding the API key, if any.
        #[serde(default)]
        api_key_env: Option<String>,
    },
}

fn default_words() -> usize {
    24
}

/// The journal in PostgreSQL instead of RocksDB under `data_dir`
/// (`[postgres]`): several servers can then serve the same sessions,
/// tasks and workflows, one after the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// Connection string, e.g. `postgres://troupe@127.0.0.1:5432/troupe`.
    pub url: String,
    /// Schema holding the journal's tables.
    #[serde(default = "default_schema")]
    pub schema: String,
    /// Connections in the pool.
    #[serde(default = "default_pool")]
    pub pool_size: usize,
}

fn default_schema() -> String {
    troupe_postgres::DEFAULT_SCHEMA.into()
}

/// Twice the library's default: a server runs 64 task workers by default.
fn default_pool() -> usize {
    16
}

/// Simulated GPUs, used when NVML finds no driver (or when forced).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuSection {
    /// Use simulated GPUs even if NVML finds real ones.
    pub force_simulated: bool,
    /// How many simulated GPUs.
    pub simulated: u32,
    /// Memory of each simulated GPU, in GiB.
    pub memory_gib: u64,
    /// Memory each inference leases, in MiB.
    pub lease_memory_mib: u64,
    /// Compute share each inference leases, in percent of a GPU.
    pub lease_compute_pct: u32,
    /// Longest wait for a lease, in milliseconds, before 429.
    pub lease_wait_ms: u64,
}

impl Default for GpuSection {
    fn default() -> Self {
        Self {
            force_simulated: false,
            simulated: 2,
            memory_gib: 80,
            lease_memory_mib: 8 * 1024,
            lease_compute_pct: 25,
            lease_wait_ms: 5_000,
        }
    }
}

/// The degrade policy: utilization thresholds, in percent of leased
/// compute across the GPUs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DegradeSection {
    /// Above this, the lowest priority is refused early.
    pub refuse_lowest_above_pct: u32,
    /// Above this, all but the top priority are refused early.
    pub top_only_above_pct: u32,
}

impl Default for DegradeSection {
    fn default() -> Self {
        Self {
            refuse_lowest_above_pct: 70,
            top_only_above_pct: 90,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Everything `troupe serve` reads. Every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Data directory (the journal lives in `journal/` under it).
    pub data_dir: PathBuf,
    /// Journal durability.
    pub durability: Durability,
    /// Tenants. With none, requests need no token and belong to `default`.
    pub tenants: Vec<Tenant>,
    /// Largest request body, in bytes (413 past it).
    pub body_limit_bytes: usize,
    /// Heartbeat comment interval of SSE streams, in milliseconds.
    pub heartbeat_ms: u64,
    /// Most accepted tasks waiting for a worker (429 past it).
    pub task_queue: usize,
    /// Tasks run at once.
    pub task_workers: usize,
    /// Priority of session turns (0 to 3).
    pub session_priority: u8,
    /// The agent `POST /v1/sessions` opens sessions with when the request
    /// names none (`troupe serve` registers `assistant`).
    pub session_agent: String,
    /// The model.
    pub model: ModelConfig,
    /// GPUs and leases.
    pub gpus: GpuSection,
    /// Degrade thresholds.
    pub degrade: DegradeSection,
    /// Log format.
    pub log_format: LogFormat,
    /// Longest wait for in-flight requests on shutdown, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// Tiered storage and blobs (`[storage]`; none by default): the hot
    /// tail per kind, archiving to the cold store (`data_dir/cold` unless
    /// `storage.cold.url` says otherwise), blob limits.
    pub storage: Option<troupe_journal::TierConfig>,
    /// Keep the journal in PostgreSQL (`[postgres]`; none by default).
    /// GPU lease decisions stay in a local journal: leases belong to this
    /// server's GPUs.
    pub postgres: Option<PostgresSection>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("troupe-data"),
            durability: Durability::Fsync,
            tenants: Vec::new(),
            body_limit_bytes: 64 * 1024,
            heartbeat_ms: 15_000,
            task_queue: 1_024,
            task_workers: 64,
            session_priority: 2,
            session_agent: crate::SESSION_AGENT.into(),
            model: ModelConfig::Local {
                words: default_words(),
                chunk_ms: 0,
            },
            gpus: GpuSection::default(),
            degrade: DegradeSection::default(),
            log_format: LogFormat::Text,
            shutdown_grace_ms: 10_000,
            storage: None,
            postgres: None,
        }
    }
}

impl GatewayConfig {
    /// Parses TOML text (missing fields take their defaults) and checks it.
    pub fn from_toml(text: &str) -> Result<Self, GatewayError> {
        let config: Self = toml::from_str(text).map_err(|e| GatewayError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self, GatewayError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| GatewayError::Config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| match e {
            GatewayError::Config(m) => GatewayError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Checks bounds and consistency.
    pub fn validate(&self) -> Result<(), GatewayError> {
        let bad = |m: String| Err(GatewayError::Config(m));
        if self.task_queue == 0 || self.task_workers == 0 {
            return bad("task_queue and task_workers must be at least 1".into());
        }
        if self.body_limit_bytes < 256 {
            return bad("body_limit_bytes must be at least 256".into());
        }
        if self.session_priority as usize >= troupe_gpu::scheduler::PRIORITIES {
            return bad(format!(
                "session_priority must be below {}",
                troupe_gpu::scheduler::PRIORITIES
            ));
        }
        let d = &self.degrade;
        if d.refuse_lowest_above_pct > d.top_only_above_pct || d.top_only_above_pct > 100 {
            return bad("degrade thresholds must satisfy lowest <= top_only <= 100".into());
        }
        if self.postgres.is_some() && self.storage.is_some() {
            return bad(
                "[storage] (tiers and blobs) works over the RocksDB journal only; \
                 remove it or [postgres]"
                    .into(),
            );
        }
        if let Some(pg) = &self.postgres
            && (pg.url.is_empty() || pg.pool_size == 0)
        {
            return bad("[postgres] needs a url and a pool_size of at least 1".into());
        }
        if let Some(storage) = &self.storage {
            if self.durability == Durability::InMemory {
                return bad("[storage] needs durability fsync or buffered".into());
            }
            storage
                .validate()
                .map_err(|e| GatewayError::Config(e.to_string()))?;
        }
        let mut tokens = std::collections::HashSet::new();
        for t in &self.tenants {
            if t.name.is_empty() || t.token.len() < 8 {
                return bad(format!(
                    "tenant `{}`: a name and a token of at least 8 characters are needed",
                    t.name
                ));
            }
            if !tokens.insert(&t.token) {
                return bad(format!("tenant `{}`: token used twice", t.name));
            }
        }
        Ok(())
    }

    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_configuration_parses_and_defaults_fill_the_rest() {
        let sample = include_str!("../../../config/troupe.toml");
        let c = GatewayConfig::from_toml(sample).unwrap();
        assert_eq!(c.tenants.len(), 2);
        let storage = c.storage.as_ref().expect("the sample configures storage");
        assert_eq!(storage.hot.limits("session").max_events, 512);
        assert_eq!(storage.archive.interval_s, Some(3600));
        assert_eq!(
            GatewayConfig::from_toml("").unwrap(),
            GatewayConfig::default()
        );
        let e = GatewayConfig::from_toml("task_queue = 0").unwrap_err();
        assert!(e.to_string().contains("task_queue"), "{e}");
        let e = GatewayConfig::from_toml("listen = 5").unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
        let e = GatewayConfig::from_toml(
            "[postgres]\nurl = \"postgres://x@127.0.0.1/x\"\n[storage.archive]\nzstd_level = 3\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("RocksDB journal only"), "{e}");
        let c =
            GatewayConfig::from_toml("[postgres]\nurl = \"postgres://x@127.0.0.1/x\"\n").unwrap();
        assert_eq!(
            c.postgres.map(|p| (p.schema, p.pool_size)),
            Some(("troupe".into(), 16))
        );
    }
}

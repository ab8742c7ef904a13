//! The gateway's configuration: TOML, with embedded defaults for every
//! field, so `troupe serve` runs with no file at all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use troupe_journal::Durability;

use crate::error::GatewayError;

/// Shortest bearer token a tenant may have: 32 characters (a random
/// token of that length from `openssl rand -hex 16` or longer cannot be
/// guessed; a word-like one can).
pub const MIN_TOKEN_LEN: usize = 32;

/// A tenant: its name and the bearer token that identifies it, given in
/// the file (`token`) or, better, named by an environment variable read at
/// start-up (`token_env`), so the file holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    /// Tenant name (scopes every id it creates).
    pub name: String,
    /// Bearer token, at least [`MIN_TOKEN_LEN`] characters.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// Environment variable holding the bearer token (instead of `token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    /// Per-tenant limits (`[tenants.quota]`).
    #[serde(default)]
    pub quota: Quota,
}

impl Tenant {
    /// Tenant `name` identified by `token`, with the default quota.
    pub fn new(name: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            token: token.into(),
            token_env: None,
            quota: Quota::default(),
        }
    }

    /// The token: `token`, or the value of `token_env`.
    pub fn resolve_token(&self) -> Result<String, GatewayError> {
        resolve_token(
            &format!("tenant `{}`", self.name),
            &self.token,
            self.token_env.as_deref(),
        )
    }
}

/// The token `token_env` names (or `token`), checked: at least
/// [`MIN_TOKEN_LEN`] visible ASCII characters. `whose` names it in errors.
fn resolve_token(
    whose: &str,
    token: &str,
    token_env: Option<&str>,
) -> Result<String, GatewayError> {
    let token = match token_env {
        Some(var) => std::env::var(var).map_err(|_| {
            GatewayError::Config(format!(
                "{whose}: environment variable `{var}` (token_env) is not set"
            ))
        })?,
        None => token.to_owned(),
    };
    if token.trim().len() < MIN_TOKEN_LEN || token.trim() != token {
        return Err(GatewayError::Config(format!(
            "{whose}: its token must be at least {MIN_TOKEN_LEN} characters, \
             with no surrounding spaces (for example `openssl rand -hex 24`)"
        )));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(GatewayError::Config(format!(
            "{whose}: a token is visible ASCII characters only"
        )));
    }
    Ok(token)
}

impl HttpSection {
    /// The bearer token `/metrics` requires, if one is configured
    /// (`metrics_token_env` first, then `metrics_token`).
    pub fn resolve_metrics_token(&self) -> Result<Option<String>, GatewayError> {
        match (&self.metrics_token_env, &self.metrics_token) {
            (None, None) => Ok(None),
            (env, token) => resolve_token(
                "http.metrics_token",
                token.as_deref().unwrap_or(""),
                env.as_deref(),
            )
            .map(Some),
        }
    }
}

/// What one tenant may use (`[tenants.quota]`; the defaults bound every
/// tenant even when nothing is configured).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quota {
    /// Highest GPU priority its tasks may ask for (0 to 3); higher is
    /// refused with 400. Session turns run at `session_priority`.
    pub max_priority: u8,
    /// Largest `max_tokens` a task may ask for; a task that names none
    /// gets this.
    pub max_tokens: u32,
    /// Tasks of the tenant accepted and not yet ended (queued or
    /// running); 429 past it.
    pub max_tasks: usize,
    /// Event streams of the tenant open at once; 429 past it.
    pub max_streams: usize,
    /// Longest one of its tasks or session turns may hold a GPU lease, in
    /// milliseconds; past it the task or turn fails and the lease is
    /// released.
    pub max_lease_hold_ms: u64,
    /// Bytes of blobs the tenant may hold (the sizes of the blobs it has
    /// uploaded and that are still stored; bytes another tenant uploaded
    /// too count for both, though they are stored once). An upload past
    /// it is refused with 413; blobs the collector removes count no more.
    pub max_blob_bytes: u64,
    /// Blob uploads of the tenant in flight at once; 429 past it.
    pub max_uploads: usize,
    /// Workflows of the tenant started and not yet ended (waiting for a
    /// signal counts); 429 past it.
    pub max_workflows: usize,
}

impl Default for Quota {
    /// Priorities up to 1 (sessions run at 2, the top is kept for the
    /// operator), 4,096 tokens, 256 tasks, 256 streams, leases held at
    /// most 5 minutes, 1 GiB of blobs, 4 uploads at once, 256 workflows.
    fn default() -> Self {
        Self {
            max_priority: 1,
            max_tokens: 4_096,
            max_tasks: 256,
            max_streams: 256,
            max_lease_hold_ms: 300_000,
            max_blob_bytes: 1 << 30,
            max_uploads: 4,
            max_workflows: 256,
        }
    }
}

/// The HTTP server's limits (`[http]`). A router mounted in another server
/// carries the request-level ones (request time-out and concurrency, event
/// streams, hosts, origins); the connection-level ones (connections, the
/// header-read time-out, the write time-out) belong to the server that
/// runs it, which [`crate::serve`] is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Connections open at once; past it, new ones wait in the listen
    /// backlog until one closes.
    pub max_connections: usize,
    /// Longest time a client may take to send a request's headers, and
    /// longest a kept-alive connection may sit idle between requests
    /// (milliseconds); the connection is closed past it.
    pub header_read_timeout_ms: u64,
    /// Longest a write to a client may wait for it to read (milliseconds):
    /// a client that stops reading an event stream is cut off past it.
    pub write_timeout_ms: u64,
    /// Kernel send buffer of each connection, in bytes (`SO_SNDBUF`);
    /// absent: the system's autotuning (up to 4 MiB per connection on
    /// Linux by default). With thousands of event streams, a bound here
    /// bounds the memory a slow reader can pin, and makes the write
    /// time-out notice it sooner.
    pub send_buffer_bytes: Option<usize>,
    /// Requests handled at once, event streams and blob transfers apart
    /// (429 past it).
    pub max_requests: usize,
    /// Longest time to answer a request, event streams and blob transfers
    /// apart (milliseconds; 503 past it).
    pub request_timeout_ms: u64,
    /// Blob uploads and downloads at once (429 past it).
    pub max_transfers: usize,
    /// Longest blob upload or download (milliseconds).
    pub transfer_timeout_ms: u64,
    /// Event streams open at once over all sessions and tenants (429).
    pub max_streams: usize,
    /// Event streams open at once on one session (429).
    pub streams_per_session: usize,
    /// Host names accepted in `Host` (any port). Empty: the loopback names
    /// (`localhost`, `127.0.0.1`, `[::1]`) when listening on loopback, any
    /// host otherwise. Guards a local server against DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// Origins allowed to call the API from a browser (CORS), e.g.
    /// `https://app.example.com`. A request carrying any other `Origin`
    /// is refused with 403, so a web page cannot drive the API.
    pub cors_origins: Vec<String>,
    /// Serve with no tenants (every request is tenant `default`, no token)
    /// on an address beyond loopback. Off: such a configuration is refused.
    pub anonymous: bool,
    /// How long a stream ticket (`POST /v1/sessions/{id}/tickets`, for a
    /// browser's `EventSource`, which cannot send a bearer token) stays
    /// valid, in milliseconds. It opens one stream of one session, once.
    pub ticket_ttl_ms: u64,
    /// A bearer token `GET /metrics` requires (at least 32 characters;
    /// Prometheus sends one with `authorization: {credentials_file: ...}`
    /// in its scrape config). Unset, with `metrics_token_env` unset too:
    /// `/metrics` needs no token, as scrapers expect by default.
    pub metrics_token: Option<String>,
    /// The environment variable holding that token (read at start-up;
    /// keeps it out of the file).
    pub metrics_token_env: Option<String>,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            max_connections: 4_096,
            header_read_timeout_ms: 10_000,
            write_timeout_ms: 30_000,
            send_buffer_bytes: None,
            max_requests: 512,
            request_timeout_ms: 30_000,
            max_transfers: 16,
            transfer_timeout_ms: 600_000,
            max_streams: 1_024,
            streams_per_session: 64,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            anonymous: false,
            ticket_ttl_ms: 60_000,
            metrics_token: None,
            metrics_token_env: None,
        }
    }
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
        /// Request field that carries the lease priority, lower values
        /// first (`priority` for vLLM started with `--scheduling-policy
        /// priority`); not sent when absent.
        #[serde(default)]
        priority_field: Option<String>,
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
    /// Longest an inference may hold its lease, renewals included, in
    /// milliseconds (session turns and workflow steps; a tenant's tasks
    /// take the smaller of this and its `quota.max_lease_hold_ms`).
    pub lease_max_hold_ms: u64,
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
            lease_max_hold_ms: 600_000,
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
    /// Tenants. With none, requests need no token and belong to
    /// `default`: allowed on loopback only, unless `http.anonymous`.
    pub tenants: Vec<Tenant>,
    /// The HTTP server's limits, hosts and origins (`[http]`).
    pub http: HttpSection,
    /// The quota of requests when no tenants are configured (`[quota]`).
    pub quota: Quota,
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
            http: HttpSection::default(),
            quota: Quota::default(),
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
        if self.http.metrics_token_env.is_none() {
            self.http.resolve_metrics_token()?;
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
        let h = &self.http;
        if h.max_connections == 0
            || h.max_requests == 0
            || h.max_streams == 0
            || h.streams_per_session == 0
            || h.max_transfers == 0
        {
            return bad("[http] limits must be at least 1".into());
        }
        if h.header_read_timeout_ms == 0
            || h.write_timeout_ms == 0
            || h.request_timeout_ms == 0
            || h.transfer_timeout_ms == 0
            || h.ticket_ttl_ms == 0
        {
            return bad("[http] time-outs must be at least 1 ms".into());
        }
        if self.tenants.is_empty() && !self.listen.ip().is_loopback() && !h.anonymous {
            return bad(format!(
                "listening on {} with no tenants would serve anyone who can reach it: \
                 configure [[tenants]], listen on loopback, or set http.anonymous = true",
                self.listen
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut tokens = std::collections::HashSet::new();
        for t in &self.tenants {
            let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            if t.name.is_empty() || t.name.len() > 64 || !t.name.chars().all(plain) {
                return bad(format!(
                    "tenant `{}`: a name is 1 to 64 of `A-Z a-z 0-9 - _ .`",
                    t.name
                ));
            }
            if !names.insert(&t.name) {
                return bad(format!("tenant `{}`: the name is used twice", t.name));
            }
            if t.name == crate::ANONYMOUS_TENANT {
                return bad(format!(
                    "tenant `{}`: the name is kept for requests without tenants",
                    t.name
                ));
            }
            if t.token.is_empty() == t.token_env.is_none() {
                return bad(format!(
                    "tenant `{}`: give exactly one of `token` and `token_env`",
                    t.name
                ));
            }
            if t.token_env.is_none() {
                t.resolve_token()?;
                if !tokens.insert(&t.token) {
                    return bad(format!("tenant `{}`: token used twice", t.name));
                }
            }
            if t.quota.max_priority as usize >= troupe_gpu::scheduler::PRIORITIES {
                return bad(format!(
                    "tenant `{}`: quota.max_priority must be below {}",
                    t.name,
                    troupe_gpu::scheduler::PRIORITIES
                ));
            }
            let q = &t.quota;
            if q.max_tokens == 0
                || q.max_tasks == 0
                || q.max_streams == 0
                || q.max_lease_hold_ms == 0
                || q.max_uploads == 0
                || q.max_workflows == 0
            {
                return bad(format!(
                    "tenant `{}`: quota limits must be at least 1",
                    t.name
                ));
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
        assert_eq!(c.tenants[0].token_env.as_deref(), Some("TROUPE_TOKEN_ACME"));
        assert_eq!(c.tenants[0].quota, Quota::default());
        assert_eq!(c.http, HttpSection::default());
        let e = GatewayConfig::from_toml("listen = \"0.0.0.0:8080\"").unwrap_err();
        assert!(e.to_string().contains("http.anonymous"), "{e}");
        GatewayConfig::from_toml("listen = \"0.0.0.0:8080\"\n[http]\nanonymous = true").unwrap();
        let e = GatewayConfig::from_toml("[[tenants]]\nname = \"a\"\ntoken = \"short-token\"")
            .unwrap_err();
        assert!(e.to_string().contains("at least 32"), "{e}");
        let e = GatewayConfig::from_toml(
            "[[tenants]]\nname = \"default\"\ntoken = \"0123456789abcdef0123456789abcdef\"",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("kept for requests without tenants"),
            "{e}"
        );
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

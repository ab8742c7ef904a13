//! The connection to one MCP server, kept up by a supervising task, and
//! its tools as a [`ToolSource`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rand::Rng;
use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, ClientRequest, Implementation,
    MetaObject, PaginatedRequestParams, PingRequest, ProtocolVersion, RequestMetaObject,
    ServerResult,
};
use rmcp::service::{NotificationContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, Peer, RoleClient, ServiceError, ServiceExt};
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use troupe_agent::{Tool, ToolCallInfo, ToolSource, ToolSpec};

use crate::IDEMPOTENCY_META_KEY;
use crate::config::{McpServerConfig, McpTransport};
use crate::convert::{self, Listed};
use crate::error::McpError;

/// Lines of a child's standard error kept for the reason it exited.
const STDERR_TAIL_LINES: usize = 8;
/// Longest such line kept.
const STDERR_LINE: usize = 512;
/// How long a connection being closed may take to end.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Where a server's connection stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum McpStatus {
    /// Starting: spawning or connecting, the handshake, the first listing.
    Starting,
    /// Connected; its tools are offered.
    Up {
        /// The protocol revision agreed in the handshake.
        protocol: String,
        /// Tools offered (after the prefix, the name checks and the limit).
        tools: usize,
    },
    /// Not connected; it will be started again.
    Down {
        /// Why the last connection ended or the last start failed.
        reason: String,
        /// When the next start is.
        retry_in: Duration,
    },
    /// Given up after [`McpServerConfig::max_failures`] failed starts.
    Failed {
        /// The last failure.
        reason: String,
    },
    /// Stopped by [`McpServer::shutdown`] (or the last handle dropped).
    Stopped,
}

/// Counts of one server's connection, since it was started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct McpStats {
    /// Starts, the first included.
    pub starts: u64,
    /// `notifications/tools/list_changed` received.
    pub list_changes: u64,
    /// Tool listings read (one at each start, one per change).
    pub listings: u64,
    /// Calls sent.
    pub calls: u64,
    /// Calls that failed (the server's errors, time-outs, broken connections).
    pub failed_calls: u64,
    /// Tools of the last listing that are not offered, each with why.
    pub left_out: Vec<String>,
}

#[derive(Default)]
struct Shared {
    peer: Option<Peer<RoleClient>>,
    /// What the last listing offers (the server's name, the tool), in the
    /// server's order.
    offered: Vec<(String, Tool)>,
    /// The same, by offered name; kept while the server is down, so that
    /// a call made just before gets "down" rather than "unknown".
    by_name: BTreeMap<String, (String, Tool)>,
    left_out: Vec<String>,
    pid: Option<u32>,
    down: Option<String>,
    /// Counts connections: a call that finds one broken names the one it
    /// used, so that a report about an earlier connection is ignored.
    generation: u64,
}

struct Inner {
    config: McpServerConfig,
    shared: Mutex<Shared>,
    status: watch::Sender<McpStatus>,
    list_changed: Notify,
    broken: Notify,
    /// The generation a call last found broken.
    broken_generation: AtomicU64,
    starts: AtomicU64,
    list_changes: AtomicU64,
    listings: AtomicU64,
    calls: AtomicU64,
    failed_calls: AtomicU64,
}

/// Stops the supervising task when the last handle goes.
struct Handle {
    inner: Arc<Inner>,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One MCP server, connected and kept connected by a supervising task. See
/// the [crate docs](crate). Cheap to clone; the connection ends when the
/// last clone (and the last [`McpTools`] taken from it) is dropped, or at
/// [`McpServer::shutdown`].
#[derive(Clone)]
pub struct McpServer {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer")
            .field("name", &self.handle.inner.config.name)
            .field("status", &self.status())
            .finish()
    }
}

impl McpServer {
    /// Checks the configuration and starts the supervising task, which
    /// connects in the background (see [`McpServer::wait_up`]). Must be
    /// called inside a Tokio runtime.
    pub fn start(config: McpServerConfig) -> Result<Self, McpError> {
        config.validate()?;
        let (status, _) = watch::channel(McpStatus::Starting);
        let inner = Arc::new(Inner {
            config,
            shared: Mutex::new(Shared::default()),
            status,
            list_changed: Notify::new(),
            broken: Notify::new(),
            broken_generation: AtomicU64::new(0),
            starts: AtomicU64::new(0),
            list_changes: AtomicU64::new(0),
            listings: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            failed_calls: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(supervise(inner.clone(), stop.clone()));
        Ok(Self {
            handle: Arc::new(Handle {
                inner,
                stop,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.handle.inner.config.name
    }

    /// Where its connection stands now.
    pub fn status(&self) -> McpStatus {
        self.handle.inner.status.borrow().clone()
    }

    /// Follows the status as it changes.
    pub fn watch(&self) -> watch::Receiver<McpStatus> {
        self.handle.inner.status.subscribe()
    }

    /// Waits until the server is up, or has failed for good, or `within`
    /// passed. `Err` says why it is not up: the last failure when there
    /// was one.
    pub async fn wait_up(&self, within: Duration) -> Result<(), McpError> {
        let mut rx = self.watch();
        let waited = tokio::time::timeout(within, async {
            loop {
                let now = rx.borrow_and_update().clone();
                match now {
                    McpStatus::Up { .. } => return Ok(()),
                    McpStatus::Failed { reason } => return Err(reason),
                    McpStatus::Stopped => return Err("stopped".to_owned()),
                    _ => {}
                }
                if rx.changed().await.is_err() {
                    return Err("stopped".to_owned());
                }
            }
        })
        .await;
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(self.down(reason)),
            Err(_) => match self.status() {
                McpStatus::Down { reason, .. } => Err(self.down(reason)),
                _ => Err(McpError::Timeout {
                    server: self.name().to_owned(),
                    what: "coming up".to_owned(),
                    after: within,
                }),
            },
        }
    }

    fn down(&self, reason: String) -> McpError {
        McpError::Down {
            server: self.name().to_owned(),
            reason,
        }
    }

    /// The counts of its connection.
    pub fn stats(&self) -> McpStats {
        let inner = &self.handle.inner;
        McpStats {
            starts: inner.starts.load(Ordering::Relaxed),
            list_changes: inner.list_changes.load(Ordering::Relaxed),
            listings: inner.listings.load(Ordering::Relaxed),
            calls: inner.calls.load(Ordering::Relaxed),
            failed_calls: inner.failed_calls.load(Ordering::Relaxed),
            left_out: inner.shared.lock().unwrap().left_out.clone(),
        }
    }

    /// The process id of the child now running it (stdio only).
    pub fn pid(&self) -> Option<u32> {
        let shared = self.handle.inner.shared.lock().unwrap();
        shared.peer.as_ref().and(shared.pid)
    }

    /// What it offers now, as the model sees it (nothing while down).
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools()
            .list()
            .into_iter()
            .map(|t| t.spec().clone())
            .collect()
    }

    /// All its tools, as a source for [`troupe_agent::Tools::with_source`].
    pub fn tools(&self) -> Arc<McpTools> {
        Arc::new(McpTools {
            handle: self.handle.clone(),
            allow: None,
        })
    }

    /// Only the tools named in `names` (by the server's name or the
    /// offered one, with the prefix): an agent's allow-list. A name the
    /// server does not list is simply never offered.
    pub fn allow<I, S>(&self, names: I) -> Arc<McpTools>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Arc::new(McpTools {
            handle: self.handle.clone(),
            allow: Some(Arc::new(names.into_iter().map(Into::into).collect())),
        })
    }

    /// Calls the tool the server lists as `tool` (its own name, without the
    /// prefix) with `arguments` (a JSON object), outside any turn: nothing
    /// is journaled. The result is the text a model would get.
    pub async fn call(&self, tool: &str, arguments: Value) -> Result<String, McpError> {
        self.handle.inner.call(tool, arguments, None).await
    }

    /// Stops the supervising task and ends the connection (a child process
    /// gets its standard input closed, then `SIGTERM`, then `SIGKILL`);
    /// waits for it.
    pub async fn shutdown(&self) {
        self.handle.stop.cancel();
        let task = self.handle.task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// An [`McpServer`]'s tools, all or an allow-list of them, as a
/// [`ToolSource`] for an agent's [`troupe_agent::Tools`]. Holds the server
/// alive while an agent holds it.
pub struct McpTools {
    handle: Arc<Handle>,
    allow: Option<Arc<BTreeSet<String>>>,
}

impl McpTools {
    fn allowed(&self, offered: &str, remote: &str) -> bool {
        self.allow
            .as_ref()
            .is_none_or(|a| a.contains(offered) || a.contains(remote))
    }
}

impl ToolSource for McpTools {
    fn list(&self) -> Vec<Tool> {
        let shared = self.handle.inner.shared.lock().unwrap();
        if shared.peer.is_none() {
            return Vec::new();
        }
        shared
            .offered
            .iter()
            .filter(|(remote, t)| self.allowed(&t.spec().name, remote))
            .map(|(_, t)| t.clone())
            .collect()
    }

    fn find(&self, name: &str) -> Option<Tool> {
        let shared = self.handle.inner.shared.lock().unwrap();
        let (remote, tool) = shared.by_name.get(name)?;
        self.allowed(name, remote).then(|| tool.clone())
    }
}

impl Inner {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn set_status(&self, status: McpStatus) {
        let up = matches!(status, McpStatus::Up { .. });
        metrics::gauge!("troupe_mcp_up", "server" => self.config.name.clone()).set(if up {
            1.0
        } else {
            0.0
        });
        self.status.send_replace(status);
    }

    /// Sends one `tools/call`; `info` (inside a turn) gives the
    /// idempotency key.
    async fn call(
        &self,
        remote: &str,
        arguments: Value,
        info: Option<&ToolCallInfo>,
    ) -> Result<String, McpError> {
        let server = self.name().to_owned();
        let arguments = match arguments {
            Value::Object(m) => m,
            Value::Null => serde_json::Map::new(),
            other => {
                return Err(McpError::Arguments {
                    server,
                    tool: remote.to_owned(),
                    found: json_kind(&other),
                });
            }
        };
        let (peer, generation) = {
            let shared = self.shared.lock().unwrap();
            match &shared.peer {
                Some(p) => (p.clone(), shared.generation),
                None => {
                    return Err(McpError::Down {
                        server,
                        reason: shared
                            .down
                            .clone()
                            .unwrap_or_else(|| "not connected yet".to_owned()),
                    });
                }
            }
        };
        let mut params = CallToolRequestParams::new(remote.to_owned());
        params.arguments = Some(arguments);
        if let Some(info) = info.filter(|i| !i.session.is_empty()) {
            let mut meta = serde_json::Map::new();
            meta.insert(
                IDEMPOTENCY_META_KEY.to_owned(),
                Value::String(info.idempotency_key()),
            );
            params.meta = Some(RequestMetaObject(MetaObject(meta)));
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let what = || format!("tools/call `{remote}`");
        let max = self.config.max_result;
        let out = match tokio::time::timeout(self.config.call_timeout, peer.call_tool(params)).await
        {
            Err(_) => Err(McpError::Timeout {
                server: server.clone(),
                what: what(),
                after: self.config.call_timeout,
            }),
            Ok(Err(e)) => {
                if matches!(
                    e,
                    ServiceError::TransportClosed | ServiceError::TransportSend(_)
                ) {
                    self.broken_generation.store(generation, Ordering::Relaxed);
                    self.broken.notify_one();
                }
                Err(McpError::Request {
                    server: server.clone(),
                    what: what(),
                    source: Box::new(e),
                })
            }
            Ok(Ok(result)) => match convert::result_text(result) {
                Ok(text) if text.len() > max => Err(McpError::TooLarge {
                    server: server.clone(),
                    tool: remote.to_owned(),
                    size: text.len(),
                    limit: max,
                }),
                Ok(text) => Ok(text),
                Err(mut message) => {
                    truncate(&mut message, max);
                    Err(McpError::ToolFailed {
                        server: server.clone(),
                        tool: remote.to_owned(),
                        message,
                    })
                }
            },
        };
        let outcome = if out.is_ok() { "ok" } else { "failed" };
        if out.is_err() {
            self.failed_calls.fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!("troupe_mcp_calls_total", "server" => server, "outcome" => outcome)
            .increment(1);
        out
    }

    /// Reads the tool list page by page (stopping once past `max_tools`:
    /// a server cannot make the client hold more) and builds the tools to
    /// offer.
    async fn list(self: &Arc<Self>, peer: &Peer<RoleClient>) -> Result<Listing, McpError> {
        let timed_out = || McpError::Timeout {
            server: self.name().to_owned(),
            what: "tools/list".to_owned(),
            after: self.config.call_timeout,
        };
        let failed = |e| McpError::Request {
            server: self.name().to_owned(),
            what: "tools/list".to_owned(),
            source: Box::new(e),
        };
        let pages = async {
            let mut listed = Vec::new();
            let mut cursor = None;
            loop {
                let params = PaginatedRequestParams::default().with_cursor(cursor);
                let page = peer.list_tools(Some(params)).await.map_err(failed)?;
                listed.extend(page.tools);
                cursor = page.next_cursor;
                // One past the limit is enough to say some were left out.
                if cursor.is_none() || listed.len() > self.config.max_tools {
                    return Ok::<_, McpError>((listed, cursor.is_some()));
                }
            }
        };
        let (listed, more) = tokio::time::timeout(self.config.call_timeout, pages)
            .await
            .map_err(|_| timed_out())??;
        self.listings.fetch_add(1, Ordering::Relaxed);
        let mut listing = Listing::default();
        let mut seen = BTreeSet::new();
        for tool in &listed {
            match convert::listed(&self.config.prefix, tool) {
                Err(why) => listing.left_out.push(why),
                Ok(_) if listing.offered.len() >= self.config.max_tools => {
                    listing.left_out.push(format!(
                        "`{}`: past the limit of {} tools",
                        tool.name, self.config.max_tools
                    ))
                }
                Ok(l) if !seen.insert(l.spec.name.clone()) => listing
                    .left_out
                    .push(format!("`{}`: listed twice", l.spec.name)),
                Ok(l) => {
                    let remote = l.remote.clone();
                    let t = self.tool(l);
                    listing.offered.push((remote, t));
                }
            }
        }
        if more {
            listing.left_out.push(format!(
                "further pages of tools/list not read: past the limit of {} tools",
                self.config.max_tools
            ));
        }
        if !listing.left_out.is_empty() {
            tracing::warn!(server = %self.name(), left_out = ?listing.left_out, "MCP tools left out");
        }
        Ok(listing)
    }

    /// The Troupe tool that calls one listed tool.
    fn tool(self: &Arc<Self>, listed: Listed) -> Tool {
        let weak: Weak<Inner> = Arc::downgrade(self);
        let remote: Arc<str> = Arc::from(listed.remote.as_str());
        let offered: Arc<str> = Arc::from(listed.spec.name.as_str());
        let server: Arc<str> = Arc::from(self.name());
        let tool = Tool::from_spec(listed.spec, move |args, info| {
            let (weak, remote, offered, server) = (
                weak.clone(),
                remote.clone(),
                offered.clone(),
                server.clone(),
            );
            async move {
                let Some(inner) = weak.upgrade() else {
                    return Err(format!("MCP server `{server}` was stopped"));
                };
                inner
                    .call(&remote, args, Some(&info))
                    .await
                    .map_err(|e| match e {
                        McpError::Arguments { .. } => format!("bad arguments for `{offered}`: {e}"),
                        e => e.to_string(),
                    })
            }
        })
        // Its own time-out fires first, with the server's name in it.
        .timeout(self.config.call_timeout + Duration::from_secs(1));
        if listed.repeatable {
            tool
        } else {
            tool.at_most_once()
        }
    }

    /// Installs a listing, and with `peer` a new connection; answers how
    /// many tools are offered and the connection's generation.
    fn install(
        &self,
        peer: Option<Peer<RoleClient>>,
        listing: Listing,
        pid: Option<u32>,
    ) -> (usize, u64) {
        let mut shared = self.shared.lock().unwrap();
        if peer.is_some() {
            shared.peer = peer;
            shared.pid = pid;
            shared.down = None;
            shared.generation += 1;
        }
        shared.by_name = listing
            .offered
            .iter()
            .map(|(remote, t)| (t.spec().name.clone(), (remote.clone(), t.clone())))
            .collect();
        shared.offered = listing.offered;
        shared.left_out = listing.left_out;
        (shared.offered.len(), shared.generation)
    }

    fn disconnected(&self, reason: &str) {
        let mut shared = self.shared.lock().unwrap();
        shared.peer = None;
        shared.pid = None;
        shared.down = Some(reason.to_owned());
    }
}

#[derive(Default)]
struct Listing {
    offered: Vec<(String, Tool)>,
    left_out: Vec<String>,
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
}

/// Receives the server's notifications; only list changes matter here.
#[derive(Clone)]
struct Handler {
    inner: Weak<Inner>,
}

impl ClientHandler for Handler {
    fn on_tool_list_changed(
        &self,
        _context: NotificationContext<RoleClient>,
    ) -> impl Future<Output = ()> + Send + '_ {
        if let Some(inner) = self.inner.upgrade() {
            inner.list_changes.fetch_add(1, Ordering::Relaxed);
            inner.list_changed.notify_one();
        }
        std::future::ready(())
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("troupe", env!("CARGO_PKG_VERSION")),
        )
        .with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
    }
}

/// A child's standard error: its last lines, and the task reading them.
struct Stderr {
    tail: Arc<Mutex<VecDeque<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Stderr {
    /// `; its last words: …` with the child's last lines, once it closed
    /// its standard error (waited for a moment: it has exited, or is being
    /// stopped), or nothing when it wrote none.
    async fn last_words(self) -> String {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.reader).await;
        let tail: Vec<String> = self.tail.lock().unwrap().iter().cloned().collect();
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its last words: {}", tail.join(" | "))
        }
    }
}

/// A live connection.
struct Conn {
    running: RunningService<RoleClient, Handler>,
    ct: CancellationToken,
    stderr: Option<Stderr>,
    generation: u64,
}

/// Keeps the connection up: starts it, serves it until it ends, waits,
/// starts it again.
async fn supervise(inner: Arc<Inner>, stop: CancellationToken) {
    let backoff = inner.config.backoff;
    let mut delay = backoff.initial;
    let mut failures = 0u32;
    loop {
        inner.set_status(McpStatus::Starting);
        inner.starts.fetch_add(1, Ordering::Relaxed);
        let connect_timeout = inner.config.connect_timeout;
        let attempt = tokio::select! {
            _ = stop.cancelled() => break,
            r = tokio::time::timeout(connect_timeout, connect(&inner)) => match r {
                Ok(r) => r,
                Err(_) => Err(McpError::Timeout {
                    server: inner.name().to_owned(),
                    what: "starting, the handshake and the first tools/list".to_owned(),
                    after: connect_timeout,
                }),
            },
        };
        let reason = match attempt {
            Ok(conn) => {
                failures = 0;
                let up_since = Instant::now();
                let ended = serve(&inner, conn, &stop).await;
                if up_since.elapsed() >= backoff.reset_after {
                    delay = backoff.initial;
                }
                match ended {
                    None => break,
                    Some(reason) => reason,
                }
            }
            Err(e) => {
                failures += 1;
                e.to_string()
            }
        };
        inner.disconnected(&reason);
        if inner.config.max_failures.is_some_and(|max| failures >= max) {
            tracing::error!(server = %inner.name(), %reason, failures, "MCP server given up");
            inner.set_status(McpStatus::Failed { reason });
            return;
        }
        // Up to a quarter more, so that many servers do not restart in step.
        let jitter = rand::rng().random_range(0.0..0.25);
        let wait = delay.mul_f64(1.0 + jitter);
        tracing::warn!(server = %inner.name(), %reason, retry_in = ?wait, "MCP server down");
        metrics::counter!("troupe_mcp_restarts_total", "server" => inner.config.name.clone())
            .increment(1);
        inner.set_status(McpStatus::Down {
            reason,
            retry_in: wait,
        });
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        delay = (delay * 2).min(backoff.max);
    }
    inner.disconnected("stopped");
    inner.set_status(McpStatus::Stopped);
}

/// Starts the child or reaches the endpoint, shakes hands, lists the tools.
async fn connect(inner: &Arc<Inner>) -> Result<Conn, McpError> {
    let config = &inner.config;
    let handler = Handler {
        inner: Arc::downgrade(inner),
    };
    let ct = CancellationToken::new();
    let handshake = |e, last_words| McpError::Handshake {
        server: config.name.clone(),
        source: Box::new(e),
        last_words,
    };
    let (running, pid, stderr) = match &config.transport {
        McpTransport::Stdio {
            program,
            args,
            env,
            cwd,
        } => {
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args);
            for (k, v) in env {
                cmd.env(k, v);
            }
            if let Some(dir) = cwd {
                cmd.current_dir(dir);
            }
            let (child, err) = TokioChildProcess::builder(cmd)
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|source| McpError::Spawn {
                    server: config.name.clone(),
                    program: program.clone(),
                    source,
                })?;
            let pid = child.id();
            let stderr = err.map(|err| {
                let tail = Arc::new(Mutex::new(VecDeque::new()));
                let reader = tokio::spawn(read_stderr(config.name.clone(), err, tail.clone()));
                Stderr { tail, reader }
            });
            match handler.serve_with_ct(child, ct.clone()).await {
                Ok(running) => (running, pid, stderr),
                // The child's own words say more than "closed".
                Err(e) => {
                    let words = match stderr {
                        Some(stderr) => stderr.last_words().await,
                        None => String::new(),
                    };
                    return Err(handshake(e, words));
                }
            }
        }
        McpTransport::Http { url, bearer } => {
            let client = http_client(&config.name)?;
            let mut tc = StreamableHttpClientTransportConfig::with_uri(url.as_str())
                .max_json_response_size(config.max_message)
                .max_sse_event_size(config.max_message)
                .reinit_on_expired_session(true);
            if let Some(token) = bearer {
                tc = tc.auth_header(token.clone());
            }
            let transport = StreamableHttpClientTransport::with_client(client, tc);
            let running = handler
                .serve_with_ct(transport, ct.clone())
                .await
                .map_err(|e| handshake(e, String::new()))?;
            (running, None, None)
        }
    };
    let listing = inner.list(running.peer()).await?;
    let (_, generation) = inner.install(Some(running.peer().clone()), listing, pid);
    Ok(Conn {
        running,
        ct,
        stderr,
        generation,
    })
}

/// Serves a live connection until it ends (`Some(why)`) or the server is
/// stopped (`None`).
async fn serve(inner: &Arc<Inner>, conn: Conn, stop: &CancellationToken) -> Option<String> {
    let Conn {
        running,
        ct,
        stderr,
        generation,
    } = conn;
    let peer = running.peer().clone();
    let protocol = peer
        .peer_info()
        .map(|i| i.protocol_version.to_string())
        .unwrap_or_default();
    let tools = inner.shared.lock().unwrap().offered.len();
    tracing::info!(server = %inner.name(), %protocol, tools, "MCP server up");
    inner.set_status(McpStatus::Up {
        protocol: protocol.clone(),
        tools,
    });
    let mut quit = Box::pin(running.waiting());
    let mut ended = false;
    let mut health = tokio::time::interval(inner.config.health_interval);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.tick().await;
    let reason = loop {
        tokio::select! {
            _ = stop.cancelled() => break None,
            r = &mut quit => {
                ended = true;
                break Some(match r {
                    Ok(reason) => format!("the connection ended ({reason:?})"),
                    Err(e) => format!("the connection's task failed: {e}"),
                });
            }
            _ = inner.list_changed.notified() => match inner.list(&peer).await {
                Ok(listing) => {
                    let (tools, _) = inner.install(None, listing, None);
                    tracing::info!(server = %inner.name(), tools, "MCP tool list changed");
                    inner.set_status(McpStatus::Up { protocol: protocol.clone(), tools });
                }
                Err(e) => break Some(e.to_string()),
            },
            _ = inner.broken.notified() => {
                // A report about an earlier connection is stale.
                if inner.broken_generation.load(Ordering::Relaxed) == generation {
                    break Some("a call found the connection broken".to_owned());
                }
            }
            _ = health.tick() => {
                if let Err(e) = ping(&peer, inner.config.call_timeout).await {
                    break Some(format!("it did not answer a ping: {e}"));
                }
            }
        }
    };
    inner.disconnected(reason.as_deref().unwrap_or("stopped"));
    ct.cancel();
    if !ended {
        let _ = tokio::time::timeout(CLOSE_WAIT, quit).await;
    }
    let reason = reason?;
    Some(match stderr {
        Some(stderr) => reason + &stderr.last_words().await,
        None => reason,
    })
}

async fn ping(peer: &Peer<RoleClient>, within: Duration) -> Result<(), String> {
    let sent = peer.send_request(ClientRequest::PingRequest(PingRequest::default()));
    match tokio::time::timeout(within, sent).await {
        Err(_) => Err(format!("no answer within {within:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(ServerResult::EmptyResult(_))) => Ok(()),
        Ok(Ok(_)) => Err("an unexpected answer".to_owned()),
    }
}

/// Logs a child's standard error and keeps its last lines. A line is cut
/// at [`STDERR_LINE`] bytes as it is read (the rest, up to its newline, is
/// skipped), so a child that writes without newlines costs nothing more.
async fn read_stderr(
    server: String,
    err: tokio::process::ChildStderr,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut reader = tokio::io::BufReader::new(err);
    let mut line: Vec<u8> = Vec::with_capacity(STDERR_LINE);
    loop {
        let (used, ended) = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(buf) => match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (buf.len(), false),
            },
        };
        {
            let buf = reader.buffer();
            let text = &buf[..if ended { used - 1 } else { used }];
            let room = STDERR_LINE.saturating_sub(line.len());
            line.extend_from_slice(&text[..text.len().min(room)]);
        }
        reader.consume(used);
        if ended {
            let text = String::from_utf8_lossy(&line).trim_end().to_owned();
            line.clear();
            tracing::debug!(server = %server, "{text}");
            let mut t = tail.lock().unwrap();
            if t.len() == STDERR_TAIL_LINES {
                t.pop_front();
            }
            t.push_back(text);
        }
    }
}

/// The HTTP client: rustls with the ring provider and the Web PKI roots.
fn http_client(server: &str) -> Result<reqwest_013::Client, McpError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| McpError::Config {
            server: server.to_owned(),
            message: format!("TLS: {e}"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest_013::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(|source| McpError::Http {
            server: server.to_owned(),
            source,
        })
}

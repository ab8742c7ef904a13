//! # Troupe across machines (feature `cluster`)
//!
//! A cluster is a set of Troupe processes (*nodes*) connected by
//! [`ractor_cluster`]: each node runs a ractor `NodeServer`, nodes
//! authenticate each other with a shared cookie (and, optionally, mutual
//! TLS), and ractor's process groups tell every node which nodes are up and
//! what they host. On top of that, this module gives you three things:
//!
//! | you want | use |
//! |---|---|
//! | reach an agent on any node by name | [`ClusterNode::expose`] on the node that runs it, [`ClusterNode::agent`] anywhere: [`AgentRef::tell`], [`AgentRef::ask`] |
//! | durable entities (sessions, sagas) spread over the nodes, moving when a node leaves | [`ClusterNode::host`] (a node that runs them) or [`ClusterNode::entity_client`] (one that only calls them): [`ClusterEntities::ask`] |
//! | GPU work admitted on whichever node has capacity, or refused with a retry hint | [`ClusterNode::host_gpu`], [`ClusterGpu::run`] |
//!
//! **Messages.** What crosses nodes is serialized with MessagePack
//! (`rmp-serde`): agent messages, entity requests and replies, and GPU task
//! inputs and outputs are ordinary `serde` types (see [`Wire`]). When the
//! target is on the calling node, nothing is serialized: the message goes
//! straight to the actor's mailbox.
//!
//! **Placement.** Each entity kind has a consistent-hash ring ([`HashRing`])
//! over the live nodes that host it; a key's owner is the same on every node
//! that sees the same members. A request reaching a node that is not the
//! owner is forwarded (at most [`ClusterConfig::max_hops`] times). When the
//! members change, each node passivates the entities it no longer owns, and
//! the new owner activates them from the journal on their next message. With
//! a shared journal ([`Placement::Shared`], e.g. PostgreSQL) that is a
//! fail-over; with node-local RocksDB ([`Placement::NodeLocal`]) an entity
//! lives on its home node only, and while that node is down callers get
//! [`ClusterError::EntityUnavailable`].
//!
//! **Consistency.** Nodes learn about a member leaving at slightly different
//! times. Two nodes may briefly both believe they own a key; the journal's
//! optimistic append (a `SeqConflict` for the stale writer) keeps the event
//! stream single-writer, and the stale node's entity restarts from the
//! journal. A request whose node dies with it in flight fails with
//! [`ClusterError::NodeDown`] or `Timeout`: its outcome is unknown, as with
//! any remote call, so make retried requests idempotent.
//!
//! Build with `--features cluster`. ractor's cluster configuration removes
//! its blanket `impl Message for T`, so in such a build every message type
//! of yours needs an (empty) `impl ractor::Message for MyMsg {}`; Troupe's
//! own types have theirs.

mod agents;
mod entities;
mod error;
mod gpu;
mod ring;
mod services;
mod tls;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{IncomingEncryptionMode, NodeServer, NodeServerMessage};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use agents::{AgentRef, Expose};
pub use entities::{ClusterEntities, ClusterEntity};
pub use error::ClusterError;
pub use gpu::{ClusterGpu, GpuNeed, GpuRun, NodeGpuCapacity};
pub use ring::{DEFAULT_VNODES, HashRing};
pub use services::{
    ClusterSagas, ClusterSessions, Keyed, SagaReply, SagaRequest, SessionReply, SessionRequest,
};
pub use tls::TlsConfig;

/// What may cross nodes: any `serde` type that owns its data.
pub trait Wire: Serialize + DeserializeOwned + Send + 'static {}
impl<T: Serialize + DeserializeOwned + Send + 'static> Wire for T {}

/// The process-group scope of Troupe's cluster groups.
const SCOPE: &str = "troupe.cluster";

/// Where entities' journals live, which decides what happens when a node
/// leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A journal every node reaches (PostgreSQL): an entity is owned by a
    /// live node hosting its kind, and moves when members change.
    Shared,
    /// Each node journals into its own RocksDB: an entity's home is fixed
    /// by a ring over these node names (the configured cluster), and while
    /// its home is down the entity is unavailable.
    NodeLocal {
        /// Every node of the cluster, by name.
        members: Vec<String>,
    },
}

/// Settings of one node. (`Debug` does not print the cookie.)
#[derive(Clone)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster (letters, digits, `-`, `_`, `.`).
    pub node_name: String,
    /// Address the node server listens on (port 0: a free port).
    pub listen: SocketAddr,
    /// Address peers should dial (defaults to `listen` with the port chosen).
    pub advertise: Option<SocketAddr>,
    /// Shared secret: nodes with another cookie are refused.
    pub cookie: String,
    /// Nodes to join through; the others are found from them.
    pub seeds: Vec<SocketAddr>,
    /// Mutual TLS between nodes (None: plain TCP, for trusted networks).
    pub tls: Option<TlsConfig>,
    /// Where entities' journals live.
    pub placement: Placement,
    /// Ring points per node.
    pub vnodes: u32,
    /// Default time-out of calls to other nodes.
    pub call_timeout: Duration,
    /// Most remote calls this node serves at once; more are refused with
    /// [`ClusterError::Overloaded`].
    pub max_inflight_calls: usize,
    /// Largest frame accepted from a peer, in bytes (bigger: the peer is
    /// disconnected). Every node should use the same value.
    pub max_frame_bytes: u64,
    /// Most times a request is forwarded between nodes.
    pub max_hops: u8,
    /// How long [`ClusterNode::start`] tries the seeds.
    pub join_timeout: Duration,
    /// How often a node pings each peer, learns the peers' peers and
    /// redials peers it lost.
    pub heartbeat_interval: Duration,
    /// Consecutive unanswered pings after which a peer is disconnected
    /// (and leaves the members): a hung process or a lost network is found
    /// in about `heartbeat_interval * heartbeat_misses`, not when TCP gives
    /// up.
    pub heartbeat_misses: u32,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("node_name", &self.node_name)
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("cookie", &"<redacted>")
            .field("seeds", &self.seeds)
            .field("tls", &self.tls)
            .field("placement", &self.placement)
            .field("vnodes", &self.vnodes)
            .field("call_timeout", &self.call_timeout)
            .field("max_inflight_calls", &self.max_inflight_calls)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_hops", &self.max_hops)
            .field("join_timeout", &self.join_timeout)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("heartbeat_misses", &self.heartbeat_misses)
            .finish()
    }
}

impl ClusterConfig {
    /// A node named `node_name` listening on `listen`, with defaults: shared
    /// placement, 64 ring points, 5 s calls, 4,096 calls in flight, 16 MiB
    /// frames, 3 hops, 10 s to join, a ping every second and 5 missed
    /// pings to disconnect a peer.
    pub fn new(
        node_name: impl Into<String>,
        listen: SocketAddr,
        cookie: impl Into<String>,
    ) -> Self {
        Self {
            node_name: node_name.into(),
            listen,
            advertise: None,
            cookie: cookie.into(),
            seeds: Vec::new(),
            tls: None,
            placement: Placement::Shared,
            vnodes: DEFAULT_VNODES,
            call_timeout: Duration::from_secs(5),
            max_inflight_calls: 4_096,
            max_frame_bytes: 16 << 20,
            max_hops: 3,
            join_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_misses: 5,
        }
    }

    /// Joins through `seeds`.
    pub fn seeds(mut self, seeds: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.seeds = seeds.into_iter().collect();
        self
    }

    /// Uses mutual TLS.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets the placement.
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    fn validate(&self) -> Result<(), ClusterError> {
        let name_ok = !self.node_name.is_empty()
            && self.node_name.len() <= 128
            && self
                .node_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err(ClusterError::Config(format!(
                "node name `{}` must be 1 to 128 letters, digits, `-`, `_` or `.`",
                self.node_name
            )));
        }
        if self.cookie.is_empty() {
            return Err(ClusterError::Config("the cookie must not be empty".into()));
        }
        if self.max_inflight_calls == 0
            || self.max_frame_bytes < 64 * 1024
            || self.max_hops == 0
            || self.heartbeat_misses == 0
            || self.heartbeat_interval.is_zero()
        {
            return Err(ClusterError::Config(
                "max_inflight_calls, max_hops and heartbeat_misses must be at least 1, \
                 heartbeat_interval above zero, max_frame_bytes at least 64 KiB"
                    .into(),
            ));
        }
        if let Placement::NodeLocal { members } = &self.placement
            && !members.contains(&self.node_name)
        {
            return Err(ClusterError::Config(format!(
                "node-local placement lists {members:?}, which must include this node `{}`",
                self.node_name
            )));
        }
        Ok(())
    }
}

/// Frames between node actors (MessagePack inside ractor's own framing).
#[derive(Debug, Serialize, Deserialize)]
enum Frame {
    /// A tell to an exposed agent.
    Tell {
        agent: String,
        body: serde_bytes::ByteBuf,
    },
    /// An ask to an exposed agent.
    Ask {
        agent: String,
        body: serde_bytes::ByteBuf,
        timeout_ms: u64,
    },
    /// A request to an entity.
    Entity {
        kind: String,
        key: String,
        body: serde_bytes::ByteBuf,
        hops: u8,
        timeout_ms: u64,
    },
    /// The sender's peers, so that it can connect to them (transitive
    /// joins over TLS too).
    Peers,
    /// Are you there? (heartbeat)
    Ping,
    /// GPU capacity of the node.
    GpuCapacity,
    /// Run a GPU task under a local lease.
    GpuRun {
        kind: String,
        need: GpuNeed,
        body: serde_bytes::ByteBuf,
        timeout_ms: u64,
    },
}

type Reply = Result<serde_bytes::ByteBuf, ClusterError>;

/// The node actor's messages: one per process, the only actor other nodes
/// talk to.
#[derive(ractor_cluster::RactorClusterMessage)]
enum NodeMsg {
    /// A one-way frame.
    Deliver(Vec<u8>),
    /// A frame that wants a [`Reply`].
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

/// Encodes a frame's payload with field names (MessagePack maps, as the
/// journal does): Troupe's types leave empty optional fields out
/// (`skip_serializing_if`), which only a named encoding survives; in the
/// compact one every later field would shift into the skipped one's place.
fn encode<T: Serialize + ?Sized>(node: &str, what: &str, v: &T) -> Result<Vec<u8>, ClusterError> {
    rmp_serde::to_vec_named(v).map_err(|e| ClusterError::Codec {
        node: node.to_owned(),
        op: "encode".into(),
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

/// A target actor's refusal, as it crosses nodes.
fn rejected(node: &str, target: &str, e: &troupe_actor::ActorError) -> ClusterError {
    use troupe_actor::ActorError as A;
    ClusterError::Rejected {
        node: node.to_owned(),
        target: target.to_owned(),
        reason: e.to_string(),
        // NoReply: the actor failed with the message in hand (for an entity,
        // a stale owner meeting the new owner's events, a journal error); it
        // recovers and a retry finds the true state.
        retryable: e.is_transient() || matches!(e, A::NoReply { .. }),
    }
}

fn decode<T: DeserializeOwned>(node: &str, what: &str, bytes: &[u8]) -> Result<T, ClusterError> {
    rmp_serde::from_slice(bytes).map_err(|e| ClusterError::Codec {
        node: node.to_owned(),
        op: "decode".into(),
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

/// What this node knows of the others, rebuilt on every membership change.
#[derive(Default)]
struct View {
    /// Live nodes (this one included) and their node actors.
    nodes: BTreeMap<String, ActorCell>,
    /// Nodes exposing each agent name.
    agents: HashMap<String, Vec<String>>,
    /// Ring of each entity kind.
    kinds: HashMap<String, HashRing>,
    /// Nodes hosting GPU tasks of each kind.
    gpu: HashMap<String, Vec<String>>,
}

/// Where a message goes.
enum Route {
    Local,
    Remote(String, ActorCell),
}

type KindDispatch =
    Arc<dyn Fn(String, Vec<u8>, Duration) -> BoxFuture<'static, Reply> + Send + Sync>;
type Rebalance = Arc<dyn Fn(Arc<HashRing>, String) -> BoxFuture<'static, usize> + Send + Sync>;

struct Inner {
    name: String,
    addr: SocketAddr,
    config: ClusterConfig,
    server: ActorRef<NodeServerMessage>,
    actor: OnceLock<ActorRef<NodeMsg>>,
    tls: Option<tls::Tls>,
    view: ArcSwap<View>,
    members: tokio::sync::watch::Sender<Vec<String>>,
    agents: RwLock<HashMap<String, Arc<agents::Exposed>>>,
    kinds: RwLock<HashMap<String, (KindDispatch, Rebalance)>>,
    gpu: RwLock<Option<Arc<gpu::GpuHost>>>,
    inflight: Arc<tokio::sync::Semaphore>,
    rr: AtomicUsize,
    addrs: RwLock<HashMap<String, SocketAddr>>,
    /// Serializes view rebuilds, so that no change is acted on twice or lost.
    refreshing: std::sync::Mutex<()>,
    /// One hand-over at a time per kind.
    rebalancing: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Set by shutdown: the maintenance loop ends.
    closed: std::sync::atomic::AtomicBool,
    /// A periodic peer sync is running.
    syncing: std::sync::atomic::AtomicBool,
}

/// The encoded `Frame::Ping` (compared byte for byte by the node actor).
static PING_FRAME: std::sync::LazyLock<Vec<u8>> =
    std::sync::LazyLock::new(|| rmp_serde::to_vec(&Frame::Ping).expect("a unit variant encodes"));

/// Heartbeat rounds between two exchanges of peer lists.
const PEER_SYNC_ROUNDS: u64 = 10;

/// Room left in a frame for ractor's own envelope.
const FRAME_OVERHEAD: u64 = 4 * 1024;

/// A running node. Cheap to clone; [`ClusterNode::shutdown`] leaves the
/// cluster.
#[derive(Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("name", &self.inner.name)
            .field("addr", &self.inner.addr)
            .finish()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl ClusterNode {
    /// Starts the node server and the node actor, then joins through the
    /// seeds (if any): returns once at least one other node is a member, or
    /// fails with [`ClusterError::Join`] after `join_timeout`.
    pub async fn start(config: ClusterConfig) -> Result<Self, ClusterError> {
        config.validate()?;
        let name = config.node_name.clone();
        let start_err = |reason: String| ClusterError::Start {
            node: name.clone(),
            reason,
        };
        let mut listen = config.listen;
        if listen.port() == 0 {
            // ractor's listener does not report the port it chose: pick one.
            let probe = std::net::TcpListener::bind(listen)
                .map_err(|e| start_err(format!("no free port on {listen}: {e}")))?;
            listen.set_port(
                probe
                    .local_addr()
                    .map_err(|e| start_err(e.to_string()))?
                    .port(),
            );
        }
        let addr = match config.advertise {
            Some(a) => a,
            None => listen,
        };
        let tls = config.tls.as_ref().map(tls::Tls::load).transpose()?;
        let encryption = tls
            .as_ref()
            .map(|t| IncomingEncryptionMode::Tls(t.acceptor.clone()));
        let server = NodeServer::new(
            listen.port(),
            config.cookie.clone(),
            name.clone(),
            addr.ip().to_string(),
            encryption,
            // Troupe finds peers itself (Frame::Peers), so that TLS
            // clusters connect transitively too.
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(listen.ip())
        .with_max_inbound_frame_size(config.max_frame_bytes);
        let (server, _) = Actor::spawn(None, server, ())
            .await
            .map_err(|e| start_err(format!("node server: {e}")))?;
        // (The listener binds in the server's own start-up, which
        // `spawn` waits for: the port is open now.)
        let (members, _) = tokio::sync::watch::channel(Vec::new());
        let inner = Arc::new(Inner {
            name: name.clone(),
            addr,
            inflight: Arc::new(tokio::sync::Semaphore::new(config.max_inflight_calls)),
            config,
            server,
            actor: OnceLock::new(),
            tls,
            view: ArcSwap::from_pointee(View::default()),
            members,
            agents: RwLock::new(HashMap::new()),
            kinds: RwLock::new(HashMap::new()),
            gpu: RwLock::new(None),
            rr: AtomicUsize::new(0),
            addrs: RwLock::new(HashMap::new()),
            refreshing: std::sync::Mutex::new(()),
            rebalancing: std::sync::Mutex::new(HashMap::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
            syncing: std::sync::atomic::AtomicBool::new(false),
        });
        let actor = match Actor::spawn(None, NodeActor, Arc::downgrade(&inner)).await {
            Ok((actor, _)) => actor,
            Err(e) => {
                inner.server.stop(None);
                return Err(start_err(format!("node actor: {e}")));
            }
        };
        let _ = inner.actor.set(actor.clone());
        ractor::pg::monitor_scope(SCOPE.to_owned(), actor.get_cell());
        inner.join_group(format!("node:{name}"));
        inner.refresh();
        tokio::spawn(maintain(Arc::downgrade(&inner)));
        let node = Self { inner };
        if let Err(e) = node.join_seeds().await {
            node.shutdown().await;
            return Err(e);
        }
        Ok(node)
    }

    async fn join_seeds(&self) -> Result<(), ClusterError> {
        let seeds = self.inner.config.seeds.clone();
        if seeds.is_empty() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + self.inner.config.join_timeout;
        let mut members = self.inner.members.subscribe();
        let mut last = String::from("no answer");
        loop {
            let dials = seeds
                .iter()
                .filter(|s| **s != self.inner.addr)
                .map(|s| self.inner.connect(*s));
            for r in futures::future::join_all(dials).await {
                if let Err(e) = r {
                    last = e.to_string();
                }
            }
            let waited = tokio::time::timeout_at(
                (tokio::time::Instant::now() + Duration::from_millis(500)).min(deadline),
                members.wait_for(|m| m.len() > 1),
            )
            .await;
            if matches!(waited, Ok(Ok(_))) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClusterError::Join {
                    seeds: format!("{seeds:?}"),
                    reason: format!(
                        "{last} (or the handshake failed: check the cookie and TLS settings)"
                    ),
                });
            }
        }
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The address peers dial.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Connects to one more node (and, through it, to its peers).
    pub async fn connect(&self, addr: SocketAddr) -> Result<(), ClusterError> {
        self.inner.connect(addr).await
    }

    /// Live nodes, this one included, sorted by name.
    pub fn members(&self) -> Vec<String> {
        self.inner.view.load().nodes.keys().cloned().collect()
    }

    /// Waits until `pred` holds for the live members (sorted names), or
    /// `timeout` passes; returns the members it saw last.
    pub async fn wait_for_members(
        &self,
        pred: impl Fn(&[String]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<String>, ClusterError> {
        let mut rx = self.inner.members.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|m| pred(m))).await {
            Ok(Ok(m)) => Ok(m.clone()),
            _ => Err(ClusterError::Timeout {
                node: self.inner.name.clone(),
                operation: format!("waiting for members (now {:?})", self.members()),
                after: timeout,
            }),
        }
    }

    /// The node that owns entity `key` of `kind` now.
    /// (With node-local placement, the home node, whether it is up or not.)
    pub fn owner_of(&self, kind: &str, key: &str) -> Result<String, ClusterError> {
        let view = self.inner.view.load();
        view.kinds
            .get(kind)
            .and_then(|ring| ring.owner(key))
            .map(str::to_owned)
            .ok_or_else(|| ClusterError::NoOwner {
                kind: kind.to_owned(),
            })
    }

    /// Leaves the cluster: stops the node actor (peers see it leave) and the
    /// node server (connections close).
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        if let Some(a) = self.inner.actor.get() {
            a.stop(None);
        }
        self.inner.server.stop(None);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Inner {
    fn actor(&self) -> &ActorRef<NodeMsg> {
        self.actor
            .get()
            .expect("the node actor starts before the node is returned")
    }

    fn join_group(&self, group: String) {
        ractor::pg::join_scoped(SCOPE.to_owned(), group, vec![self.actor().get_cell()]);
    }

    /// Dials `addr` (TCP, then TLS if configured) within the call
    /// time-out; the handshake goes on in the node server.
    async fn connect(&self, addr: SocketAddr) -> Result<(), ClusterError> {
        let dial = async {
            match &self.tls {
                Some(t) => {
                    ractor_cluster::client_connect_enc(
                        &self.server,
                        addr,
                        t.connector.clone(),
                        t.server_name.clone(),
                    )
                    .await
                }
                None => ractor_cluster::client_connect(&self.server, addr).await,
            }
        };
        let failed = |reason: String| ClusterError::Join {
            seeds: addr.to_string(),
            reason,
        };
        match tokio::time::timeout(self.config.call_timeout, dial).await {
            Ok(r) => r.map_err(|e| failed(e.to_string())),
            Err(_) => Err(failed(format!(
                "no connection within {:?}",
                self.config.call_timeout
            ))),
        }
    }

    /// Rebuilds the view from the process groups and, when members or
    /// rings changed, acts on it ([`Inner::after_change`]). Serialized, so
    /// that every change is acted on once, in order, whoever calls.
    fn refresh(self: &Arc<Self>) {
        let _one = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
        let scope = SCOPE.to_owned();
        let groups = ractor::pg::which_scoped_groups(&scope);
        let mut view = View::default();
        let mut names = HashMap::new();
        for g in &groups {
            // A node restarted under its name while its old session lingers
            // has two cells: the newest session has the highest node id.
            if let Some(n) = g.strip_prefix("node:")
                && let Some(c) = ractor::pg::get_scoped_members(&scope, g)
                    .into_iter()
                    .max_by_key(|c| c.get_id().node())
            {
                names.insert(c.get_id(), n.to_owned());
                view.nodes.insert(n.to_owned(), c);
            }
        }
        let hosts = |g: &str| -> Vec<String> {
            let mut v: Vec<String> = ractor::pg::get_scoped_members(&scope, &g.to_owned())
                .iter()
                .filter_map(|c| names.get(&c.get_id()).cloned())
                .collect();
            v.sort();
            v.dedup();
            v
        };
        for g in &groups {
            if let Some(a) = g.strip_prefix("agent:") {
                let h = hosts(g);
                if !h.is_empty() {
                    view.agents.insert(a.to_owned(), h);
                }
            } else if let Some(k) = g.strip_prefix("kind:") {
                let ring = match &self.config.placement {
                    Placement::Shared => HashRing::new(hosts(g), self.config.vnodes),
                    Placement::NodeLocal { members } => {
                        HashRing::new(members.clone(), self.config.vnodes)
                    }
                };
                view.kinds.insert(k.to_owned(), ring);
            } else if let Some(k) = g.strip_prefix("gpu:") {
                view.gpu.insert(k.to_owned(), hosts(g));
            }
        }
        // Kinds hosted here but not yet seen in the groups still route here.
        for kind in read(&self.kinds).keys() {
            view.kinds
                .entry(kind.clone())
                .or_insert_with(|| match &self.config.placement {
                    Placement::Shared => HashRing::new([self.name.clone()], self.config.vnodes),
                    Placement::NodeLocal { members } => {
                        HashRing::new(members.clone(), self.config.vnodes)
                    }
                });
        }
        let members: Vec<String> = view.nodes.keys().cloned().collect();
        let changed = {
            let old = self.view.load();
            old.nodes.keys().ne(members.iter())
                || old.kinds != view.kinds
                || old
                    .nodes
                    .values()
                    .map(|c| c.get_id())
                    .ne(view.nodes.values().map(|c| c.get_id()))
        };
        self.view.store(Arc::new(view));
        metrics::gauge!("troupe_cluster_members").set(members.len() as f64);
        self.members.send_if_modified(|m| {
            if *m != members {
                *m = members;
                true
            } else {
                false
            }
        });
        if changed {
            self.after_change();
        }
    }

    /// Hosts keyed kind `kind` here: joins its ring.
    fn register_kind(
        self: &Arc<Self>,
        kind: &str,
        dispatch: KindDispatch,
        rebalance: Rebalance,
    ) -> Result<(), ClusterError> {
        {
            let mut kinds = write(&self.kinds);
            if kinds.contains_key(kind) {
                return Err(ClusterError::Config(format!(
                    "kind `{kind}` is already hosted on node `{}`",
                    self.name
                )));
            }
            kinds.insert(kind.to_owned(), (dispatch, rebalance));
        }
        self.join_group(format!("kind:{kind}"));
        self.refresh();
        Ok(())
    }

    fn node_cell(&self, node: &str) -> Option<ActorCell> {
        self.view.load().nodes.get(node).cloned()
    }

    fn route_entity(&self, kind: &str, key: &str) -> Result<Route, ClusterError> {
        let view = self.view.load();
        let ring = view.kinds.get(kind).ok_or_else(|| ClusterError::NoOwner {
            kind: kind.to_owned(),
        })?;
        let owner = ring.owner(key).ok_or_else(|| ClusterError::NoOwner {
            kind: kind.to_owned(),
        })?;
        if owner == self.name {
            return Ok(Route::Local);
        }
        match view.nodes.get(owner) {
            Some(c) => Ok(Route::Remote(owner.to_owned(), c.clone())),
            None => Err(ClusterError::EntityUnavailable {
                kind: kind.to_owned(),
                key: key.to_owned(),
                node: owner.to_owned(),
            }),
        }
    }

    /// Refuses a frame that the peer would drop the connection for.
    fn check_size(&self, node: &str, what: &str, len: usize) -> Result<(), ClusterError> {
        let limit = self.config.max_frame_bytes.saturating_sub(FRAME_OVERHEAD);
        if len as u64 > limit {
            return Err(ClusterError::TooLarge {
                node: node.to_owned(),
                what: what.to_owned(),
                bytes: len as u64,
                limit,
            });
        }
        Ok(())
    }

    /// Sends `frame` to `node` one way.
    fn cast(&self, node: &str, cell: &ActorCell, frame: &Frame) -> Result<(), ClusterError> {
        let bytes = encode(&self.name, "frame", frame)?;
        self.check_size(node, "tell", bytes.len())?;
        let actor: ActorRef<NodeMsg> = cell.clone().into();
        metrics::counter!("troupe_cluster_frames_sent_total", "kind" => "tell").increment(1);
        actor
            .cast(NodeMsg::Deliver(bytes))
            .map_err(|e| ClusterError::NodeDown {
                node: node.to_owned(),
                reason: e.to_string(),
            })
    }

    /// Calls `node` with `frame` and waits up to `timeout` for its reply.
    async fn call(
        &self,
        node: &str,
        cell: &ActorCell,
        frame: &Frame,
        operation: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClusterError> {
        let bytes = encode(&self.name, "frame", frame)?;
        self.check_size(node, operation, bytes.len())?;
        let actor: ActorRef<NodeMsg> = cell.clone().into();
        metrics::counter!("troupe_cluster_frames_sent_total", "kind" => "call").increment(1);
        let r = actor
            .call(|port| NodeMsg::Call(bytes, port), Some(timeout))
            .await;
        let reply = match r {
            Ok(ractor::rpc::CallResult::Success(reply)) => reply,
            Ok(ractor::rpc::CallResult::Timeout) => {
                return Err(ClusterError::Timeout {
                    node: node.to_owned(),
                    operation: operation.to_owned(),
                    after: timeout,
                });
            }
            Ok(ractor::rpc::CallResult::SenderError) => {
                return Err(ClusterError::NodeDown {
                    node: node.to_owned(),
                    reason: format!("`{operation}` lost its reply: the connection closed"),
                });
            }
            Err(e) => {
                return Err(ClusterError::NodeDown {
                    node: node.to_owned(),
                    reason: e.to_string(),
                });
            }
        };
        let reply: Reply = decode(&self.name, "reply", &reply)?;
        reply.map(|b| b.into_vec())
    }

    /// Serves an entity request: locally if this node owns the key,
    /// otherwise forwarded to the owner.
    async fn serve_entity(
        self: Arc<Self>,
        kind: String,
        key: String,
        body: Vec<u8>,
        hops: u8,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClusterError> {
        match self.route_entity(&kind, &key)? {
            Route::Local => {
                let dispatch = read(&self.kinds).get(&kind).map(|(d, _)| d.clone());
                match dispatch {
                    Some(d) => d(key, body, timeout).await.map(|b| b.into_vec()),
                    None => Err(ClusterError::NoOwner { kind }),
                }
            }
            Route::Remote(node, cell) => {
                if hops >= self.config.max_hops {
                    return Err(ClusterError::Misrouted {
                        target: format!("{kind}/{key}"),
                        hops,
                    });
                }
                let frame = Frame::Entity {
                    kind: kind.clone(),
                    key,
                    body: serde_bytes::ByteBuf::from(body),
                    hops: hops + 1,
                    timeout_ms: timeout.as_millis() as u64,
                };
                // A little longer than the owner's own time-out, so that its
                // answer (a time-out included) gets back.
                let wait = timeout + Duration::from_millis(500);
                self.call(&node, &cell, &frame, &format!("entity {kind}"), wait)
                    .await
            }
        }
    }

    /// Sends an entity request to `via`, which forwards it to the owner
    /// (or serves it, if it is the owner).
    async fn entity_via(
        self: Arc<Self>,
        via: &str,
        kind: &str,
        key: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClusterError> {
        if via == self.name {
            return self
                .serve_entity(kind.to_owned(), key.to_owned(), body, 0, timeout)
                .await;
        }
        let cell = self.node_cell(via).ok_or_else(|| ClusterError::NodeDown {
            node: via.to_owned(),
            reason: "not a member".into(),
        })?;
        let frame = Frame::Entity {
            kind: kind.to_owned(),
            key: key.to_owned(),
            body: serde_bytes::ByteBuf::from(body),
            hops: 0,
            timeout_ms: timeout.as_millis() as u64,
        };
        // Room for the forward and the owner's own time-out.
        let wait = timeout + Duration::from_secs(1);
        self.call(
            via,
            &cell,
            &frame,
            &format!("entity {kind} via {via}"),
            wait,
        )
        .await
    }

    /// Serves one call frame from another node.
    async fn serve(self: Arc<Self>, frame: Frame) -> Result<Vec<u8>, ClusterError> {
        match frame {
            Frame::Ask {
                agent,
                body,
                timeout_ms,
            } => {
                let exposed = read(&self.agents).get(&agent).cloned();
                let Some(exposed) = exposed else {
                    return Err(ClusterError::UnknownAgent { name: agent });
                };
                exposed
                    .ask_remote(
                        &self.name,
                        body.into_vec(),
                        Duration::from_millis(timeout_ms),
                    )
                    .await
            }
            Frame::Entity {
                kind,
                key,
                body,
                hops,
                timeout_ms,
            } => {
                self.serve_entity(
                    kind,
                    key,
                    body.into_vec(),
                    hops,
                    Duration::from_millis(timeout_ms),
                )
                .await
            }
            Frame::Ping => Ok(Vec::new()),
            Frame::Peers => {
                let mut peers: Vec<(String, SocketAddr)> = read(&self.addrs)
                    .iter()
                    .map(|(n, a)| (n.clone(), *a))
                    .collect();
                peers.push((self.name.clone(), self.addr));
                encode(&self.name, "peers", &peers)
            }
            Frame::GpuCapacity => {
                let host = read(&self.gpu).clone();
                let cap = match host {
                    Some(h) => Some(h.capacity(&self.name).await?),
                    None => None,
                };
                encode(&self.name, "GPU capacity", &cap)
            }
            Frame::GpuRun {
                kind,
                need,
                body,
                timeout_ms,
            } => {
                let host = read(&self.gpu).clone();
                match host {
                    Some(h) => {
                        h.run(
                            &self.name,
                            &kind,
                            need,
                            body.into_vec(),
                            Duration::from_millis(timeout_ms),
                        )
                        .await
                    }
                    None => Err(ClusterError::NoGpuCapacity {
                        kind,
                        retry_after: Duration::ZERO,
                        detail: format!("node `{}` has no GPU supervisor", self.name),
                    }),
                }
            }
            Frame::Tell { agent, .. } => Err(ClusterError::Codec {
                node: self.name.clone(),
                op: "decode".into(),
                what: format!("call frame for `{agent}`"),
                reason: "a tell frame came as a call".into(),
            }),
        }
    }

    /// Serves one one-way frame.
    fn serve_tell(&self, frame: Frame) {
        let outcome = match frame {
            Frame::Tell { agent, body } => match read(&self.agents).get(&agent).cloned() {
                Some(exposed) => exposed.tell_remote(&self.name, &body),
                None => Err(ClusterError::UnknownAgent { name: agent }),
            },
            other => Err(ClusterError::Codec {
                node: self.name.clone(),
                op: "decode".into(),
                what: "one-way frame".into(),
                reason: format!("unexpected {other:?}"),
            }),
        };
        if let Err(e) = outcome {
            // A tell has nobody to answer: count and log what was dropped.
            metrics::counter!("troupe_cluster_tells_dropped_total").increment(1);
            tracing::warn!(node = %self.name, error = %e, "remote tell dropped");
        }
    }

    /// After a membership change: learn the peers' peers (and connect to
    /// those not connected), and hand over what moved.
    fn after_change(self: &Arc<Self>) {
        tokio::spawn(self.clone().sync_peers());
        self.hand_over(false);
    }

    /// After a pause: passivates or stops everything hosted here, then takes
    /// back what this node owns under the current ring.
    fn hand_over_all(self: &Arc<Self>) {
        self.hand_over(true);
    }

    /// Runs each kind's hand-over with the ring current when it runs, one
    /// at a time per kind; with `everything`, first with a ring where this
    /// node owns nothing.
    fn hand_over(self: &Arc<Self>, everything: bool) {
        let kinds: Vec<(String, Rebalance)> = read(&self.kinds)
            .iter()
            .map(|(k, (_, r))| (k.clone(), r.clone()))
            .collect();
        for (kind, rebalance) in kinds {
            let lock = self
                .rebalancing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(kind.clone())
                .or_default()
                .clone();
            let me = self.clone();
            tokio::spawn(async move {
                let _one = lock.lock().await;
                let mut moved = 0;
                if everything {
                    // A ring whose one member is no node.
                    let nobody = Arc::new(HashRing::new(["\u{0}nobody"], 1));
                    moved += rebalance(nobody, me.name.clone()).await;
                }
                if let Some(ring) = me.view.load().kinds.get(&kind).cloned() {
                    moved += rebalance(Arc::new(ring), me.name.clone()).await;
                }
                if moved > 0 {
                    tracing::info!(node = %me.name, %kind, moved, "handed over after a membership change");
                }
            });
        }
    }

    /// Calls every live peer (or those named in `only`) with `frame` at
    /// once; the answers come back with the peers' names.
    async fn call_peers(
        &self,
        only: Option<&[String]>,
        frame: &Frame,
        operation: &str,
        timeout: Duration,
    ) -> Vec<(String, Result<Vec<u8>, ClusterError>)> {
        let view = self.view.load_full();
        let calls =
            view.nodes
                .iter()
                .filter(|(n, _)| **n != self.name && only.is_none_or(|o| o.contains(n)))
                .map(|(n, c)| async move {
                    (n.clone(), self.call(n, c, frame, operation, timeout).await)
                });
        futures::future::join_all(calls).await
    }

    /// Asks every connected peer for the peers it knows, then dials the
    /// known nodes that are not connected (no session open to them).
    async fn sync_peers(self: Arc<Self>) {
        let timeout = self.config.call_timeout;
        let answers = self.call_peers(None, &Frame::Peers, "peers", timeout).await;
        for (_, answer) in answers {
            let Some(peers) = answer
                .ok()
                .and_then(|b| decode::<Vec<(String, SocketAddr)>>(&self.name, "peers", &b).ok())
            else {
                continue;
            };
            let mut addrs = write(&self.addrs);
            for (peer, addr) in peers {
                if peer != self.name {
                    addrs.insert(peer, addr);
                }
            }
        }
        self.redial().await;
    }

    /// Dials the known nodes that are not members and have no session open.
    async fn redial(self: &Arc<Self>) {
        let connected = self.view.load_full();
        let missing: Vec<(String, SocketAddr)> = read(&self.addrs)
            .iter()
            .filter(|(n, _)| !connected.nodes.contains_key(*n))
            .map(|(n, a)| (n.clone(), *a))
            .collect();
        if missing.is_empty() {
            return;
        }
        // A session being set up (or to a stopped process) counts: dialling
        // again would only pile up handshakes.
        let sessions = self.sessions().await;
        let dials = missing
            .into_iter()
            .filter(|(n, a)| {
                !sessions
                    .iter()
                    .any(|(peer, peer_addr)| peer.as_deref() == Some(n.as_str()) || *peer_addr == a.to_string())
            })
            .map(|(peer, addr)| {
                let me = self.clone();
                async move {
                    if let Err(e) = me.connect(addr).await {
                        tracing::debug!(node = %me.name, %peer, error = %e, "could not reach a peer");
                    }
                }
            });
        futures::future::join_all(dials).await;
    }

    /// The node server's sessions: (peer node name once known, peer address).
    async fn sessions(&self) -> Vec<(Option<String>, String)> {
        match self
            .server
            .call(
                NodeServerMessage::GetSessions,
                Some(self.config.call_timeout),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(s)) => s
                .values()
                .map(|i| {
                    let peer = i
                        .peer_name
                        .as_ref()
                        .and_then(|p| p.name.split('@').next().map(str::to_owned));
                    (peer, i.peer_addr.clone())
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Closes the sessions to `node` (it stopped answering): it leaves the
    /// members here, and its keys move.
    async fn disconnect(&self, node: &str) {
        if let Ok(ractor::rpc::CallResult::Success(sessions)) = self
            .server
            .call(
                NodeServerMessage::GetSessions,
                Some(self.config.call_timeout),
            )
            .await
        {
            for info in sessions.values() {
                let peer = info
                    .peer_name
                    .as_ref()
                    .and_then(|p| p.name.split('@').next());
                if peer == Some(node) {
                    tracing::warn!(node = %self.name, peer = %node, "peer stopped answering pings: disconnecting it");
                    metrics::counter!("troupe_cluster_peers_disconnected_total").increment(1);
                    info.actor.stop(Some("troupe heartbeat: no answer".into()));
                }
            }
        }
    }

    /// Picks a node exposing `agent`: this one if it does, otherwise the
    /// others in turn.
    fn route_agent(&self, agent: &str) -> Result<Route, ClusterError> {
        if read(&self.agents).contains_key(agent) {
            return Ok(Route::Local);
        }
        let view = self.view.load();
        let hosts = view
            .agents
            .get(agent)
            .ok_or_else(|| ClusterError::UnknownAgent {
                name: agent.to_owned(),
            })?;
        let i = self.rr.fetch_add(1, Ordering::Relaxed) % hosts.len();
        let node = &hosts[i];
        match view.nodes.get(node) {
            Some(c) => Ok(Route::Remote(node.clone(), c.clone())),
            None => Err(ClusterError::UnknownAgent {
                name: agent.to_owned(),
            }),
        }
    }
}

/// Pings every peer each `heartbeat_interval`, disconnects the ones that
/// missed `heartbeat_misses` pings in a row, and re-syncs peers (which
/// redials lost ones). Ends when the node shuts down or is dropped.
async fn maintain(weak: std::sync::Weak<Inner>) {
    let mut misses: HashMap<String, u32> = HashMap::new();
    let mut round: u64 = 0;
    loop {
        let Some(interval) = weak.upgrade().map(|i| i.config.heartbeat_interval) else {
            return;
        };
        let slept = std::time::Instant::now();
        tokio::time::sleep(interval).await;
        let late = slept.elapsed().saturating_sub(interval);
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::Relaxed) {
            return;
        }
        if late >= interval * inner.config.heartbeat_misses {
            // This process stood still (stopped, swapped out, a long pause)
            // for longer than peers wait: they have taken over its keys, so
            // what it holds in memory may be stale.
            tracing::warn!(node = %inner.name, paused = ?late, "this node was paused: handing over everything it held");
            metrics::counter!("troupe_cluster_pauses_total").increment(1);
            inner.hand_over_all();
        }
        let view = inner.view.load_full();
        let pings = inner.call_peers(None, &Frame::Ping, "ping", interval).await;
        for (node, answer) in pings {
            if answer.is_ok() {
                misses.remove(&node);
                continue;
            }
            let m = misses.entry(node.clone()).or_default();
            *m += 1;
            if *m >= inner.config.heartbeat_misses {
                misses.remove(&node);
                inner.disconnect(&node).await;
            }
        }
        misses.retain(|n, _| view.nodes.contains_key(n));
        // In the background: a peer that does not answer must not delay
        // the next round of pings. Peers' peers are re-learnt every few
        // rounds (and on every membership change); lost ones are redialled
        // every round.
        round += 1;
        if !inner.syncing.swap(true, Ordering::AcqRel) {
            let inner = inner.clone();
            tokio::spawn(async move {
                if round.is_multiple_of(PEER_SYNC_ROUNDS) {
                    inner.clone().sync_peers().await;
                } else {
                    inner.redial().await;
                }
                inner.syncing.store(false, Ordering::Release);
            });
        }
    }
}

/// The node actor: decodes frames from other nodes and dispatches them.
struct NodeActor;

impl Actor for NodeActor {
    type Msg = NodeMsg;
    type State = std::sync::Weak<Inner>;
    type Arguments = std::sync::Weak<Inner>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        inner: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(inner)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some(inner) = state.upgrade() else {
            return Ok(());
        };
        match msg {
            NodeMsg::Deliver(bytes) => {
                metrics::counter!("troupe_cluster_frames_received_total", "kind" => "tell")
                    .increment(1);
                match decode::<Frame>(&inner.name, "frame", &bytes) {
                    Ok(frame) => inner.serve_tell(frame),
                    Err(e) => {
                        metrics::counter!("troupe_cluster_tells_dropped_total").increment(1);
                        tracing::warn!(node = %inner.name, error = %e, "undecodable frame dropped");
                    }
                }
            }
            NodeMsg::Call(bytes, reply) => {
                metrics::counter!("troupe_cluster_frames_received_total", "kind" => "call")
                    .increment(1);
                // Heartbeats are answered at once, even when overloaded.
                if bytes == PING_FRAME.as_slice() {
                    if let Ok(b) = encode(
                        &inner.name,
                        "reply",
                        &Reply::Ok(serde_bytes::ByteBuf::new()),
                    ) {
                        let _ = reply.send(b);
                    }
                    return Ok(());
                }
                let Ok(permit) = inner.inflight.clone().try_acquire_owned() else {
                    let refused: Reply = Err(ClusterError::Overloaded {
                        node: inner.name.clone(),
                        limit: inner.config.max_inflight_calls,
                    });
                    if let Ok(b) = encode(&inner.name, "reply", &refused) {
                        let _ = reply.send(b);
                    }
                    return Ok(());
                };
                tokio::spawn(async move {
                    let outcome = match decode::<Frame>(&inner.name, "frame", &bytes) {
                        Ok(frame) => inner.clone().serve(frame).await,
                        Err(e) => Err(e),
                    };
                    let outcome: Reply = outcome.map(serde_bytes::ByteBuf::from);
                    let bytes = encode(&inner.name, "reply", &outcome)
                        .and_then(|b| inner.check_size("caller", "reply", b.len()).map(|()| b))
                        .or_else(|e| encode(&inner.name, "reply", &Reply::Err(e)));
                    if let Ok(b) = bytes {
                        let _ = reply.send(b);
                    }
                    drop(permit);
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ProcessGroupChanged(_) = event
            && let Some(inner) = state.upgrade()
        {
            inner.refresh();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_with_fields_left_out_round_trip() {
        use troupe_agent::{ChatMessage, Role, SessionView};
        // A tool message (no tool calls, an id) and a user message with an
        // attachment: both leave fields out before others that are set.
        let mut user = ChatMessage::user("look");
        user.attachments
            .push(troupe_agent::model::Attachment::reference(
                troupe_journal::BlobRef {
                    hash: troupe_journal::BlobHash::of(b"png"),
                    size: 3,
                    media_type: "image/png".into(),
                },
            ));
        let tool = ChatMessage {
            tool_call_id: Some("call-1".into()),
            ..ChatMessage::new(Role::Tool, "{}")
        };
        let view = SessionView {
            id: "s".into(),
            agent: "a".into(),
            tenant: None,
            seq: 7,
            turns: 1,
            completed: 0,
            failed: 0,
            closed: false,
            pending: None,
            messages: vec![user, tool],
            rounds: 0,
            open_calls: Vec::new(),
            round_text: String::new(),
            handed_to: None,
            repairs: 2,
            // Optional fields left out: no decision, not started.
            approvals: vec![troupe_agent::Approval {
                call_id: "call-1".into(),
                tool: "refund".into(),
                arguments: "{}".into(),
                deadline_ms: 1,
                decision: None,
                started: false,
            }],
        };
        let bytes = encode("n", "view", &view).unwrap();
        let back: SessionView = decode("n", "view", &bytes).unwrap();
        assert_eq!(back, view);
    }

    #[test]
    fn frames_round_trip_and_bad_bytes_are_typed_errors() {
        let f = Frame::Entity {
            kind: "counter".into(),
            key: "k1".into(),
            body: serde_bytes::ByteBuf::from(vec![1, 2, 3]),
            hops: 1,
            timeout_ms: 10,
        };
        let b = encode("n", "frame", &f).unwrap();
        let back: Frame = decode("n", "frame", &b).unwrap();
        assert!(matches!(back, Frame::Entity { hops: 1, ref key, .. } if key == "k1"));
        let err = decode::<Frame>("n1", "frame", &[0xc1, 0x00]).unwrap_err();
        assert!(
            matches!(err, ClusterError::Codec { ref node, .. } if node == "n1"),
            "{err}"
        );
        let reply: Reply = Err(ClusterError::EntityUnavailable {
            kind: "k".into(),
            key: "x".into(),
            node: "n2".into(),
        });
        let b = encode("n", "reply", &reply).unwrap();
        assert_eq!(decode::<Reply>("n", "reply", &b).unwrap(), reply);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 1_024, failure_persistence: None, ..Default::default() })]

        /// Any bytes from a peer, and damaged real frames, decode to a
        /// frame or a typed error naming the node, never a panic.
        #[test]
        fn arbitrary_frame_bytes_are_frames_or_typed_errors(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1_024),
            at in proptest::prelude::any::<usize>(),
            x in 1u8..=255,
        ) {
            for bytes in [junk.clone(), {
                let f = Frame::Entity {
                    kind: "counter".into(),
                    key: "k1".into(),
                    body: serde_bytes::ByteBuf::from(junk.clone()),
                    hops: 1,
                    timeout_ms: 10,
                };
                let mut b = encode("n", "frame", &f).unwrap();
                let i = at % b.len();
                b[i] ^= x;
                b
            }] {
                if let Err(e) = decode::<Frame>("peer", "frame", &bytes) {
                    let named = matches!(e, ClusterError::Codec { ref node, .. } if node == "peer");
                    proptest::prop_assert!(named, "{}", e);
                }
                let _ = decode::<Reply>("peer", "reply", &bytes);
            }
        }
    }

    #[test]
    fn configuration_is_checked() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(ClusterConfig::new("a b", addr, "c").validate().is_err());
        assert!(ClusterConfig::new("a", addr, "").validate().is_err());
        let local = ClusterConfig::new("a", addr, "c").placement(Placement::NodeLocal {
            members: vec!["b".into()],
        });
        assert!(local.validate().is_err());
        assert!(ClusterConfig::new("node-1.x", addr, "c").validate().is_ok());
    }
}

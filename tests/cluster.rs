//! A Troupe cluster of real processes on 127.0.0.1.
//!
//! `three_nodes_*` starts three node processes (this binary re-run as
//! `cluster_node`), joins them from the test process as a fourth node that
//! hosts nothing, sends messages between agents on different nodes, spreads
//! counters over the nodes, kills one node with SIGKILL, and checks that its
//! counters resume on the others from the shared PostgreSQL journal with
//! every acknowledged event. GPU work is admitted where there is capacity
//! and refused with a retry hint when there is none.
//!
//! Needs `TROUPE_PG_URL` (`make test` starts a throwaway PostgreSQL); by
//! hand: `TROUPE_PG_URL=$(scripts/pg.sh start) cargo test --release
//! --features cluster --test cluster`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use serde_json::json;
use troupe::actor::{Effect, Entities, EntityConfig, EventSourced, mailbox};
use troupe::agent::{SessionConfig, Sessions};
use troupe::cluster::{
    ClusterConfig, ClusterEntity, ClusterError, ClusterNode, GpuNeed, Placement, TlsConfig,
};
use troupe::gpu::probe::SimulatedProbe;
use troupe::gpu::{GpuArgs, GpuConfig, GpuSupervisorHandle};
use troupe::journal::{InMemoryJournal, Journal, PersistenceId, Schema};
use troupe::postgres::{PgConfig, PgJournal};
use troupe::saga::{Handlers, Phase, SagaDefinition, Sagas, StepContext, StepDef};

const COOKIE: &str = "troupe-test-cookie";
const GIB: u64 = 1 << 30;
const PATIENCE: Duration = Duration::from_secs(60);
/// Short, so that a stopped node is found quickly (5 missed pings).
const HEARTBEAT: Duration = Duration::from_millis(200);

/// Serializes the tests of this binary: a process has one ractor registry,
/// so one cluster node at a time.
static ONE_NODE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------- entity

/// A counter of idempotent increments: each carries an operation id, and an
/// id seen before is not counted twice (so callers may retry).
#[derive(Clone)]
struct Counter {
    node: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Added {
    op: u64,
}
impl Schema for Added {
    const TYPE_NAME: &'static str = "test.Added";
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Ops {
    ops: Vec<u64>,
}
impl Schema for Ops {
    const TYPE_NAME: &'static str = "test.Ops";
}

#[derive(Debug, Serialize, Deserialize)]
enum CounterReq {
    Add(u64),
    Get,
}

#[derive(Debug, Serialize, Deserialize)]
struct CounterReply {
    node: String,
    ops: Vec<u64>,
}

struct CounterCmd(CounterReq, RpcReplyPort<CounterReply>);
impl ractor::Message for CounterCmd {}

impl EventSourced for Counter {
    type Command = CounterCmd;
    type Event = Added;
    type State = Ops;
    const KIND: &'static str = "counter";

    fn handle(&self, state: &Ops, CounterCmd(req, reply): CounterCmd) -> Effect<Self> {
        let node = self.node.clone();
        let answer = move |s: &Ops| CounterReply {
            node,
            ops: s.ops.clone(),
        };
        match req {
            CounterReq::Add(op) if !state.ops.contains(&op) => {
                Effect::persist_one(Added { op }).reply(reply, answer)
            }
            _ => Effect::none().reply(reply, answer),
        }
    }

    fn apply(state: &mut Ops, e: &Added) {
        state.ops.push(e.op);
    }
}

// ANCHOR: cluster_entity
impl ClusterEntity for Counter {
    type Request = CounterReq;
    type Reply = CounterReply;
    fn command(request: CounterReq, reply: RpcReplyPort<CounterReply>) -> CounterCmd {
        CounterCmd(request, reply)
    }
}
// ANCHOR_END: cluster_entity

// ---------------------------------------------------------------- agents

#[derive(Debug, Serialize, Deserialize)]
struct Note(String);

#[derive(Debug, Serialize, Deserialize)]
enum EchoAsk {
    /// Who are you?
    Ping,
    /// The notes told so far.
    Notes,
    /// Ask agent `to` for a ping and report who answered, through this node.
    Relay { to: String },
    /// Let held GPU tasks finish.
    ReleaseGpu,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum EchoReply {
    Pong { node: String },
    Notes(Vec<String>),
    Relayed { via: String, answer: Box<EchoReply> },
    Released,
    Failed(String),
}

enum EchoMsg {
    Note(Note),
    Ask(EchoAsk, RpcReplyPort<EchoReply>),
}
impl ractor::Message for EchoMsg {}

struct Echo {
    node: ClusterNode,
    release: tokio::sync::watch::Sender<bool>,
}

impl ractor::Actor for Echo {
    type Msg = EchoMsg;
    type State = Vec<String>;
    type Arguments = ();

    async fn pre_start(
        &self,
        _: ActorRef<EchoMsg>,
        _: (),
    ) -> Result<Vec<String>, ActorProcessingErr> {
        Ok(Vec::new())
    }

    async fn handle(
        &self,
        _: ActorRef<EchoMsg>,
        msg: EchoMsg,
        notes: &mut Vec<String>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EchoMsg::Note(Note(n)) => notes.push(n),
            EchoMsg::Ask(EchoAsk::Ping, reply) => {
                let _ = reply.send(EchoReply::Pong {
                    node: self.node.name().to_owned(),
                });
            }
            EchoMsg::Ask(EchoAsk::Notes, reply) => {
                let _ = reply.send(EchoReply::Notes(notes.clone()));
            }
            EchoMsg::Ask(EchoAsk::ReleaseGpu, reply) => {
                self.release.send_replace(true);
                let _ = reply.send(EchoReply::Released);
            }
            EchoMsg::Ask(EchoAsk::Relay { to }, reply) => {
                // Not awaited in the handler: the agent stays responsive.
                let node = self.node.clone();
                tokio::spawn(async move {
                    let answer = node
                        .agent(to)
                        .ask::<EchoAsk, EchoReply>(EchoAsk::Ping, Duration::from_secs(10))
                        .await;
                    let _ = reply.send(match answer {
                        Ok(a) => EchoReply::Relayed {
                            via: node.name().to_owned(),
                            answer: Box::new(a),
                        },
                        Err(e) => EchoReply::Failed(e.to_string()),
                    });
                });
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- saga

/// A saga that waits for the signal `approved`, then records who approved.
fn approval_sagas(journal: Arc<dyn Journal>) -> Sagas {
    let mut handlers = Handlers::default();
    handlers.register("record", |ctx: StepContext| async move {
        Ok(json!({ "recorded": ctx.idempotency_key() }))
    });
    let sagas = Sagas::new(journal, handlers);
    sagas
        .register(
            SagaDefinition::new(
                "approval",
                vec![
                    StepDef::signal("approve", "approved", Duration::from_secs(300)),
                    StepDef::new("record", "record").after(&["approve"]),
                ],
            )
            .expect("definition"),
        )
        .expect("register");
    sagas
}

// ---------------------------------------------------------------- node process

fn pg_url() -> String {
    std::env::var("TROUPE_PG_URL").expect(
        "TROUPE_PG_URL is not set: `make test` starts a throwaway PostgreSQL; by hand: \
         TROUPE_PG_URL=$(scripts/pg.sh start) cargo test --release --features cluster --test cluster",
    )
}

async fn pg(schema: &str) -> PgJournal {
    let mut config = PgConfig::new(pg_url());
    config.schema = schema.to_owned();
    PgJournal::open(config).await.expect("PostgreSQL journal")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One node of the cluster tests: hosts counters (PostgreSQL journal), the
/// agent `echo-NAME`, and with `TROUPE_GPU_GIB` a simulated GPU running the
/// task `hold` (which holds its lease until `ReleaseGpu`). Run alone, it
/// returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a node process of the cluster tests, started by them"]
async fn cluster_node() {
    let Ok(name) = std::env::var("TROUPE_CLUSTER_NODE") else {
        return;
    };
    let port: u16 = std::env::var("TROUPE_CLUSTER_PORT")
        .unwrap()
        .parse()
        .unwrap();
    let seeds: Vec<SocketAddr> = std::env::var("TROUPE_CLUSTER_SEEDS")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let schema = std::env::var("TROUPE_PG_SCHEMA").ok();
    let tls = std::env::var("TROUPE_TLS_DIR")
        .ok()
        .map(|d| tls_files(std::path::Path::new(&d), "cluster"));
    let gpu_gib: u64 = std::env::var("TROUPE_GPU_GIB").map_or(0, |g| g.parse().unwrap());

    // ANCHOR: node
    let mut config =
        ClusterConfig::new(&name, SocketAddr::from(([127, 0, 0, 1], port)), COOKIE).seeds(seeds);
    config.tls = tls;
    config.heartbeat_interval = HEARTBEAT;
    let node = ClusterNode::start(config).await.expect("node starts");

    if let Some(schema) = schema {
        let journal: Arc<dyn Journal> = Arc::new(pg(&schema).await);
        let counters = Entities::new(
            Counter { node: name.clone() },
            journal,
            EntityConfig::default(),
        );
        node.host(counters).expect("host counters");
        let journal: Arc<dyn Journal> = Arc::new(pg(&schema).await);
        node.host_sessions(Sessions::new(journal.clone(), SessionConfig::default()))
            .expect("host sessions");
        node.host_sagas(approval_sagas(journal))
            .expect("host sagas");
    }

    let (release, released) = tokio::sync::watch::channel(false);
    let echo = mailbox::spawn(
        format!("echo-{name}"),
        Echo {
            node: node.clone(),
            release,
        },
        (),
        1_024,
        None,
    )
    .await
    .expect("echo agent");
    node.expose(format!("echo-{name}"), echo)
        .tells(EchoMsg::Note)
        .asks(EchoMsg::Ask)
        .register()
        .expect("expose echo");
    // ANCHOR_END: node

    // ANCHOR: gpu_host
    if gpu_gib > 0 {
        let gpu = GpuSupervisorHandle::spawn(
            GpuArgs {
                probe: Arc::new(SimulatedProbe::new(1, gpu_gib * GIB)),
                // A node's leases are about its own devices: node-local.
                journal: Arc::new(InMemoryJournal::new()),
                config: GpuConfig::default(),
            },
            None,
        )
        .await
        .expect("GPU supervisor");
        node.host_gpu(gpu).expect("host GPU");
        let me = name.clone();
        node.gpu_task("hold", move |lease, tag: String| {
            let (mut released, me) = (released.clone(), me.clone());
            async move {
                println!("HOLDING {tag} {}", lease.memory);
                let _ = released.wait_for(|r| *r).await;
                Ok::<_, String>(format!("{tag}@{me}"))
            }
        })
        .expect("GPU task");
    }
    // ANCHOR_END: gpu_host
    println!("READY {name}");
    std::future::pending::<()>().await;
}

// ---------------------------------------------------------------- the test

struct Nodes(BTreeMap<String, common::Child>);

/// Reads the node's output up to its READY line.
fn ready(child: &common::Child, name: &str) {
    loop {
        match child.next_line(PATIENCE) {
            Some(line) if line == format!("READY {name}") => return,
            Some(_) => {}
            None => panic!("node {name} exited before it was ready"),
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in self.0.values_mut() {
            child.kill();
        }
    }
}

async fn retrying<T>(what: &str, mut f: impl AsyncFnMut() -> Result<T, ClusterError>) -> T {
    // Bounded: a failed node is noticed when its connection closes, so
    // retries end quickly; the bound only stops a broken build from hanging.
    for attempt in 0.. {
        match f().await {
            Ok(v) => return v,
            Err(e) if e.is_retryable() && attempt < 600 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what}: {e} (attempt {attempt})"),
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_talk_place_work_and_survive_sigkill_and_sigstop() {
    let _one = ONE_NODE_AT_A_TIME.lock().await;
    let schema = format!(
        "cluster_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let _ = pg_url();
    let names = ["n1", "n2", "n3"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let seed = format!("127.0.0.1:{}", ports[0]);
    let gpu = ["16", "0", "16"]; // n1 and n3 have one 16 GiB GPU each
    let mut nodes = Nodes(BTreeMap::new());
    for (i, name) in names.iter().enumerate() {
        let child = common::spawn(
            "cluster_node",
            &[
                ("TROUPE_CLUSTER_NODE", name.to_string()),
                ("TROUPE_CLUSTER_PORT", ports[i].to_string()),
                (
                    "TROUPE_CLUSTER_SEEDS",
                    if i == 0 { String::new() } else { seed.clone() },
                ),
                ("TROUPE_PG_URL", pg_url()),
                ("TROUPE_PG_SCHEMA", schema.clone()),
                ("TROUPE_GPU_GIB", gpu[i].to_string()),
            ],
        );
        // Owned by `nodes` first, so that it is killed even if it never
        // becomes ready.
        nodes.0.insert(name.to_string(), child);
        ready(&nodes.0[*name], name);
    }

    // A node with the wrong cookie is refused.
    let wrong = ClusterConfig {
        join_timeout: Duration::from_secs(2),
        ..ClusterConfig::new("intruder", "127.0.0.1:0".parse().unwrap(), "wrong-cookie")
            .seeds([seed.parse().unwrap()])
    };
    let refused = ClusterNode::start(wrong).await.unwrap_err();
    assert!(matches!(refused, ClusterError::Join { .. }), "{refused}");

    // The test process joins as a fourth node that hosts nothing.
    let driver = ClusterNode::start(ClusterConfig {
        heartbeat_interval: HEARTBEAT,
        ..ClusterConfig::new("driver", "127.0.0.1:0".parse().unwrap(), COOKIE)
            .seeds([seed.parse().unwrap()])
    })
    .await
    .expect("driver joins");
    let all = driver
        .wait_for_members(|m| m.len() == 4, PATIENCE)
        .await
        .expect("all four nodes see each other");
    assert_eq!(all, ["driver", "n1", "n2", "n3"]);
    assert!(!all.contains(&"intruder".to_owned()));

    // ---- agents by name, across nodes
    for name in names {
        let agent = driver.agent(format!("echo-{name}"));
        // Exposures reach the driver a moment after membership does.
        let pong: EchoReply = retrying("ping", async || {
            // Exposures reach the driver just after membership does.
            agent.location().map_err(|_| ClusterError::NoOwner {
                kind: "not exposed yet".into(),
            })?;
            agent.ask(EchoAsk::Ping, Duration::from_secs(10)).await
        })
        .await;
        assert_eq!(pong, EchoReply::Pong { node: name.into() });
        assert_eq!(agent.location().unwrap(), name);
        for i in 0..100 {
            agent.tell(Note(format!("{name}-{i}"))).expect("tell");
        }
        // Tells from one node to one agent arrive in order, before the ask.
        let notes: EchoReply = agent
            .ask(EchoAsk::Notes, Duration::from_secs(10))
            .await
            .unwrap();
        let expected: Vec<String> = (0..100).map(|i| format!("{name}-{i}")).collect();
        assert_eq!(notes, EchoReply::Notes(expected));
    }
    // An agent on n1 asks one on n2.
    let relayed: EchoReply = driver
        .agent("echo-n1")
        .ask(
            EchoAsk::Relay {
                to: "echo-n2".into(),
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(
        relayed,
        EchoReply::Relayed {
            via: "n1".into(),
            answer: Box::new(EchoReply::Pong { node: "n2".into() })
        }
    );
    let unknown = driver.agent("nobody").tell(Note("x".into())).unwrap_err();
    assert!(
        matches!(unknown, ClusterError::UnknownAgent { .. }),
        "{unknown}"
    );
    // A type the agent does not take is a typed error from its node.
    let mismatch = driver
        .agent("echo-n3")
        .ask::<u64, EchoReply>(7, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(mismatch, ClusterError::Codec { ref node, .. } if node == "n3"),
        "{mismatch}"
    );

    // ---- entities spread over n1..n3 (the driver hosts none)
    let counters = driver.entity_client::<Counter>();
    let keys: Vec<String> = (0..36).map(|i| format!("c{i}")).collect();
    let mut owners = BTreeMap::new();
    for k in &keys {
        let owner = retrying("owner", async || counters.owner(k)).await;
        owners.entry(owner).or_insert_with(Vec::new).push(k.clone());
    }
    assert_eq!(
        owners.keys().cloned().collect::<Vec<_>>(),
        ["n1", "n2", "n3"],
        "every node owns some of 36 keys: {owners:?}"
    );
    let mut acked: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut next_op = 0u64;
    // A request sent to a node that does not own the key is forwarded to
    // the owner (as a gateway node would): through n1 to n2's and n3's keys.
    for owner in ["n2", "n3"] {
        let k = &owners[owner][0];
        next_op += 1;
        let op = next_op;
        let reply = counters
            .ask_via("n1", k, CounterReq::Add(op), Duration::from_secs(10))
            .await
            .expect("forwarded");
        assert_eq!(reply.node, owner, "{k} answered by its owner");
        acked.entry(k.clone()).or_default().insert(op);
    }
    for round in 0..3 {
        for k in &keys {
            next_op += 1;
            let op = next_op;
            let reply = retrying("add", async || {
                counters
                    .ask(k, CounterReq::Add(op), Duration::from_secs(10))
                    .await
            })
            .await;
            assert!(reply.ops.contains(&op));
            if round == 0 {
                assert_eq!(
                    reply.node,
                    owners
                        .iter()
                        .find(|(_, ks)| ks.contains(k))
                        .unwrap()
                        .0
                        .as_str()
                );
            }
            acked.entry(k.clone()).or_default().insert(op);
        }
    }

    // ---- sessions and sagas placed the same way
    let sessions = driver.session_client();
    let mut session_ids = Vec::new();
    while session_ids.len() < 9
        || !session_ids
            .iter()
            .any(|id: &String| sessions.owner(id).unwrap() == "n2")
    {
        assert!(session_ids.len() < 60, "no session landed on n2");
        let id = retrying("create session", async || {
            sessions
                .create("assistant", None, Duration::from_secs(10))
                .await
        })
        .await;
        let posted = sessions
            .post(&id, &format!("hello {id}"), Duration::from_secs(10))
            .await
            .expect("post");
        assert!(posted.seq > 0);
        session_ids.push(id);
    }
    let sagas = driver.saga_client();
    let mut saga_ids = Vec::new();
    while saga_ids.len() < 6
        || saga_ids
            .iter()
            .filter(|id: &&String| sagas.owner(id).unwrap() == "n2")
            .count()
            < 2
    {
        assert!(saga_ids.len() < 60, "no saga landed on n2");
        let id = retrying("start saga", async || {
            sagas
                .start("approval", json!({"order": 1}), Duration::from_secs(10))
                .await
        })
        .await;
        saga_ids.push(id);
    }
    for id in &saga_ids {
        let status = sagas.status(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(status.phase, Phase::Running, "{id} waits for its signal");
    }

    // ---- SIGKILL n2 while requests are in flight
    let victim_keys = owners["n2"].clone();
    // Requests to n2's counters run before, during and after the kill,
    // until the survivors have served some of them.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (served_tx, mut served) = tokio::sync::mpsc::unbounded_channel::<String>();
    let flight = {
        let counters = counters.clone();
        let keys = victim_keys.clone();
        tokio::spawn(async move {
            let (mut acked, mut failed) = (Vec::new(), 0);
            for (i, k) in keys.iter().cycle().enumerate() {
                if *stopped.borrow() {
                    break;
                }
                let op = 1_000_000 + i as u64;
                match counters
                    .ask(k, CounterReq::Add(op), Duration::from_secs(10))
                    .await
                {
                    Ok(r) => {
                        assert!(r.ops.contains(&op));
                        let _ = served_tx.send(r.node.clone());
                        acked.push((k.clone(), op));
                    }
                    Err(e) => {
                        assert!(e.is_retryable(), "{e}");
                        failed += 1;
                    }
                }
            }
            (acked, failed)
        })
    };
    loop {
        match served.recv().await.as_deref() {
            Some("n2") => break,
            Some(_) => {}
            None => panic!("the requests stopped before n2 served one"),
        }
    }
    let mut n2 = nodes.0.remove("n2").unwrap();
    n2.kill();
    let _ = n2.finish();
    driver
        .wait_for_members(|m| m == ["driver", "n1", "n3"], PATIENCE)
        .await
        .expect("the others see n2 leave");
    let mut after = 0;
    while after < 2 * victim_keys.len() {
        let node = served.recv().await.expect("requests go on");
        assert!(
            node == "n1" || node == "n3" || after == 0,
            "served by {node} after the kill"
        );
        if node != "n2" {
            after += 1;
        }
    }
    stop.send_replace(true);
    let (in_flight, failed) = flight.await.unwrap();
    eprintln!(
        "around the kill: {} requests acknowledged, {failed} failed (retryable)",
        in_flight.len()
    );
    for (k, op) in in_flight {
        acked.entry(k).or_default().insert(op);
    }

    // Every counter answers again, n2's from n1 or n3, with every
    // acknowledged operation.
    for k in &keys {
        next_op += 1;
        let op = next_op;
        let reply = retrying("add after the kill", async || {
            counters
                .ask(k, CounterReq::Add(op), Duration::from_secs(10))
                .await
        })
        .await;
        assert_ne!(reply.node, "n2");
        acked.entry(k.clone()).or_default().insert(op);
        let held: BTreeSet<u64> = reply.ops.iter().copied().collect();
        assert_eq!(
            held.len(),
            reply.ops.len(),
            "{k}: an operation counted twice"
        );
        let lost: Vec<_> = acked[k].difference(&held).collect();
        assert!(lost.is_empty(), "{k} lost acknowledged operations {lost:?}");
    }
    for k in &victim_keys {
        let owner = counters.owner(k).unwrap();
        assert!(owner == "n1" || owner == "n3", "{k} moved to {owner}");
    }

    // Sessions on n2 are served by the survivors, with their posted turn.
    for id in &session_ids {
        let view = retrying("view session", async || {
            sessions.view(id, Duration::from_secs(10)).await
        })
        .await;
        assert_eq!(view.turns, 1, "{id}: the posted turn is there");
        assert_ne!(sessions.owner(id).unwrap(), "n2");
    }
    // Sagas n2 was running resume on the survivors: they wait for their
    // signal again, and finish once it comes.
    for id in &saga_ids {
        assert_ne!(sagas.owner(id).unwrap(), "n2");
        let waiting = retrying("signal", async || {
            match sagas
                .signal(
                    id,
                    "approved",
                    json!({"by": "ops"}),
                    Duration::from_secs(10),
                )
                .await
            {
                Ok(true) => Ok(true),
                // Resumed but not yet waiting: the same as not running yet.
                Ok(false) => Err(ClusterError::NoOwner {
                    kind: format!("{id} not waiting yet"),
                }),
                Err(e) => Err(e),
            }
        })
        .await;
        assert!(waiting);
    }
    for id in &saga_ids {
        let done = retrying("saga ends", async || {
            let s = sagas.status(id, Duration::from_secs(10)).await?;
            if s.phase.is_final() {
                Ok(s)
            } else {
                Err(ClusterError::NoOwner {
                    kind: format!("{id} still {:?}", s.phase),
                })
            }
        })
        .await;
        assert_eq!(done.phase, Phase::Completed, "{id}: {done:?}");
    }

    // The journal itself holds each acknowledged operation exactly once.
    let journal = pg(&schema).await;
    for k in &keys {
        let id = PersistenceId::new("counter", k).unwrap();
        let events = journal
            .replay(&id, 1, u64::MAX)
            .collect_all()
            .await
            .unwrap();
        let ops: Vec<u64> = events
            .iter()
            .map(|e| e.decode::<Added>().unwrap().op)
            .collect();
        let unique: BTreeSet<u64> = ops.iter().copied().collect();
        assert_eq!(unique.len(), ops.len(), "{k}: duplicate events");
        assert!(
            acked[k].is_subset(&unique),
            "{k}: acknowledged events missing from the journal"
        );
    }

    // ---- GPU capacity across nodes: n1 and n3 have one 16 GiB GPU each.
    let gpus = driver.gpu();
    let need = GpuNeed {
        memory: 12 * GIB,
        compute: 50,
        priority: 1,
        start_within_ms: 200,
        expected_ms: 60_000,
    };
    let hold = |tag: &str| {
        let (gpus, need, tag) = (gpus.clone(), need.clone(), tag.to_owned());
        tokio::spawn(async move {
            gpus.run::<String, String>("hold", need, tag, Duration::from_secs(60))
                .await
        })
    };
    let first = hold("a");
    // Wait for the first lease before asking for the second: admission
    // then has to put the second on the other GPU.
    let held_by = |caps: &[troupe::cluster::NodeGpuCapacity], n: usize| {
        caps.iter()
            .filter(|c| c.largest_free_memory < 12 * GIB)
            .count()
            == n
    };
    retrying("first lease", async || {
        let caps = gpus.capacity().await;
        if held_by(&caps, 1) {
            Ok(())
        } else {
            Err(ClusterError::NoOwner {
                kind: format!("{caps:?}"),
            })
        }
    })
    .await;
    let second = hold("b");
    retrying("second lease", async || {
        let caps = gpus.capacity().await;
        if held_by(&caps, 2) {
            Ok(())
        } else {
            Err(ClusterError::NoOwner {
                kind: format!("{caps:?}"),
            })
        }
    })
    .await;
    let refused = gpus
        .run::<String, String>("hold", need.clone(), "c".into(), Duration::from_secs(60))
        .await
        .unwrap_err();
    match &refused {
        // Both GPU nodes were asked, and refused with their own reasons.
        ClusterError::NoGpuCapacity {
            retry_after,
            detail,
            ..
        } => {
            assert!(!retry_after.is_zero(), "{refused}");
            assert!(
                detail.contains("n1:") && detail.contains("n3:"),
                "{refused}"
            );
        }
        other => panic!("expected a refusal, got {other}"),
    }
    for n in ["n1", "n3"] {
        let r: EchoReply = driver
            .agent(format!("echo-{n}"))
            .ask(EchoAsk::ReleaseGpu, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(r, EchoReply::Released);
    }
    let a = first.await.unwrap().expect("task a ran");
    let b = second.await.unwrap().expect("task b ran");
    let ran_on: BTreeSet<&str> = [a.node.as_str(), b.node.as_str()].into();
    assert_eq!(ran_on, BTreeSet::from(["n1", "n3"]), "{a:?} {b:?}");
    assert_eq!(a.output, format!("a@{}", a.node));

    // ---- a node that stops answering (SIGSTOP) leaves; back, it rejoins
    let n3_keys: Vec<String> = keys
        .iter()
        .filter(|k| counters.owner(k).unwrap() == "n3")
        .cloned()
        .collect();
    assert!(!n3_keys.is_empty());
    nodes.0["n3"].signal(libc::SIGSTOP).expect("SIGSTOP");
    driver
        .wait_for_members(|m| m == ["driver", "n1"], PATIENCE)
        .await
        .expect("n3 is disconnected after missing its pings");
    for k in &n3_keys {
        next_op += 1;
        let op = next_op;
        let reply = retrying("add while n3 is stopped", async || {
            counters
                .ask(k, CounterReq::Add(op), Duration::from_secs(10))
                .await
        })
        .await;
        assert_eq!(reply.node, "n1");
        acked.entry(k.clone()).or_default().insert(op);
    }
    nodes.0["n3"].signal(libc::SIGCONT).expect("SIGCONT");
    driver
        .wait_for_members(|m| m == ["driver", "n1", "n3"], PATIENCE)
        .await
        .expect("n3 rejoins");
    // Back on n3, its counters show what n1 wrote meanwhile: what n3 held
    // in memory before the pause is not served.
    for k in &n3_keys {
        let reply = retrying("read back on n3", async || {
            let r = counters
                .ask(k, CounterReq::Get, Duration::from_secs(10))
                .await?;
            if r.node == "n3" {
                Ok(r)
            } else {
                Err(ClusterError::NoOwner {
                    kind: format!("{k} on {}", r.node),
                })
            }
        })
        .await;
        let held: BTreeSet<u64> = reply.ops.iter().copied().collect();
        let lost: Vec<_> = acked[k].difference(&held).collect();
        assert!(lost.is_empty(), "{k} on n3 misses {lost:?}");
    }

    driver.shutdown().await;
    drop(nodes);
}

/// With node-local journals an entity lives on its home node only: while
/// that node is down, callers get `EntityUnavailable` naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_local_entities_are_unavailable_while_their_node_is_down() {
    let _one = ONE_NODE_AT_A_TIME.lock().await;
    let config = ClusterConfig::new("solo", "127.0.0.1:0".parse().unwrap(), COOKIE).placement(
        Placement::NodeLocal {
            members: vec!["solo".into(), "away".into()],
        },
    );
    let node = ClusterNode::start(config).await.expect("node");
    let counters = node
        .host(Entities::new(
            Counter {
                node: "solo".into(),
            },
            Arc::new(InMemoryJournal::new()),
            EntityConfig::default(),
        ))
        .expect("host");
    let (mut here, mut away) = (0, 0);
    for i in 0..40 {
        let key = format!("k{i}");
        match counters
            .ask(&key, CounterReq::Add(i), Duration::from_secs(5))
            .await
        {
            Ok(r) => {
                assert_eq!(r.node, "solo");
                here += 1;
            }
            Err(ClusterError::EntityUnavailable { node, key: k, .. }) => {
                assert_eq!((node.as_str(), k.as_str()), ("away", key.as_str()));
                assert_eq!(counters.owner(&key).unwrap(), "away");
                away += 1;
            }
            Err(e) => panic!("{key}: {e}"),
        }
    }
    assert!(here > 0 && away > 0, "{here} here, {away} away");
    node.shutdown().await;
}

/// Writes a CA and a node certificate signed by it (for `localhost`), as
/// PEM files `TAG-ca.pem`, `TAG-cert.pem`, `TAG-key.pem` in `dir`.
fn make_certs(dir: &std::path::Path, tag: &str) -> TlsConfig {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = leaf.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join(format!("{tag}-ca.pem")), ca.pem()).unwrap();
    std::fs::write(dir.join(format!("{tag}-cert.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{tag}-key.pem")), key.serialize_pem()).unwrap();
    tls_files(dir, tag)
}

fn tls_files(dir: &std::path::Path, tag: &str) -> TlsConfig {
    TlsConfig {
        cert_chain: dir.join(format!("{tag}-cert.pem")),
        private_key: dir.join(format!("{tag}-key.pem")),
        ca: dir.join(format!("{tag}-ca.pem")),
        server_name: "localhost".into(),
    }
}

/// With TLS, a node with a certificate from the cluster's CA joins and
/// talks; one without TLS, or with a certificate from another CA, is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_nodes_join_only_with_the_cluster_ca() {
    let _one = ONE_NODE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let tls = make_certs(dir.path(), "cluster");
    let other_ca = make_certs(dir.path(), "other");
    let port = free_port();
    let seed: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = common::spawn(
        "cluster_node",
        &[
            ("TROUPE_CLUSTER_NODE", "t1".to_owned()),
            ("TROUPE_CLUSTER_PORT", port.to_string()),
            ("TROUPE_TLS_DIR", dir.path().display().to_string()),
        ],
    );
    let mut nodes = Nodes(BTreeMap::from([("t1".to_owned(), child)]));
    ready(&nodes.0["t1"], "t1");

    let config = |name: &str| ClusterConfig {
        join_timeout: Duration::from_secs(2),
        ..ClusterConfig::new(name, "127.0.0.1:0".parse().unwrap(), COOKIE).seeds([seed])
    };
    let plain = ClusterNode::start(config("plain")).await.unwrap_err();
    assert!(matches!(plain, ClusterError::Join { .. }), "{plain}");
    let stranger = ClusterNode::start(config("stranger").tls(other_ca))
        .await
        .unwrap_err();
    assert!(matches!(stranger, ClusterError::Join { .. }), "{stranger}");

    let node = ClusterNode::start(config("member").tls(tls))
        .await
        .expect("joins over TLS");
    let pong: EchoReply = retrying("ping over TLS", async || {
        node.agent("echo-t1")
            .ask(EchoAsk::Ping, Duration::from_secs(10))
            .await
    })
    .await;
    assert_eq!(pong, EchoReply::Pong { node: "t1".into() });
    node.shutdown().await;
    for c in nodes.0.values_mut() {
        c.kill();
    }
    nodes.0.clear();
}

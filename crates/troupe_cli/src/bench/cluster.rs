//! The cluster suite: tells and asks to an agent on another node process
//! (over ractor_cluster on 127.0.0.1), against the same calls to an agent
//! on the calling node (the same cluster API, no network), a Troupe handle
//! to that agent (no cluster layer) and raw ractor.
//!
//! Tells are sent in windows: after every window the sender asks the agent
//! how many it has seen; tells and the ask go in order over one
//! connection, so the answer arrives only after the window was delivered.
//! The figure is tells delivered per second, flow control included.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use troupe::actor::{ActorHandle, mailbox};
use troupe::cluster::{AgentRef, ClusterConfig, ClusterNode};

use super::{Report, percentile};

type BoxError = Box<dyn std::error::Error>;

const COOKIE: &str = "troupe-bench";
/// Tells between two asks.
const WINDOW: u64 = 2_000;
/// Mailbox of the sink: room for a whole window, so no tell is dropped.
const SINK_MAILBOX: usize = 2 * WINDOW as usize;

fn note(msg: &str) {
    eprintln!("# {msg}");
}

/// Counts tells; answers asks.
struct Sink;

#[derive(Serialize, Deserialize)]
pub enum SinkAsk {
    /// How many tells so far.
    Count,
    /// Echo a number.
    Echo(u64),
}

pub enum SinkMsg {
    Hit(u64),
    Ask(SinkAsk, RpcReplyPort<u64>),
}
impl ractor::Message for SinkMsg {}

impl ractor::Actor for Sink {
    type Msg = SinkMsg;
    type State = u64;
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<SinkMsg>, _: ()) -> Result<u64, ActorProcessingErr> {
        Ok(0)
    }
    async fn handle(
        &self,
        _: ActorRef<SinkMsg>,
        msg: SinkMsg,
        n: &mut u64,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SinkMsg::Hit(x) => {
                std::hint::black_box(x);
                *n += 1;
            }
            SinkMsg::Ask(SinkAsk::Count, r) => {
                let _ = r.send(*n);
            }
            SinkMsg::Ask(SinkAsk::Echo(x), r) => {
                let _ = r.send(x);
            }
        }
        Ok(())
    }
}

async fn expose_sink(node: &ClusterNode, name: &str) -> Result<ActorHandle<SinkMsg>, BoxError> {
    let sink = mailbox::spawn(name, Sink, (), SINK_MAILBOX, None).await?;
    node.expose(name, sink.clone())
        .tells(SinkMsg::Hit)
        .asks(SinkMsg::Ask)
        .register()?;
    Ok(sink)
}

/// The same calls on a Troupe handle without the cluster layer: what the
/// local node path adds is the difference.
async fn handle_calls(
    sink: &ActorHandle<SinkMsg>,
    n_tells: u64,
    n_asks: u64,
) -> Result<(f64, Vec<f64>), BoxError> {
    let timeout = Duration::from_secs(30);
    let base = sink
        .ask(|r| SinkMsg::Ask(SinkAsk::Count, r), timeout)
        .await?;
    let start = Instant::now();
    let mut sent = 0;
    while sent < n_tells {
        for i in 0..WINDOW.min(n_tells - sent) {
            sink.tell(SinkMsg::Hit(sent + i)).map_err(|r| r.error)?;
        }
        sent += WINDOW.min(n_tells - sent);
        let seen = sink
            .ask(|r| SinkMsg::Ask(SinkAsk::Count, r), timeout)
            .await?;
        if seen - base != sent {
            return Err("the handle lost tells".into());
        }
    }
    let rate = n_tells as f64 / start.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(n_asks as usize);
    for i in 0..n_asks {
        let t = Instant::now();
        let _ = sink
            .ask(|r| SinkMsg::Ask(SinkAsk::Echo(i), r), timeout)
            .await?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((rate, lat))
}

/// Tells per second, in windows.
async fn tells(agent: &AgentRef, n: u64) -> Result<f64, BoxError> {
    let start = Instant::now();
    let mut sent = 0;
    let base: u64 = agent.ask(SinkAsk::Count, Duration::from_secs(30)).await?;
    while sent < n {
        for i in 0..WINDOW.min(n - sent) {
            agent.tell(sent + i)?;
        }
        sent += WINDOW.min(n - sent);
        let seen: u64 = agent.ask(SinkAsk::Count, Duration::from_secs(30)).await?;
        if seen - base != sent {
            return Err(format!("{} of {sent} tells arrived", seen - base).into());
        }
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Ask round trips, in microseconds.
async fn asks(agent: &AgentRef, n: u64) -> Result<Vec<f64>, BoxError> {
    let mut lat = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = Instant::now();
        let back: u64 = agent.ask(SinkAsk::Echo(i), Duration::from_secs(30)).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        if back != i {
            return Err(format!("echo {i} came back as {back}").into());
        }
    }
    Ok(lat)
}

/// Raw ractor in the same process: casts per second (same windows) and
/// call latency.
async fn raw(n_tells: u64, n_asks: u64) -> Result<(f64, Vec<f64>), BoxError> {
    let (actor, _) = ractor::Actor::spawn(None, Sink, ()).await?;
    let start = Instant::now();
    let mut sent = 0;
    while sent < n_tells {
        for i in 0..WINDOW.min(n_tells - sent) {
            actor.cast(SinkMsg::Hit(sent + i))?;
        }
        sent += WINDOW.min(n_tells - sent);
        let seen = ractor::call!(actor, |r| SinkMsg::Ask(SinkAsk::Count, r))?;
        if seen != sent {
            return Err("raw ractor lost tells".into());
        }
    }
    let rate = n_tells as f64 / start.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(n_asks as usize);
    for i in 0..n_asks {
        let t = Instant::now();
        let _ = ractor::call!(actor, |r| SinkMsg::Ask(SinkAsk::Echo(i), r))?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    actor.stop(None);
    Ok((rate, lat))
}

pub fn run(quick: bool) -> Result<(), BoxError> {
    let (n_tells, n_asks) = if quick {
        (100_000, 2_000)
    } else {
        (1_000_000, 20_000)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(n_tells, n_asks))
}

async fn run_async(n_tells: u64, n_asks: u64) -> Result<(), BoxError> {
    let report = Report;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let peer_addr = SocketAddr::from(([127, 0, 0, 1], port));
    note(&format!("starting a peer node process on {peer_addr}"));
    let mut peer = Command::new(std::env::current_exe()?)
        .args(["bench", "cluster-peer", "--port", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let out = peer.stdout.take().ok_or("peer stdout")?;
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .map(|_| line)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r.map_err(|e| e.to_string()));
    let ready = match ready {
        Ok(line) => line,
        Err(e) => {
            let _ = peer.kill();
            return Err(format!("the peer did not start: {e}").into());
        }
    };
    if ready.trim() != "READY" {
        let _ = peer.kill();
        return Err(format!("the peer said {ready:?}").into());
    }
    let result = measure(&report, peer_addr, n_tells, n_asks).await;
    let _ = peer.kill();
    let _ = peer.wait();
    result
}

async fn measure(
    report: &Report,
    peer: SocketAddr,
    n_tells: u64,
    n_asks: u64,
) -> Result<(), BoxError> {
    let node = ClusterNode::start(
        ClusterConfig::new("bench", "127.0.0.1:0".parse()?, COOKIE).seeds([peer]),
    )
    .await?;
    let handle = expose_sink(&node, "sink-local").await?;
    let remote = node.agent("sink-remote");
    let local = node.agent("sink-local");
    // The peer's exposure arrives just after membership.
    for _ in 0..500 {
        if remote.location().is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    note(&format!("sink-remote is on {}", remote.location()?));

    // Warm up both paths.
    tells(&remote, WINDOW * 5).await?;
    asks(&remote, 200).await?;
    tells(&local, WINDOW * 5).await?;
    asks(&local, 200).await?;

    note(&format!("{n_tells} tells and {n_asks} asks per path"));
    let cross_tell = tells(&remote, n_tells).await?;
    let cross_ask = asks(&remote, n_asks).await?;
    let local_tell = tells(&local, n_tells).await?;
    let local_ask = asks(&local, n_asks).await?;
    let (handle_tell, handle_ask) = handle_calls(&handle, n_tells, n_asks).await?;
    let (raw_tell, raw_ask) = raw(n_tells, n_asks).await?;

    let (cross_p50, local_p50, raw_p50) = (
        percentile(&cross_ask, 0.5),
        percentile(&local_ask, 0.5),
        percentile(&raw_ask, 0.5),
    );
    report.figure("cross_node_tell", cross_tell, "msgs/s");
    report.figure("local_node_tell", local_tell, "msgs/s");
    report.figure("handle_tell", handle_tell, "msgs/s");
    report.figure("raw_ractor_tell", raw_tell, "msgs/s");
    report.ratio("cross_node_tell", cross_tell, local_tell);
    report.ratio("local_node_tell", local_tell, handle_tell);
    report.ratio("handle_tell", handle_tell, raw_tell);
    report.figure("cross_node_ask_p50", cross_p50, "µs");
    report.figure("cross_node_ask_p99", percentile(&cross_ask, 0.99), "µs");
    report.figure("local_node_ask_p50", local_p50, "µs");
    report.figure("local_node_ask_p99", percentile(&local_ask, 0.99), "µs");
    let handle_p50 = percentile(&handle_ask, 0.5);
    report.figure("handle_ask_p50", handle_p50, "µs");
    report.figure("raw_ractor_ask_p50", raw_p50, "µs");
    report.ratio("cross_node_ask_p50", cross_p50, local_p50);
    report.ratio("local_node_ask_p50", local_p50, handle_p50);
    report.ratio("handle_ask_p50", handle_p50, raw_p50);
    node.shutdown().await;
    Ok(())
}

/// The peer process: a node exposing `sink-remote`; prints READY, then
/// runs until killed.
pub fn peer(port: u16) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let node = ClusterNode::start(ClusterConfig::new(
            "peer",
            SocketAddr::from(([127, 0, 0, 1], port)),
            COOKIE,
        ))
        .await?;
        expose_sink(&node, "sink-remote").await?;
        println!("READY");
        // Runs until its parent closes stdin (or dies).
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        })
        .await?;
        node.shutdown().await;
        Ok(())
    })
}

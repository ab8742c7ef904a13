//! The mailbox suite: a Troupe handle against raw ractor (and raw tokio
//! channels for context), durable commands with group commit, and memory
//! per idle actor and per passivated entity.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use troupe_actor::{
    ActorError, DurableConfig, Effect, Entities, EntityConfig, EventSourced, Rejected, mailbox,
};
use troupe_journal::{Durability, Journal, RocksConfig, RocksJournal, Schema};

use super::{Report, rss_kib};
use crate::alloc_count;

type BoxError = Box<dyn std::error::Error>;

fn note(msg: &str) {
    eprintln!("# {msg}");
}

/// Counts messages; answers `Get` with the count.
struct Sink;

#[cfg(feature = "cluster")]
impl ractor::Message for SinkMsg {}

enum SinkMsg {
    Hit,
    Get(RpcReplyPort<u64>),
}

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
            SinkMsg::Hit => *n += 1,
            SinkMsg::Get(r) => {
                let _ = r.send(*n);
            }
        }
        Ok(())
    }
}

pub fn run(quick: bool) -> Result<(), BoxError> {
    let report = Report;
    let tells: u64 = if quick { 300_000 } else { 2_000_000 };
    let asks: u64 = if quick { 50_000 } else { 300_000 };
    let durable_time = if quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(6)
    };
    let idle_actors: usize = if quick { 2_000 } else { 10_000 };

    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Best of three, alternating, so that neither side gets the warm run.
    let (mut troupe_tell, mut ractor_tell, mut tokio_tell) = (0f64, 0f64, 0f64);
    for _ in 0..3 {
        troupe_tell = troupe_tell.max(mt.block_on(tell_troupe(tells))?);
        ractor_tell = ractor_tell.max(mt.block_on(tell_ractor(tells))?);
        tokio_tell = tokio_tell.max(mt.block_on(tell_tokio(tells)));
    }
    report.figure("tell", troupe_tell, "msgs/s");
    report.figure("raw_ractor_cast", ractor_tell, "msgs/s");
    report.figure("raw_tokio_mpsc", tokio_tell, "msgs/s");
    report.ratio("tell", troupe_tell, ractor_tell);

    let st = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut troupe_ask, mut ractor_ask, mut tokio_ask) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..3 {
        troupe_ask = troupe_ask.min(st.block_on(ask_troupe(asks))?);
        ractor_ask = ractor_ask.min(st.block_on(ask_ractor(asks))?);
        tokio_ask = tokio_ask.min(st.block_on(ask_tokio(asks)));
    }
    report.figure("ask_1thread", troupe_ask, "ns");
    report.figure("raw_ractor_call_1thread", ractor_ask, "ns");
    report.figure("raw_tokio_oneshot_1thread", tokio_ask, "ns");
    report.ratio("ask_1thread", troupe_ask, ractor_ask);

    let dir = tempfile::Builder::new().prefix("troupe-bench-").tempdir()?;
    let durable = mt.block_on(durable_commands(dir.path(), durable_time))?;
    report.figure("durable_command", durable, "commands/s");

    let (idle, idle_rss) = mt.block_on(idle_actor_bytes(idle_actors))?;
    report.figure("idle_actor_bytes", idle, "bytes");
    report.figure("idle_actor_rss_bytes", idle_rss, "bytes");
    let dir = tempfile::Builder::new().prefix("troupe-bench-").tempdir()?;
    let (active, passivated) = mt.block_on(entity_bytes(dir.path(), idle_actors))?;
    report.figure("active_entity_bytes", active, "bytes");
    report.figure("passivated_entity_bytes", passivated, "bytes");
    Ok(())
}

async fn tell_troupe(n: u64) -> Result<f64, BoxError> {
    let h = mailbox::spawn("sink", Sink, (), 65_536, None).await?;
    let start = Instant::now();
    for _ in 0..n {
        if let Err(Rejected { message, .. }) = h.tell(SinkMsg::Hit) {
            // Full: wait for room, as a real producer would.
            h.send(message, Duration::from_secs(30))
                .await
                .map_err(Rejected::into_error)?;
        }
    }
    let got = h.ask(SinkMsg::Get, Duration::from_secs(60)).await?;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    if got != n {
        return Err(format!("sink counted {got} of {n}").into());
    }
    if let Some(c) = h.cell() {
        c.stop(None);
    }
    Ok(rate)
}

async fn tell_ractor(n: u64) -> Result<f64, BoxError> {
    let (a, _) = ractor::Actor::spawn(None, Sink, ()).await?;
    let start = Instant::now();
    for _ in 0..n {
        a.cast(SinkMsg::Hit)?;
    }
    let got = ractor::call!(a, SinkMsg::Get)?;
    let rate = n as f64 / start.elapsed().as_secs_f64();
    if got != n {
        return Err(format!("sink counted {got} of {n}").into());
    }
    a.stop(None);
    Ok(rate)
}

async fn tell_tokio(n: u64) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let consumer = tokio::spawn(async move {
        let mut count = 0u64;
        while rx.recv().await.is_some() {
            count += 1;
        }
        count
    });
    let start = Instant::now();
    for i in 0..n {
        let _ = tx.send(i);
    }
    drop(tx);
    let _ = consumer.await;
    n as f64 / start.elapsed().as_secs_f64()
}

async fn ask_troupe(n: u64) -> Result<f64, BoxError> {
    let h = mailbox::spawn("sink", Sink, (), 1024, None).await?;
    let start = Instant::now();
    for _ in 0..n {
        h.ask(SinkMsg::Get, Duration::from_secs(5)).await?;
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    if let Some(c) = h.cell() {
        c.stop(None);
    }
    Ok(ns)
}

async fn ask_ractor(n: u64) -> Result<f64, BoxError> {
    let (a, _) = ractor::Actor::spawn(None, Sink, ()).await?;
    let start = Instant::now();
    for _ in 0..n {
        match a.call(SinkMsg::Get, Some(Duration::from_secs(5))).await? {
            ractor::rpc::CallResult::Success(_) => {}
            _ => return Err("ractor call failed".into()),
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    a.stop(None);
    Ok(ns)
}

async fn ask_tokio(n: u64) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<u64>>(1024);
    let server = tokio::spawn(async move {
        let mut count = 0u64;
        while let Some(reply) = rx.recv().await {
            count += 1;
            let _ = reply.send(count);
        }
    });
    let start = Instant::now();
    for _ in 0..n {
        let (otx, orx) = tokio::sync::oneshot::channel();
        let _ = tx.send(otx).await;
        let _ = orx.await;
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    drop(tx);
    let _ = server.await;
    ns
}

struct Tally;

#[derive(Serialize, Deserialize)]
struct Counted(u64);
impl Schema for Counted {
    const TYPE_NAME: &'static str = "bench.Counted";
}

#[derive(Default, Serialize, Deserialize)]
struct TallyState(u64);
impl Schema for TallyState {
    const TYPE_NAME: &'static str = "bench.Tally";
}

#[cfg(feature = "cluster")]
impl ractor::Message for TallyCmd {}

enum TallyCmd {
    Count(RpcReplyPort<u64>),
    Get(RpcReplyPort<u64>),
}

impl EventSourced for Tally {
    type Command = TallyCmd;
    type Event = Counted;
    type State = TallyState;
    const KIND: &'static str = "tally";

    fn handle(&self, state: &TallyState, cmd: TallyCmd) -> Effect<Self> {
        match cmd {
            TallyCmd::Count(r) => {
                Effect::persist_one(Counted(state.0 + 1)).reply(r, |s: &TallyState| s.0)
            }
            TallyCmd::Get(r) => {
                let n = state.0;
                Effect::none().reply(r, move |_: &TallyState| n)
            }
        }
    }

    fn apply(state: &mut TallyState, e: &Counted) {
        state.0 = e.0;
    }
}

/// 1,000 entities, each persisting one event per command with fsync.
async fn durable_commands(dir: &std::path::Path, time: Duration) -> Result<f64, BoxError> {
    let rocks = RocksJournal::open(RocksConfig::new(dir).durability(Durability::Fsync))?;
    let journal: Arc<dyn Journal> = Arc::new(rocks.clone());
    let config = EntityConfig {
        idle_timeout: None,
        durable: DurableConfig::default(),
        ..EntityConfig::default()
    };
    let tallies = Entities::new(Tally, journal, config);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for e in 0..1000 {
        let (tallies, stop) = (tallies.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let key = format!("t{e}");
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tallies
                    .ask(&key, TallyCmd::Count, Duration::from_secs(30))
                    .await?;
                n += 1;
            }
            Ok::<u64, ActorError>(n)
        }));
    }
    tokio::time::sleep(time).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let rate = total as f64 / start.elapsed().as_secs_f64();
    note(&format!(
        "durable_command: mean group commit {:.0} events",
        rocks.writer_stats().mean_batch()
    ));
    tallies.passivate_all().await;
    rocks.close().await;
    Ok(rate)
}

/// Heap bytes per idle actor with a bounded handle (counted by the
/// binary's allocator), and resident memory per actor for context.
async fn idle_actor_bytes(n: usize) -> Result<(f64, f64), BoxError> {
    alloc_count::start();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rss_before = rss_kib().ok_or("no /proc/self/status")?;
    let before = alloc_count::live();
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        handles.push(mailbox::spawn(format!("idle{i}"), Sink, (), 16, None).await?);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let heap = (alloc_count::live() - before) as f64 / n as f64;
    let rss = (rss_kib()
        .ok_or("no /proc/self/status")?
        .saturating_sub(rss_before)
        * 1024) as f64
        / n as f64;
    for h in &handles {
        if let Some(c) = h.cell() {
            c.stop(None);
        }
    }
    Ok((heap, rss))
}

/// Memory per active entity, and per entity after all were passivated
/// (measured against the same baseline: what passivation leaves behind).
async fn entity_bytes(dir: &std::path::Path, n: usize) -> Result<(f64, f64), BoxError> {
    let rocks = RocksJournal::open(RocksConfig::new(dir).durability(Durability::Buffered))?;
    let journal: Arc<dyn Journal> = Arc::new(rocks.clone());
    let config = EntityConfig {
        idle_timeout: None,
        ..EntityConfig::default()
    };
    let tallies = Entities::new(Tally, journal, config);
    alloc_count::start();
    // Warm up allocator and journal with one entity.
    tallies
        .ask("warm", TallyCmd::Count, Duration::from_secs(30))
        .await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = alloc_count::live();
    for e in 0..n {
        tallies
            .ask(&format!("t{e}"), TallyCmd::Get, Duration::from_secs(30))
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let active = alloc_count::live();
    tallies.passivate_all().await;
    // Stopped actors free their tasks on the runtime's next turns.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let passivated = alloc_count::live();
    if tallies.active_count() != 0 {
        return Err("entities still active after passivation".into());
    }
    rocks.close().await;
    let per = |bytes: i64| (bytes - before).max(0) as f64 / n as f64;
    Ok((per(active), per(passivated)))
}

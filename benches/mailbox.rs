//! Micro-benchmarks of Troupe's actor handles, each beside the raw baseline
//! a user would otherwise pick, in the same run: `tell` and `ask` through a
//! bounded [`ActorHandle`](troupe_actor::ActorHandle) against raw ractor
//! (`cast`, `call`) and raw Tokio channels; a durable command (one event
//! persisted, then the reply) against the same append made directly on the
//! journal with the same durability.
//!
//! `cargo bench --bench mailbox`. Whole-system figures (medians of runs,
//! with their spread) are `troupe bench <suite>`.

use std::sync::Arc;
use std::time::Duration;

use divan::Bencher;
use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use troupe_actor::{
    ActorHandle, DurableConfig, Effect, Entities, EntityConfig, EventSourced, Rejected, mailbox,
};
use troupe_journal::{
    Durability, Journal, NewEvent, PersistenceId, RocksConfig, RocksJournal, Schema,
};

/// Messages per sample of the `tell` benchmarks.
const TELLS: u64 = 10_000;
/// Mailbox capacity of the Troupe handle (bounded, as every Troupe mailbox).
const MAILBOX: usize = 65_536;
const TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    divan::main();
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Counts messages; answers `Get` with the count.
struct Sink;

enum SinkMsg {
    Hit,
    Get(RpcReplyPort<u64>),
}

#[cfg(feature = "cluster")]
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
            SinkMsg::Hit => *n += 1,
            SinkMsg::Get(r) => {
                let _ = r.send(*n);
            }
        }
        Ok(())
    }
}

fn troupe_sink(rt: &Runtime) -> ActorHandle<SinkMsg> {
    rt.block_on(mailbox::spawn("sink", Sink, (), MAILBOX, None))
        .expect("sink")
}

fn stop(h: &ActorHandle<SinkMsg>) {
    if let Some(c) = h.cell() {
        c.stop(None);
    }
}

/// `TELLS` one-way messages, then one ask that waits until all are handled.
mod tell {
    use super::*;

    #[divan::bench]
    fn troupe_handle(b: Bencher) {
        let rt = runtime();
        let h = troupe_sink(&rt);
        b.counter(TELLS).bench_local(|| {
            rt.block_on(async {
                for _ in 0..TELLS {
                    if let Err(Rejected { message, .. }) = h.tell(SinkMsg::Hit) {
                        // Full: wait for room, as a real producer would.
                        h.send(message, TIMEOUT).await.expect("room");
                    }
                }
                h.ask(SinkMsg::Get, TIMEOUT).await.expect("count")
            })
        });
        stop(&h);
    }

    #[divan::bench]
    fn raw_ractor(b: Bencher) {
        let rt = runtime();
        let (a, _) = rt
            .block_on(ractor::Actor::spawn(None, Sink, ()))
            .expect("sink");
        b.counter(TELLS).bench_local(|| {
            rt.block_on(async {
                for _ in 0..TELLS {
                    a.cast(SinkMsg::Hit).expect("cast");
                }
                ractor::call!(a, SinkMsg::Get).expect("count")
            })
        });
        a.stop(None);
    }

    #[divan::bench]
    fn raw_tokio_unbounded(b: Bencher) {
        let rt = runtime();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SinkMsg>();
        rt.spawn(async move {
            let mut n = 0u64;
            while let Some(m) = rx.recv().await {
                match m {
                    SinkMsg::Hit => n += 1,
                    SinkMsg::Get(r) => {
                        let _ = r.send(n);
                    }
                }
            }
        });
        b.counter(TELLS).bench_local(|| {
            rt.block_on(async {
                for _ in 0..TELLS {
                    let _ = tx.send(SinkMsg::Hit);
                }
                let (otx, orx) = ractor::concurrency::oneshot();
                let _ = tx.send(SinkMsg::Get(otx.into()));
                orx.await.expect("count")
            })
        });
    }
}

/// One request and its reply.
mod ask {
    use super::*;

    #[divan::bench]
    fn troupe_handle(b: Bencher) {
        let rt = runtime();
        let h = troupe_sink(&rt);
        b.bench_local(|| rt.block_on(h.ask(SinkMsg::Get, TIMEOUT)).expect("reply"));
        stop(&h);
    }

    #[divan::bench]
    fn raw_ractor(b: Bencher) {
        let rt = runtime();
        let (a, _) = rt
            .block_on(ractor::Actor::spawn(None, Sink, ()))
            .expect("sink");
        b.bench_local(|| match rt.block_on(a.call(SinkMsg::Get, Some(TIMEOUT))) {
            Ok(ractor::rpc::CallResult::Success(n)) => n,
            _ => panic!("ractor call failed"),
        });
        a.stop(None);
    }

    #[divan::bench]
    fn raw_tokio_oneshot(b: Bencher) {
        let rt = runtime();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<u64>>(1024);
        rt.spawn(async move {
            let mut n = 0u64;
            while let Some(reply) = rx.recv().await {
                n += 1;
                let _ = reply.send(n);
            }
        });
        b.bench_local(|| {
            rt.block_on(async {
                let (otx, orx) = tokio::sync::oneshot::channel();
                let _ = tx.send(otx).await;
                orx.await.expect("reply")
            })
        });
    }
}

/// A counter entity: each `Count` persists one event, then replies.
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

enum TallyCmd {
    Count(RpcReplyPort<u64>),
}

#[cfg(feature = "cluster")]
impl ractor::Message for TallyCmd {}

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
        }
    }

    fn apply(state: &mut TallyState, e: &Counted) {
        state.0 = e.0;
    }
}

/// One command that persists one event (Buffered durability: the write,
/// not the disk's flush, is what is measured), one caller at a time.
mod durable_command {
    use super::*;

    fn journal(dir: &std::path::Path) -> RocksJournal {
        RocksJournal::open(RocksConfig::new(dir).durability(Durability::Buffered)).expect("journal")
    }

    #[divan::bench]
    fn troupe_entity(b: Bencher) {
        let rt = runtime();
        let dir = tempfile::tempdir().expect("dir");
        let rocks = journal(dir.path());
        let shared: Arc<dyn Journal> = Arc::new(rocks.clone());
        let config = EntityConfig {
            idle_timeout: None,
            durable: DurableConfig::default(),
            ..EntityConfig::default()
        };
        let tallies = rt.block_on(async { Entities::new(Tally, shared, config) });
        b.bench_local(|| {
            rt.block_on(tallies.ask("t", TallyCmd::Count, TIMEOUT))
                .expect("count")
        });
        rt.block_on(async {
            tallies.passivate_all().await;
            rocks.close().await;
        });
    }

    /// The same event appended directly: what the command costs without
    /// the actor, its state and its reply.
    #[divan::bench]
    fn raw_journal_append(b: Bencher) {
        let rt = runtime();
        let dir = tempfile::tempdir().expect("dir");
        let rocks = journal(dir.path());
        let id = PersistenceId::new("tally", "t").expect("id");
        let mut seq = 0u64;
        b.bench_local(|| {
            let event = NewEvent::new(&Counted(seq + 1)).expect("event");
            seq = rt
                .block_on(rocks.append(&id, seq, vec![event]))
                .expect("append")
                .last_seq;
        });
        rt.block_on(rocks.close());
    }
}

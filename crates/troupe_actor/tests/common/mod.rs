#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use troupe_actor::{Effect, EventSourced};
use troupe_journal::Schema;

/// Polls `cond` every 5 ms until it holds; panics after 20 s (a hang, not a timing decision).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub const T: Duration = Duration::from_secs(10);

/// A durable counter.
pub struct Counter;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum CounterEvent {
    Added(i64),
}
impl Schema for CounterEvent {
    const TYPE_NAME: &'static str = "test.CounterEvent";
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CounterState {
    pub total: i64,
    pub adds: u64,
}
impl Schema for CounterState {
    const TYPE_NAME: &'static str = "test.CounterState";
}

pub enum CounterCmd {
    Add(i64, RpcReplyPort<i64>),
    Get(RpcReplyPort<CounterState>),
    AddSilently(i64),
}

impl EventSourced for Counter {
    type Command = CounterCmd;
    type Event = CounterEvent;
    type State = CounterState;
    const KIND: &'static str = "counter";

    fn handle(&self, state: &CounterState, cmd: CounterCmd) -> Effect<Self> {
        match cmd {
            CounterCmd::Add(n, reply) => {
                Effect::persist_one(CounterEvent::Added(n)).reply(reply, |s: &CounterState| s.total)
            }
            CounterCmd::AddSilently(n) => Effect::persist_one(CounterEvent::Added(n)),
            CounterCmd::Get(reply) => {
                let s = state.clone();
                Effect::none().reply(reply, move |_: &CounterState| s)
            }
        }
    }

    fn apply(state: &mut CounterState, event: &CounterEvent) {
        match event {
            CounterEvent::Added(n) => {
                state.total += n;
                state.adds += 1;
            }
        }
    }
}

/// A plain ractor worker that counts its incarnations.
pub struct Worker {
    pub name: &'static str,
    pub starts: Arc<AtomicU32>,
    pub log: Arc<std::sync::Mutex<Vec<&'static str>>>,
}

pub enum WorkerMsg {
    Fail,
    Panic,
    StopNormally,
    Incarnation(RpcReplyPort<u32>),
}

impl ractor::Actor for Worker {
    type Msg = WorkerMsg;
    type State = u32;
    type Arguments = ();

    async fn pre_start(&self, _me: ActorRef<WorkerMsg>, _: ()) -> Result<u32, ActorProcessingErr> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.name);
        Ok(self.starts.fetch_add(1, Ordering::SeqCst) + 1)
    }

    async fn handle(
        &self,
        me: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        incarnation: &mut u32,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Fail => return Err("asked to fail".into()),
            WorkerMsg::Panic => panic!("asked to panic"),
            WorkerMsg::StopNormally => me.stop(None),
            WorkerMsg::Incarnation(r) => {
                let _ = r.send(*incarnation);
            }
        }
        Ok(())
    }
}

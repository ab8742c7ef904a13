//! Bounded mailboxes: tell fails fast, send waits, ask times out; nothing unbounded.

mod common;

use std::time::Duration;

use common::*;
use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{Semaphore, oneshot};
use troupe_actor::{ActorError, mailbox};

/// Handles `Hold` by waiting for the gate; counts everything it handles.
struct Gate;

enum GateMsg {
    Hold(oneshot::Sender<()>, std::sync::Arc<Semaphore>),
    Count(RpcReplyPort<u32>),
    Tick,
    /// Sends itself `n` ticks through raw ractor (no permits taken).
    Echo(u32),
}

impl ractor::Actor for Gate {
    type Msg = GateMsg;
    type State = u32;
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<GateMsg>, _: ()) -> Result<u32, ActorProcessingErr> {
        Ok(0)
    }
    async fn handle(
        &self,
        me: ActorRef<GateMsg>,
        msg: GateMsg,
        n: &mut u32,
    ) -> Result<(), ActorProcessingErr> {
        *n += 1;
        match msg {
            GateMsg::Hold(started, gate) => {
                let _ = started.send(());
                let _ = gate.acquire().await;
            }
            GateMsg::Count(r) => {
                let _ = r.send(*n);
            }
            GateMsg::Tick => {}
            GateMsg::Echo(k) => {
                for _ in 0..k {
                    me.cast(GateMsg::Tick)?;
                }
            }
        }
        Ok(())
    }
}

async fn held(
    capacity: usize,
) -> (
    troupe_actor::ActorHandle<GateMsg>,
    std::sync::Arc<Semaphore>,
) {
    let h = mailbox::spawn("gate", Gate, (), capacity, None)
        .await
        .expect("spawn");
    let gate = std::sync::Arc::new(Semaphore::new(0));
    let (started, rx) = oneshot::channel();
    h.tell(GateMsg::Hold(started, gate.clone())).expect("tell");
    rx.await.expect("the actor took the first message");
    (h, gate)
}

#[tokio::test]
async fn tell_fails_fast_with_backpressure_once_the_mailbox_is_full() {
    let (h, gate) = held(4).await;
    for _ in 0..4 {
        h.tell(GateMsg::Tick).expect("room for 4");
    }
    assert_eq!(h.depth(), 4);
    match h.tell(GateMsg::Tick) {
        Err(r) => assert!(
            matches!(r.error, ActorError::Backpressure { capacity: 4, .. }),
            "{}",
            r.error
        ),
        Ok(()) => panic!("a fifth message fitted in a mailbox of four"),
    }
    gate.add_permits(1);
    // Everything accepted is handled: 1 hold + 4 ticks + this count.
    assert_eq!(h.ask(GateMsg::Count, T).await.expect("count"), 6);
    assert_eq!(h.depth(), 0);
}

#[tokio::test]
async fn send_waits_for_room_up_to_its_timeout() {
    let (h, gate) = held(2).await;
    h.tell(GateMsg::Tick).expect("tell");
    h.tell(GateMsg::Tick).expect("tell");
    let err = h
        .send(GateMsg::Tick, Duration::from_millis(30))
        .await
        .expect_err("no room");
    assert!(
        matches!(
            err.error,
            ActorError::Timeout {
                operation: "send",
                ..
            }
        ),
        "{}",
        err.error
    );
    let waiting = {
        let h = h.clone();
        tokio::spawn(async move { h.send(GateMsg::Tick, T).await.is_ok() })
    };
    gate.add_permits(1);
    assert!(
        waiting.await.expect("join"),
        "send did not get the room that freed up"
    );
    assert_eq!(h.ask(GateMsg::Count, T).await.expect("count"), 5);
}

#[tokio::test]
async fn ask_times_out_on_a_stuck_actor_and_reports_a_stopped_one() {
    let (h, gate) = held(8).await;
    let err = h
        .ask(GateMsg::Count, Duration::from_millis(30))
        .await
        .expect_err("stuck");
    assert!(
        matches!(
            err,
            ActorError::Timeout {
                operation: "ask",
                ..
            }
        ),
        "{err}"
    );
    gate.add_permits(1);
    h.cell().expect("running").stop(None);
    eventually("stopped", || h.cell().is_none()).await;
    let err = h.tell(GateMsg::Tick).expect_err("stopped actor");
    assert!(
        matches!(err.error, ActorError::NotRunning { .. }),
        "{}",
        err.error
    );
}

#[tokio::test]
async fn messages_an_actor_sends_itself_do_not_corrupt_the_bound() {
    let h = mailbox::spawn("echo", Gate, (), 8, None)
        .await
        .expect("spawn");
    h.tell(GateMsg::Echo(100)).expect("tell");
    // The first count overtakes the self-sent ticks (queued after it); the
    // second comes after them: 1 echo + 2 counts + 100 ticks.
    assert_eq!(h.ask(GateMsg::Count, T).await.expect("count"), 2);
    assert_eq!(h.ask(GateMsg::Count, T).await.expect("count"), 103);
    assert_eq!(h.depth(), 0);
    let (started, rx) = oneshot::channel();
    let gate = std::sync::Arc::new(Semaphore::new(0));
    h.tell(GateMsg::Hold(started, gate.clone())).expect("tell");
    rx.await.expect("held");
    for _ in 0..8 {
        h.tell(GateMsg::Tick)
            .expect("the full capacity is still available");
    }
    assert!(
        h.tell(GateMsg::Tick).is_err(),
        "the bound grew past its capacity"
    );
    gate.add_permits(1);
    assert_eq!(h.ask(GateMsg::Count, T).await.expect("count"), 113);
}

//! Supervision: strategies, restart policies, intensity, nesting, durable children.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use troupe_actor::*;
use troupe_journal::{FaultyJournal, InMemoryJournal, Journal, PersistenceId};

type Log = Arc<std::sync::Mutex<Vec<&'static str>>>;

struct Kid {
    spec: ChildSpec,
    handle: ActorHandle<WorkerMsg>,
    starts: Arc<AtomicU32>,
}

fn kid(name: &'static str, restart: Restart, log: &Log) -> Kid {
    let starts = Arc::new(AtomicU32::new(0));
    let (s, l) = (starts.clone(), log.clone());
    let (spec, handle) = ChildSpec::actor(name, restart, 16, move || {
        (
            Worker {
                name,
                starts: s.clone(),
                log: l.clone(),
            },
            (),
        )
    });
    Kid {
        spec,
        handle,
        starts,
    }
}

fn starts(k: &Kid) -> u32 {
    k.starts.load(Ordering::SeqCst)
}

fn spec(strategy: Strategy) -> SupervisorSpec {
    SupervisorSpec::new("test-sup")
        .strategy(strategy)
        .intensity(100, Duration::from_secs(60))
        .backoff(Backoff::none())
}

#[tokio::test]
async fn one_for_one_restarts_only_the_failed_child() {
    let log = Log::default();
    let (a, b) = (
        kid("a", Restart::Permanent, &log),
        kid("b", Restart::Permanent, &log),
    );
    let sup = SupervisorHandle::spawn(
        spec(Strategy::OneForOne)
            .child(a.spec.clone())
            .child(b.spec.clone()),
    )
    .await
    .expect("start");
    a.handle.tell(WorkerMsg::Fail).expect("tell");
    eventually("a restarted", || starts(&a) == 2).await;
    assert_eq!(
        a.handle.ask(WorkerMsg::Incarnation, T).await.expect("ask"),
        2
    );
    a.handle.tell(WorkerMsg::Panic).expect("tell");
    eventually("a restarted after a panic", || starts(&a) == 3).await;
    assert_eq!(
        a.handle.ask(WorkerMsg::Incarnation, T).await.expect("ask"),
        3
    );
    assert_eq!(starts(&b), 1, "b was restarted too");
    let info = sup.children(T).await.expect("children");
    assert_eq!(info.iter().map(|c| c.restarts).collect::<Vec<_>>(), [2, 0]);
    sup.stop(T).await;
}

#[tokio::test]
async fn one_for_all_restarts_every_child_in_start_order() {
    let log = Log::default();
    let kids = [
        kid("a", Restart::Permanent, &log),
        kid("b", Restart::Permanent, &log),
        kid("c", Restart::Permanent, &log),
    ];
    let mut s = spec(Strategy::OneForAll);
    for k in &kids {
        s = s.child(k.spec.clone());
    }
    let sup = SupervisorHandle::spawn(s).await.expect("start");
    kids[1].handle.tell(WorkerMsg::Fail).expect("tell");
    eventually("all restarted", || kids.iter().all(|k| starts(k) == 2)).await;
    for k in &kids {
        assert_eq!(
            k.handle.ask(WorkerMsg::Incarnation, T).await.expect("ask"),
            2
        );
    }
    assert_eq!(*log.lock().expect("log"), ["a", "b", "c", "a", "b", "c"]);
    sup.stop(T).await;
}

#[tokio::test]
async fn rest_for_one_restarts_the_child_and_those_started_after_it() {
    let log = Log::default();
    let kids = [
        kid("a", Restart::Permanent, &log),
        kid("b", Restart::Permanent, &log),
        kid("c", Restart::Permanent, &log),
    ];
    let mut s = spec(Strategy::RestForOne);
    for k in &kids {
        s = s.child(k.spec.clone());
    }
    let sup = SupervisorHandle::spawn(s).await.expect("start");
    kids[1].handle.tell(WorkerMsg::Fail).expect("tell");
    eventually("b and c restarted", || {
        starts(&kids[1]) == 2 && starts(&kids[2]) == 2
    })
    .await;
    assert_eq!(
        kids[2]
            .handle
            .ask(WorkerMsg::Incarnation, T)
            .await
            .expect("ask"),
        2
    );
    assert_eq!(starts(&kids[0]), 1, "a is before b and must not restart");
    assert_eq!(
        kids[0]
            .handle
            .ask(WorkerMsg::Incarnation, T)
            .await
            .expect("ask"),
        1
    );
    sup.stop(T).await;
}

#[tokio::test]
async fn transient_children_restart_only_after_failures_and_temporary_never() {
    let log = Log::default();
    let (tr, tr2, tmp) = (
        kid("transient", Restart::Transient, &log),
        kid("transient2", Restart::Transient, &log),
        kid("temporary", Restart::Temporary, &log),
    );
    let sup = SupervisorHandle::spawn(
        spec(Strategy::OneForOne)
            .child(tr.spec.clone())
            .child(tr2.spec.clone())
            .child(tmp.spec.clone()),
    )
    .await
    .expect("start");
    tr.handle.tell(WorkerMsg::Fail).expect("tell");
    eventually("transient restarted after failure", || starts(&tr) == 2).await;
    tr2.handle.tell(WorkerMsg::StopNormally).expect("tell");
    tmp.handle.tell(WorkerMsg::Fail).expect("tell");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let c = sup.children(T).await.expect("children");
        if !c[1].running && !c[2].running {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "children never reported stopped: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Give a wrongly scheduled restart every chance to happen, then check it did not.
    tr.handle
        .ask(WorkerMsg::Incarnation, T)
        .await
        .expect("supervisor still serving");
    let info = sup.children(T).await.expect("children");
    assert_eq!((starts(&tr2), starts(&tmp)), (1, 1));
    assert!(
        info[0].running && !info[1].running && !info[2].running,
        "{info:?}"
    );
    assert!(
        tmp.handle.tell(WorkerMsg::Fail).is_err(),
        "a stopped temporary child accepted a message"
    );
    sup.stop(T).await;
}

#[tokio::test]
async fn exceeding_the_intensity_fails_the_supervisor_to_its_parent() {
    let log = Log::default();
    let a = kid("a", Restart::Permanent, &log);
    let inner = SupervisorSpec::new("inner")
        .intensity(2, Duration::from_secs(60))
        .backoff(Backoff::none())
        .child(a.spec.clone());
    let (inner_child, inner_handle) = ChildSpec::supervisor(inner, Restart::Permanent);
    let outer = SupervisorHandle::spawn(spec(Strategy::OneForOne).child(inner_child))
        .await
        .expect("start");
    for n in 1..=2 {
        a.handle.tell(WorkerMsg::Fail).expect("tell");
        eventually("a restarted by inner", || starts(&a) == n + 1).await;
        a.handle
            .ask(WorkerMsg::Incarnation, T)
            .await
            .expect("running");
    }
    let first_inner = inner_handle.cell().expect("inner running").get_id();
    // The third failure in the window is one too many for `inner`.
    a.handle.tell(WorkerMsg::Fail).expect("tell");
    eventually("outer restarted inner", || {
        inner_handle
            .cell()
            .is_some_and(|c| c.get_id() != first_inner)
    })
    .await;
    let info = outer.children(T).await.expect("children");
    assert_eq!(
        info[0].restarts, 1,
        "outer did not restart the failed supervisor"
    );
    eventually("a started afresh under the new inner", || starts(&a) == 4).await;
    assert_eq!(
        a.handle.ask(WorkerMsg::Incarnation, T).await.expect("ask"),
        4
    );
    outer.stop(T).await;
}

#[tokio::test]
async fn a_top_level_supervisor_past_its_intensity_stops() {
    let log = Log::default();
    let a = kid("a", Restart::Permanent, &log);
    let sup = SupervisorHandle::spawn(
        SupervisorSpec::new("lonely")
            .intensity(1, Duration::from_secs(60))
            .backoff(Backoff::none())
            .child(a.spec.clone()),
    )
    .await
    .expect("start");
    let cell = sup.cell().expect("cell");
    a.handle.tell(WorkerMsg::Fail).expect("tell");
    eventually("restarted once", || starts(&a) == 2).await;
    a.handle
        .ask(WorkerMsg::Incarnation, T)
        .await
        .expect("running");
    a.handle.tell(WorkerMsg::Fail).expect("tell");
    eventually("supervisor stopped", || {
        cell.get_status() == ractor::ActorStatus::Stopped
    })
    .await;
    assert!(a.handle.cell().is_none(), "child outlived its supervisor");
}

#[test]
fn backoff_doubles_up_to_its_cap_within_its_jitter() {
    let b = Backoff {
        min: Duration::from_millis(10),
        max: Duration::from_millis(100),
        jitter: 0.2,
    };
    for _ in 0..100 {
        let d1 = b.delay(1).as_secs_f64();
        let d3 = b.delay(3).as_secs_f64();
        let d9 = b.delay(9).as_secs_f64();
        assert!((0.008..=0.012).contains(&d1), "{d1}");
        assert!((0.032..=0.048).contains(&d3), "{d3}");
        assert!((0.08..=0.1).contains(&d9), "{d9}");
    }
    assert_eq!(Backoff::none().delay(5), Duration::ZERO);
}

#[tokio::test]
async fn a_restarted_durable_actor_loses_nothing() {
    let (journal, faults) = FaultyJournal::new(InMemoryJournal::new());
    let journal: Arc<dyn Journal> = Arc::new(journal);
    let id = PersistenceId::parse("counter/sup").expect("id");
    let (j, i) = (journal.clone(), id.clone());
    let (child, counter) = ChildSpec::actor("counter", Restart::Permanent, 64, move || {
        (
            DurableActor(Arc::new(Counter)),
            DurableArgs {
                id: i.clone(),
                journal: j.clone(),
                config: DurableConfig::default(),
            },
        )
    });
    let sup = SupervisorHandle::spawn(spec(Strategy::OneForOne).child(child))
        .await
        .expect("start");
    let mut acknowledged = 0;
    for n in 1..=20i64 {
        if n % 7 == 0 {
            faults.fail_appends(1);
            let r = counter.ask(|r| CounterCmd::Add(n, r), T).await;
            assert!(
                matches!(r, Err(ActorError::NoReply { .. })),
                "a failed append was acknowledged: {r:?}"
            );
            eventually("counter restarted", || counter.cell().is_some()).await;
        } else {
            let total = counter
                .ask(|r| CounterCmd::Add(n, r), T)
                .await
                .expect("add");
            acknowledged += n;
            assert_eq!(total, acknowledged);
        }
    }
    let state = counter.ask(CounterCmd::Get, T).await.expect("get");
    assert_eq!(state.total, acknowledged);
    assert_eq!(sup.children(T).await.expect("children")[0].restarts, 2);
    sup.stop(T).await;
}

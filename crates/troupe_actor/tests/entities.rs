//! Entities: single-flight activation, passivation, reactivation, snapshots, append failures.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use troupe_actor::{ActorError, DurableConfig, Entities, EntityConfig};
use troupe_journal::{FaultPlan, FaultyJournal, InMemoryJournal, Journal, PersistenceId};

fn registry(
    idle: Option<Duration>,
    durable: DurableConfig,
) -> (Entities<Counter>, FaultPlan, InMemoryJournal) {
    let mem = InMemoryJournal::new();
    let (journal, faults) = FaultyJournal::new(mem.clone());
    let config = EntityConfig {
        idle_timeout: idle,
        durable,
        ..EntityConfig::default()
    };
    (
        Entities::new(Counter, Arc::new(journal), config),
        faults,
        mem,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_messages_start_one_incarnation() {
    let (entities, _, mem) = registry(None, DurableConfig::default());
    let mut asks = Vec::new();
    for _ in 0..64 {
        let e = entities.clone();
        asks.push(tokio::spawn(async move {
            e.ask("race", |r| CounterCmd::Add(1, r), T).await
        }));
    }
    let mut totals = Vec::new();
    for a in asks {
        totals.push(a.await.expect("join").expect("every add is acknowledged"));
    }
    totals.sort();
    // A second incarnation would have hit a SeqConflict and dropped replies.
    assert_eq!(totals, (1..=64).collect::<Vec<i64>>());
    assert_eq!(entities.active_count(), 1);
    let id = PersistenceId::parse("counter/race").expect("id");
    assert_eq!(mem.highest_seq(&id).await.expect("highest"), 64);
}

#[tokio::test]
async fn idle_entities_are_passivated_and_come_back_with_their_state() {
    let (entities, _, _) = registry(Some(Duration::from_millis(20)), DurableConfig::default());
    for n in 1..=5 {
        entities
            .ask("sleepy", |r| CounterCmd::Add(n, r), T)
            .await
            .expect("add");
    }
    eventually("passivated", || !entities.is_active("sleepy")).await;
    assert_eq!(entities.active_count(), 0);
    let state = entities
        .ask("sleepy", CounterCmd::Get, T)
        .await
        .expect("get");
    assert_eq!(state, CounterState { total: 15, adds: 5 });
    assert!(entities.is_active("sleepy"));
}

#[tokio::test]
async fn a_failed_append_is_never_acknowledged_and_the_entity_recovers() {
    let (entities, faults, _) = registry(None, DurableConfig::default());
    entities
        .ask("f", |r| CounterCmd::Add(10, r), T)
        .await
        .expect("add");
    faults.fail_appends(1);
    let err = entities
        .ask("f", |r| CounterCmd::Add(5, r), T)
        .await
        .expect_err("failed append");
    assert!(matches!(err, ActorError::NoReply { .. }), "{err}");
    let state = entities
        .ask("f", CounterCmd::Get, T)
        .await
        .expect("reactivated");
    assert_eq!(state.total, 10, "state ran ahead of the journal");
}

#[tokio::test]
async fn retries_ride_out_transient_failures_and_a_lost_ack_is_recovered_not_duplicated() {
    let cfg = DurableConfig::default().retry_appends(3, Duration::from_millis(1));
    let (entities, faults, _) = registry(None, cfg);
    faults.fail_appends(2);
    assert_eq!(
        entities
            .ask("r", |r| CounterCmd::Add(7, r), T)
            .await
            .expect("retried"),
        7
    );
    // The write lands but its acknowledgement is lost: the retry meets a
    // SeqConflict, the entity fails and recovers the event exactly once.
    faults.lose_acks(1);
    let err = entities
        .ask("r", |r| CounterCmd::Add(3, r), T)
        .await
        .expect_err("outcome unknown");
    assert!(matches!(err, ActorError::NoReply { .. }), "{err}");
    let state = entities.ask("r", CounterCmd::Get, T).await.expect("get");
    assert_eq!(state, CounterState { total: 10, adds: 2 });
}

#[tokio::test]
async fn snapshots_are_saved_every_n_events_and_used_on_recovery() {
    let cfg = DurableConfig {
        delete_covered_events: true,
        ..DurableConfig::default().snapshot_every(10)
    };
    let (entities, _, mem) = registry(Some(Duration::from_millis(20)), cfg);
    for n in 1..=25 {
        entities
            .ask("s", |r| CounterCmd::Add(n, r), T)
            .await
            .expect("add");
    }
    let id = PersistenceId::parse("counter/s").expect("id");
    let snap = mem
        .load_snapshot(&id)
        .await
        .expect("load")
        .expect("snapshot");
    assert_eq!(snap.seq, 20);
    let left = mem
        .replay(&id, 1, u64::MAX)
        .collect_all()
        .await
        .expect("replay");
    assert_eq!(
        left.first().map(|e| e.seq),
        Some(21),
        "covered events were not deleted"
    );
    eventually("passivated", || !entities.is_active("s")).await;
    let state = entities.ask("s", CounterCmd::Get, T).await.expect("get");
    assert_eq!(
        state,
        CounterState {
            total: (1..=25).sum(),
            adds: 25
        }
    );
    entities
        .ask("s", |r| CounterCmd::Add(1, r), T)
        .await
        .expect("appends continue after deletion");
}

#[tokio::test]
async fn invalid_keys_are_refused_with_a_typed_error() {
    let (entities, _, _) = registry(None, DurableConfig::default());
    let err = entities
        .ask("bad\0key", CounterCmd::Get, T)
        .await
        .expect_err("NUL in key");
    assert!(matches!(err, ActorError::Invalid { .. }), "{err}");
}

#[tokio::test]
async fn passivate_all_drains_every_mailbox_first() {
    let (entities, _, mem) = registry(None, DurableConfig::default());
    for k in 0..10 {
        for _ in 0..20 {
            entities
                .tell(&format!("d{k}"), CounterCmd::AddSilently(1))
                .await
                .expect("tell");
        }
    }
    entities.passivate_all().await;
    assert_eq!(entities.active_count(), 0);
    for k in 0..10 {
        let id = PersistenceId::parse(&format!("counter/d{k}")).expect("id");
        assert_eq!(
            mem.highest_seq(&id).await.expect("highest"),
            20,
            "{id} lost queued commands"
        );
    }
}

#[tokio::test]
async fn entities_past_the_bound_are_refused_until_others_passivate() {
    let mem = InMemoryJournal::new();
    let config = EntityConfig {
        idle_timeout: None,
        max_entities: 2,
        ..EntityConfig::default()
    };
    let entities = Entities::new(Counter, Arc::new(mem), config);
    entities
        .ask("a", |r| CounterCmd::Add(1, r), T)
        .await
        .expect("a");
    entities
        .ask("b", |r| CounterCmd::Add(1, r), T)
        .await
        .expect("b");
    let err = entities
        .ask("c", |r| CounterCmd::Add(1, r), T)
        .await
        .expect_err("third entity");
    assert!(
        matches!(err, ActorError::TooManyActive { limit: 2, .. }),
        "{err}"
    );
    assert!(err.is_transient() && err.retry_after().is_some(), "{err}");
    entities
        .ask("a", CounterCmd::Get, T)
        .await
        .expect("active ones still answer");
    entities.passivate_all().await;
    assert_eq!(
        entities
            .ask("c", |r| CounterCmd::Add(1, r), T)
            .await
            .expect("room again"),
        1
    );
}

#[tokio::test]
async fn dropping_the_registry_stops_its_entities() {
    let (entities, _, _) = registry(None, DurableConfig::default());
    entities
        .ask("orphan", |r| CounterCmd::Add(1, r), T)
        .await
        .expect("add");
    let handle = entities.handle("orphan").await.expect("handle");
    assert!(handle.cell().is_some());
    drop(entities);
    eventually("stopped", || handle.cell().is_none()).await;
}

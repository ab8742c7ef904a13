//! Sessions: turn rules, resumable subscriptions with no gap and no
//! duplicate at the journal/live seam, heartbeats, passivation and
//! recovery from RocksDB.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use proptest::prelude::*;
use troupe_agent::{
    AgentError, SessionConfig, SessionEvent, SessionItem, SessionStream, Sessions, TurnRef,
};
use troupe_journal::{InMemoryJournal, Journal, RocksConfig, RocksJournal};

fn chunk(turn: u32, text: &str) -> SessionEvent {
    SessionEvent::ModelChunk {
        turn,
        text: text.into(),
    }
}

fn done(turn: u32) -> SessionEvent {
    SessionEvent::TurnCompleted {
        turn,
        finish_reason: "stop".into(),
        usage: None,
    }
}

/// Reads events until `last`, checking they are exactly `from..=last` in order.
async fn read_until(stream: &mut SessionStream, from: u64, last: u64) -> Vec<SessionEvent> {
    let mut expect = from;
    let mut out = Vec::new();
    while expect <= last {
        match stream.next().await.expect("stream ended").unwrap() {
            SessionItem::Event(rec) => {
                assert_eq!(rec.seq, expect, "gap or duplicate at seq {expect}");
                out.push(rec.event.clone());
                expect += 1;
            }
            SessionItem::Heartbeat => {}
        }
    }
    out
}

#[tokio::test]
async fn turn_rules_are_typed_errors() {
    let s = Sessions::new(Arc::new(InMemoryJournal::new()), SessionConfig::default());
    assert!(matches!(
        s.post("nope", "hi").await,
        Err(AgentError::UnknownSession(_))
    ));
    assert!(matches!(
        s.subscribe("nope", 0).await,
        Err(AgentError::UnknownSession(_))
    ));
    assert!(matches!(
        s.post("", "hi").await,
        Err(AgentError::Invalid { .. })
    ));
    let id = s.create("bot", Some("acme")).await.unwrap();
    assert!(matches!(
        s.begin(&id, "m").await,
        Err(AgentError::NothingToAnswer(_))
    ));
    let big = "x".repeat(s.config().max_text_bytes + 1);
    assert!(matches!(
        s.post(&id, &big).await,
        Err(AgentError::TooLarge { .. })
    ));
    let p = s.post(&id, "hello").await.unwrap();
    assert_eq!((p.turn, p.seq), (1, 2));
    assert!(matches!(
        s.post(&id, "again").await,
        Err(AgentError::Busy { turn: 1, .. })
    ));
    let first = s.begin(&id, "m").await.unwrap();
    assert_eq!(
        first,
        TurnRef {
            turn: 1,
            attempt: 1
        }
    );
    s.append(&id, first, vec![chunk(1, "partial")])
        .await
        .unwrap();
    // A restart: attempt 2 voids attempt 1, whose writer is now refused.
    let second = s.begin(&id, "m").await.unwrap();
    assert_eq!(second.attempt, 2);
    assert!(matches!(
        s.append(&id, first, vec![chunk(1, "late")]).await,
        Err(AgentError::StaleTurn { attempt: 1, .. })
    ));
    // Events of another turn, or after the turn's end, are refused.
    assert!(matches!(
        s.append(&id, second, vec![chunk(2, "x")]).await,
        Err(AgentError::Invalid { .. })
    ));
    assert!(matches!(
        s.append(&id, second, vec![done(1), chunk(1, "x")]).await,
        Err(AgentError::Invalid { .. })
    ));
    s.append(
        &id,
        second,
        vec![chunk(1, "full "), chunk(1, "reply"), done(1)],
    )
    .await
    .unwrap();
    let v = s.view(&id).await.unwrap();
    assert_eq!(v.tenant.as_deref(), Some("acme"));
    assert_eq!((v.turns, v.completed, v.pending), (1, 1, None));
    assert_eq!(v.messages.len(), 2);
    assert_eq!(
        v.messages[1].content, "full reply",
        "attempt 1's text is void"
    );
    s.close(&id, "done").await.unwrap();
    assert!(matches!(
        s.post(&id, "hi").await,
        Err(AgentError::SessionClosed(_))
    ));
}

#[tokio::test]
async fn heartbeats_and_freed_subscriptions() {
    let config = SessionConfig {
        heartbeat: Duration::from_millis(10),
        ..SessionConfig::default()
    };
    let s = Sessions::new(Arc::new(InMemoryJournal::new()), config);
    let id = s.create("bot", None).await.unwrap();
    let mut sub = s.subscribe(&id, 0).await.unwrap();
    assert_eq!(s.subscribed_count(), 1);
    read_until(&mut sub, 1, 1).await;
    assert_eq!(sub.next().await.unwrap().unwrap(), SessionItem::Heartbeat);
    s.post(&id, "hi").await.unwrap();
    let evs = read_until(&mut sub, 2, 2).await;
    assert!(matches!(evs[0], SessionEvent::UserTurn { turn: 1, .. }));
    drop(sub);
    assert_eq!(s.subscribed_count(), 0, "a dropped subscriber is freed");
}

#[tokio::test]
async fn subscribers_per_session_are_bounded() {
    let config = SessionConfig {
        max_subscribers: 2,
        ..SessionConfig::default()
    };
    let s = Sessions::new(Arc::new(InMemoryJournal::new()), config);
    let id = s.create("bot", None).await.unwrap();
    let a = s.subscribe(&id, 0).await.unwrap();
    let _b = s.subscribe(&id, 0).await.unwrap();
    assert!(matches!(
        s.subscribe(&id, 0).await,
        Err(AgentError::Overloaded { .. })
    ));
    drop(a);
    let _c = s.subscribe(&id, 0).await.expect("room again once one left");
}

#[tokio::test]
async fn sessions_recover_from_rocksdb_after_passivation_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SessionConfig::default();
    config.entities.durable = config.entities.durable.snapshot_every(5);
    let id;
    {
        let j = Arc::new(RocksJournal::open(RocksConfig::new(dir.path())).unwrap());
        let s = Sessions::new(j.clone(), config.clone());
        id = s.create("bot", None).await.unwrap();
        for t in 1..=4 {
            s.post(&id, &format!("question {t}")).await.unwrap();
            let r = s.begin(&id, "m").await.unwrap();
            s.append(
                &id,
                r,
                vec![chunk(t, "answer "), chunk(t, &t.to_string()), done(t)],
            )
            .await
            .unwrap();
        }
        s.passivate_all().await;
        assert_eq!(s.active_count(), 0);
        // Reactivated from snapshot + journal.
        assert_eq!(s.view(&id).await.unwrap().completed, 4);
        s.post(&id, "question 5").await.unwrap();
        s.passivate_all().await;
        j.close().await;
    }
    let j: Arc<dyn Journal> = Arc::new(RocksJournal::open(RocksConfig::new(dir.path())).unwrap());
    let s = Sessions::new(j, config);
    let v = s.view(&id).await.unwrap();
    assert_eq!((v.turns, v.completed, v.seq), (5, 4, 1 + 4 * 5 + 1));
    assert_eq!(v.messages[7].content, "answer 4");
    assert_eq!(
        v.pending,
        Some(TurnRef {
            turn: 5,
            attempt: 0
        })
    );
    let mut sub = s.subscribe(&id, 20).await.unwrap();
    let evs = read_until(&mut sub, 21, 22).await;
    assert!(
        matches!(&evs[1], SessionEvent::UserTurn { turn: 5, text, .. } if text == "question 5")
    );
}

#[tokio::test]
async fn a_keyed_post_sent_again_gets_its_first_turn_back_across_snapshots_and_restarts() {
    use troupe_agent::{Dispatch, MAX_KEYED_TURNS};
    let dir = tempfile::tempdir().unwrap();
    let mut config = SessionConfig::default();
    config.entities.durable = config.entities.durable.snapshot_every(3);
    let keyed = |s: &Sessions, id: &str, text: &str, key: &str| {
        let (s, id, text, key) = (s.clone(), id.to_owned(), text.to_owned(), key.to_owned());
        async move {
            s.post_keyed(&id, &text, Vec::new(), Dispatch::Later, Some(key))
                .await
        }
    };
    let (id, first);
    {
        let j = Arc::new(RocksJournal::open(RocksConfig::new(dir.path())).unwrap());
        let s = Sessions::new(j.clone(), config.clone());
        id = s.create("bot", None).await.unwrap();
        first = keyed(&s, &id, "refund order 17", "k1").await.unwrap();
        assert!(!first.repeated);
        // While its turn is pending: the first answer, not `Busy`.
        let again = keyed(&s, &id, "refund order 17", "k1").await.unwrap();
        assert_eq!(
            (again.turn, again.seq, again.repeated),
            (first.turn, first.seq, true)
        );
        // The same key with another message is refused, and posts nothing.
        assert!(matches!(
            keyed(&s, &id, "refund order 18", "k1").await,
            Err(AgentError::KeyReused { turn: 1, .. })
        ));
        assert!(matches!(
            s.keyed_turn(&id, "k1", "refund order 18", &[]).await,
            Err(AgentError::KeyReused { .. })
        ));
        // Once the turn has ended, still the first answer; a new key is a
        // new turn.
        let r = s.begin(&id, "m").await.unwrap();
        s.append(&id, r, vec![chunk(1, "done"), done(1)])
            .await
            .unwrap();
        assert_eq!(
            keyed(&s, &id, "refund order 17", "k1").await.unwrap().seq,
            first.seq
        );
        let second = keyed(&s, &id, "and order 18", "k2").await.unwrap();
        assert_eq!(second.turn, 2);
        let r = s.begin(&id, "m").await.unwrap();
        s.append(&id, r, vec![done(2)]).await.unwrap();
        s.passivate_all().await;
        j.close().await;
    }
    // Reopened from a snapshot and the journal: the keys are still known.
    let j: Arc<dyn Journal> = Arc::new(RocksJournal::open(RocksConfig::new(dir.path())).unwrap());
    let s = Sessions::new(j, config);
    let again = s
        .keyed_turn(&id, "k1", "refund order 17", &[])
        .await
        .unwrap()
        .expect("k1 remembered");
    assert_eq!((again.turn, again.seq), (first.turn, first.seq));
    assert_eq!(s.keyed_turn(&id, "k3", "x", &[]).await.unwrap(), None);
    assert_eq!(
        s.view(&id).await.unwrap().turns,
        2,
        "retries posted nothing"
    );
    // Only the latest keys are kept: the oldest is forgotten first.
    let s = Sessions::new(Arc::new(InMemoryJournal::new()), SessionConfig::default());
    let id = s.create("bot", None).await.unwrap();
    for n in 0..=MAX_KEYED_TURNS as u32 {
        keyed(&s, &id, "q", &format!("key-{n}")).await.unwrap();
        let r = s.begin(&id, "m").await.unwrap();
        s.append(&id, r, vec![done(n + 1)]).await.unwrap();
    }
    assert_eq!(s.keyed_turn(&id, "key-0", "q", &[]).await.unwrap(), None);
    let last = format!("key-{MAX_KEYED_TURNS}");
    assert!(s.keyed_turn(&id, &last, "q", &[]).await.unwrap().is_some());
    assert!(
        s.keyed_turn(&id, "key-1", "q", &[])
            .await
            .unwrap()
            .is_some()
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Subscribers that join at random moments, from random sequences,
    /// while a writer appends (and the session passivates), each receive
    /// every later event exactly once and in order.
    #[test]
    fn subscribers_see_every_event_once_across_the_seam(
        turns in 1u32..6,
        chunks in 1usize..12,
        joins in proptest::collection::vec((0usize..40, 0u64..60), 1..5),
        passivate_at in proptest::option::of(0u32..6),
        live_buffer in 1usize..8,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let config = SessionConfig { live_buffer, ..SessionConfig::default() };
            let s = Sessions::new(Arc::new(InMemoryJournal::new()), config);
            let id = s.create("bot", None).await.unwrap();
            let final_seq = 1 + u64::from(turns) * (2 + chunks as u64 + 1);
            let writer = {
                let (s, id) = (s.clone(), id.clone());
                tokio::spawn(async move {
                    for t in 1..=turns {
                        if passivate_at == Some(t) {
                            s.passivate_all().await;
                        }
                        s.post(&id, "q").await.unwrap();
                        let r = s.begin(&id, "m").await.unwrap();
                        for c in 0..chunks {
                            s.append(&id, r, vec![chunk(t, &c.to_string())]).await.unwrap();
                            tokio::task::yield_now().await;
                        }
                        s.append(&id, r, vec![done(t)]).await.unwrap();
                    }
                })
            };
            let mut readers = Vec::new();
            for (delay, after) in joins {
                for _ in 0..delay {
                    tokio::task::yield_now().await;
                }
                let now = s.view(&id).await.unwrap().seq;
                let after = after.min(now);
                let mut sub = s.subscribe(&id, after).await.unwrap();
                readers.push(tokio::spawn(async move {
                    read_until(&mut sub, after + 1, final_seq).await.len() as u64
                }));
            }
            writer.await.unwrap();
            for r in readers {
                tokio::time::timeout(Duration::from_secs(30), r).await.expect("reader stuck").unwrap();
            }
        });
    }
}

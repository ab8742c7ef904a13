//! A session served by a real process that is killed with SIGKILL in the
//! middle of streamed replies, again and again. A client that resumes from
//! the last sequence it saw gets every acknowledged event exactly once and
//! in order, interrupted turns are answered again (a new attempt), and the
//! session carries on to its last turn.

use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use troupe::agent::{SessionEvent, SessionItem};
use troupe::prelude::*;

mod common;

const CHILD_DIR: &str = "TROUPE_SESSION_CHILD_DIR";
const CHILD_AFTER: &str = "TROUPE_SESSION_CHILD_AFTER";
const TURNS: u32 = 12;
const SESSION: &str = "conversation-1";

/// Answers with the model (the default turn).
struct Desk;

impl Agent for Desk {
    type State = ();
}

const DESK: AgentKey<Desk> = AgentKey::new("desk");

/// The serving process: resumes the client after `AFTER`, finishes an
/// interrupted turn, then runs turns until `TURNS`, printing `EV` lines
/// for what the client receives and `ACK` lines for acknowledged appends.
#[test]
#[ignore = "the child process of a_killed_session_loses_nothing_and_carries_on"]
fn session_child() {
    let (Ok(dir), Ok(after)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_AFTER)) else {
        return;
    };
    let after: u64 = after.parse().expect("after");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        // Building the system resumes the turn a kill interrupted.
        let troupe = Troupe::builder()
            .data_dir(&dir)
            .durability(Durability::Fsync)
            .backend(
                LocalBackend::default()
                    .words(24, 2)
                    .latency(Duration::from_millis(1), Duration::from_millis(1)),
            )
            .agent(&DESK, Desk, AgentOptions::default())
            .build()
            .await
            .expect("troupe");
        let sessions = troupe.sessions().clone();
        sessions.open(SESSION, DESK.name(), None).await.expect("open");

        // The client: everything after what it saw, then live.
        let mut stream = sessions.subscribe(SESSION, after).await.expect("subscribe");
        let client = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                if let SessionItem::Event(rec) = item.expect("stream") {
                    let json = serde_json::to_string(&rec.event).expect("json");
                    println!("EV {} {json}", rec.seq);
                    if matches!(&rec.event, SessionEvent::TurnCompleted { turn, .. } if *turn == TURNS) {
                        return;
                    }
                }
            }
        });

        let answer = |turn| {
            let agents = troupe.agents().clone();
            async move { agents.wait_turn_end(SESSION, turn).await.expect("turn") }
        };
        let view = sessions.view(SESSION).await.expect("view");
        if let Some(p) = view.pending {
            let o = answer(p.turn).await;
            println!("ACK {}", o.seq);
        }
        let mut view = sessions.view(SESSION).await.expect("view");
        while view.completed < TURNS {
            let posted = sessions
                .post(SESSION, &format!("question {}", view.turns + 1))
                .await
                .expect("post");
            println!("ACK {}", posted.seq);
            let o = answer(posted.turn).await;
            println!("ACK {}", o.seq);
            view = sessions.view(SESSION).await.expect("view");
        }
        client.await.expect("client");
        println!("DONE");
    });
}

#[test]
fn a_killed_session_loses_nothing_and_carries_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rng();
    let mut received: Vec<(u64, String)> = Vec::new();
    let mut acked = 0u64;
    let mut kills = 0;
    let mut finished = false;
    for round in 0..40 {
        let after = received.last().map_or(0, |(s, _)| *s);
        let mut child = common::spawn(
            "session_child",
            &[
                (CHILD_DIR, dir.path().display().to_string()),
                (CHILD_AFTER, after.to_string()),
            ],
        );
        // Kill right after a streamed chunk reaches the client, a random
        // number of chunks in (no kill after 8 rounds: let it finish).
        let kill_at = (kills < 8).then(|| rng.random_range(1..40));
        let mut chunks = 0;
        let mut lines = Vec::new();
        while let Some(line) = child.next_line(Duration::from_secs(120)) {
            let is_chunk = line.starts_with("EV ") && line.contains(r#""type":"model_chunk""#);
            lines.push(line);
            if is_chunk {
                chunks += 1;
                if Some(chunks) == kill_at {
                    child.kill();
                    kills += 1;
                    break;
                }
            }
        }
        lines.extend(child.finish());
        for line in lines {
            if let Some(rest) = line.strip_prefix("EV ") {
                let (seq, json) = rest.split_once(' ').expect("EV line");
                let seq: u64 = seq.parse().expect("seq");
                let last = received.last().map_or(0, |(s, _)| *s);
                assert_eq!(
                    seq,
                    last + 1,
                    "round {round}: gap or duplicate at {seq} (last seen {last})"
                );
                received.push((seq, json.to_owned()));
            } else if let Some(seq) = line.strip_prefix("ACK ") {
                acked = acked.max(seq.parse().expect("ack"));
            } else if line == "DONE" {
                finished = true;
            }
        }
        if finished {
            break;
        }
    }
    assert!(finished, "the session never reached turn {TURNS}");
    assert!(kills >= 1);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let journal = RocksJournal::open_read_only(dir.path().join("journal")).expect("journal");
        let id = PersistenceId::new("session", SESSION).expect("id");
        let events = journal.replay(&id, 1, u64::MAX).collect_all().await.expect("replay");
        assert!(acked <= events.len() as u64, "an acknowledged event is missing");
        // The client saw exactly the journal, each event once, in order.
        let journaled: Vec<(u64, String)> = events
            .iter()
            .map(|e| {
                let ev: SessionEvent = e.decode().expect("decode");
                (e.seq, serde_json::to_string(&ev).expect("json"))
            })
            .collect();
        assert_eq!(received, journaled, "the client's view differs from the journal");
        // Every turn ended exactly once; interrupted attempts were restarted.
        let decoded: Vec<SessionEvent> = events.iter().map(|e| e.decode().expect("decode")).collect();
        let completed: Vec<u32> = decoded
            .iter()
            .filter_map(|e| match e {
                SessionEvent::TurnCompleted { turn, .. } => Some(*turn),
                _ => None,
            })
            .collect();
        assert_eq!(completed, (1..=TURNS).collect::<Vec<_>>());
        let restarts = decoded
            .iter()
            .filter(|e| matches!(e, SessionEvent::TurnStarted { attempt, .. } if *attempt > 1))
            .count();
        eprintln!(
            "{kills} kills, {} events received exactly once, {restarts} interrupted turns answered again",
            received.len()
        );
    });
}

//! Tool calls that run once, under SIGKILL: a child process answers turns
//! that call tools, and is killed at random moments, over and over. Every
//! raw invocation of each tool is recorded outside the process (synced to
//! disk before the tool does anything; the recorder deduplicates nothing),
//! with its idempotency key and the process incarnation that ran it. Then,
//! from the recorder and the journal:
//!
//! - a call whose result was journaled is never invoked again;
//! - a call is invoked again only if it has no journaled result from an
//!   earlier run, and always with the key of its first invocation (the
//!   key was journaled with the call before the tool ran);
//! - a tool marked not safe to repeat is never invoked twice;
//! - every turn ends, answered or failed; none is left pending.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::Rng;
use serde_json::json;
use troupe::agent::SessionEvent;
use troupe::prelude::*;
use troupe::testing::{Recorder, read_lines};

mod common;

const CHILD_DIR: &str = "TROUPE_TOOL_CHILD_DIR";
const CHILD_ROUND: &str = "TROUPE_TOOL_CHILD_ROUND";
const SESSIONS: usize = 4;
const TURNS: u32 = 12;
const ROUNDS: usize = 50;

struct Desk;

impl Agent for Desk {
    type State = ();
}

const DESK: AgentKey<Desk> = AgentKey::new("desk");

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Args {
    item: String,
}

// ANCHOR: recorder
/// A tool that records each raw invocation, then works for a moment.
fn tool(name: &'static str, recorder: Recorder, incarnation: u32) -> Tool {
    Tool::keyed(name, "Does its job", move |a: Args, call: ToolCallInfo| {
        let recorder = recorder.clone();
        async move {
            let key = call.idempotency_key();
            recorder
                .record(&format!("{incarnation} {name} {key}"))
                .map_err(|e| e.to_string())?;
            let pause = rand::rng().random_range(0..4);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            Ok::<_, String>(json!({"incarnation": incarnation, "key": key, "item": a.item}))
        }
    })
}
// ANCHOR_END: recorder

// ANCHOR: child
/// The child: resumes what the last one left, then answers turns until
/// every session has had its turns (or it is killed).
#[test]
#[ignore = "the child process of tool_calls_survive_sigkill_without_running_twice"]
fn tool_child() {
    let (Ok(dir), Ok(round)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_ROUND)) else {
        return;
    };
    let incarnation: u32 = round.parse().expect("round");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = std::path::PathBuf::from(dir);
        let recorder = Recorder::open(dir.join("invocations")).expect("recorder");
        let tools = Tools::new()
            .with(tool("lookup", recorder.clone(), incarnation))
            .with(tool("charge", recorder, incarnation).at_most_once());
        let model = LocalBackend::default()
            .words(8, 1)
            .latency(Duration::from_millis(1), Duration::from_millis(1))
            .call_tool_when("look", "lookup", json!({"item": "order"}))
            .call_tool_when("charge", "charge", json!({"item": "card"}));
        // Building resumes the turns the last kill interrupted.
        let troupe = Troupe::builder()
            .data_dir(&dir)
            .durability(Durability::Fsync)
            .backend(model)
            .agent(&DESK, Desk, AgentOptions::default().tools(tools))
            .build()
            .await
            .expect("troupe");
        println!("READY");
        let mut clients = Vec::new();
        for s in 0..SESSIONS {
            let agents = troupe.agents().clone();
            clients.push(tokio::spawn(async move {
                let id = format!("s{s}");
                let sessions = agents.sessions();
                sessions.open(&id, DESK.name(), None).await.expect("open");
                loop {
                    let view = sessions.view(&id).await.expect("view");
                    if let Some(p) = view.pending {
                        let _ = agents.wait_turn_end(&id, p.turn).await;
                        continue;
                    }
                    if view.turns >= TURNS {
                        return;
                    }
                    let text = if view.turns % 2 == 0 {
                        "please look up my order"
                    } else {
                        "please charge my card"
                    };
                    let posted = sessions.post(&id, text).await.expect("post");
                    let _ = agents.wait_turn_end(&id, posted.turn).await;
                }
            }));
        }
        for c in clients {
            c.await.expect("client");
        }
        troupe.shutdown().await.expect("shutdown");
        println!("DONE");
    });
}
// ANCHOR_END: child

/// One journaled call, as the checks see it.
#[derive(Debug, Default)]
struct Journaled {
    tool: String,
    /// The incarnation whose run produced the journaled result (None: an
    /// interrupted call failed without running, or no result).
    result_from: Option<u32>,
    results: usize,
}

#[test]
fn tool_calls_survive_sigkill_without_running_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rng();
    let mut kills = 0;
    let mut finished = false;
    // ANCHOR: kill
    for round in 0..ROUNDS + 20 {
        let mut child = common::spawn(
            "tool_child",
            &[
                (CHILD_DIR, dir.path().display().to_string()),
                (CHILD_ROUND, round.to_string()),
            ],
        );
        // libtest prints its own lines first.
        loop {
            match child.next_line(Duration::from_secs(60)) {
                Some(l) if l == "READY" => break,
                Some(_) => {}
                None => panic!("round {round}: the child exited before it was ready"),
            }
        }
        if round < ROUNDS {
            // A random moment of its work: resuming, calling a tool,
            // streaming, journaling.
            std::thread::sleep(Duration::from_millis(rng.random_range(0..25)));
            if child.kill() {
                kills += 1;
            }
            child.finish();
            continue;
        }
        let mut lines = Vec::new();
        while let Some(line) = child.next_line(Duration::from_secs(120)) {
            lines.push(line);
        }
        lines.extend(child.finish());
        if lines.iter().any(|l| l == "DONE") {
            finished = true;
            break;
        }
    }
    // ANCHOR_END: kill
    assert!(finished, "the sessions never got through their turns");
    // Kills that found the child at work (it can have finished all its
    // turns before a late one); most must have.
    assert!(
        kills >= ROUNDS / 2,
        "only {kills} of {ROUNDS} kills found the child still running"
    );

    // Every raw invocation: (incarnation, tool, key).
    let invocations: Vec<(u32, String, String)> = read_lines(dir.path().join("invocations"))
        .expect("recorder")
        .iter()
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            let inc = parts
                .next()
                .and_then(|p| p.parse().ok())
                .expect("incarnation");
            let tool = parts.next().expect("tool").to_owned();
            let key = parts.next().expect("key").to_owned();
            (inc, tool, key)
        })
        .collect();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (journaled, interrupted_turns) = rt.block_on(async {
        let journal = RocksJournal::open_read_only(dir.path().join("journal")).expect("journal");
        let mut calls: BTreeMap<String, Journaled> = BTreeMap::new();
        let mut interrupted_turns = 0;
        for s in 0..SESSIONS {
            let id = PersistenceId::new("session", &format!("s{s}")).expect("id");
            let events = journal
                .replay(&id, 1, u64::MAX)
                .collect_all()
                .await
                .expect("replay");
            let mut call_keys: BTreeMap<String, String> = BTreeMap::new();
            let (mut turn, mut rounds) = (0, 0);
            let mut pending = false;
            let mut ended = 0;
            for e in &events {
                match e.decode::<SessionEvent>().expect("decode") {
                    SessionEvent::UserTurn { turn: t, .. } => {
                        (turn, rounds, pending) = (t, 0, true);
                    }
                    SessionEvent::TurnStarted { attempt, .. } if attempt > 1 => {
                        interrupted_turns += 1;
                    }
                    SessionEvent::ToolCalled { call, .. } => {
                        rounds += 1;
                        let key = format!("s{s}/{turn}/{rounds}/0");
                        calls.entry(key.clone()).or_default().tool = call.name.clone();
                        call_keys.insert(call.id, key);
                    }
                    SessionEvent::ToolResult {
                        call_id,
                        output,
                        ok,
                        ..
                    } => {
                        let key = call_keys
                            .get(&call_id)
                            .expect("a result for a journaled call");
                        let c = calls.get_mut(key).expect("call");
                        c.results += 1;
                        if ok {
                            let v: serde_json::Value =
                                serde_json::from_str(&output).expect("tool output");
                            assert_eq!(v["key"], key.as_str(), "the handler got the journaled key");
                            c.result_from = v["incarnation"].as_u64().map(|i| i as u32);
                        } else {
                            assert!(output.contains("interrupted, not retried"), "{output}");
                        }
                    }
                    SessionEvent::TurnCompleted { .. } | SessionEvent::TurnFailed { .. } => {
                        pending = false;
                        ended += 1;
                    }
                    _ => {}
                }
            }
            assert!(!pending, "session s{s}: a turn is left pending");
            assert_eq!(ended, TURNS, "session s{s}: every turn ended once");
        }
        (calls, interrupted_turns)
    });

    let mut by_key: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (inc, tool, key) in &invocations {
        let j = journaled.get(key).unwrap_or_else(|| {
            panic!("{tool} invoked with key {key}, which no journaled call has")
        });
        assert_eq!(&j.tool, tool, "key {key}");
        by_key.entry(key).or_default().push(*inc);
    }
    let mut repeated = 0;
    for (key, incs) in &by_key {
        let distinct: BTreeSet<u32> = incs.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            incs.len(),
            "{key} invoked twice in one process: {incs:?}"
        );
        let j = &journaled[*key];
        assert!(j.results <= 1, "{key} has {} journaled results", j.results);
        if j.tool == "charge" {
            assert_eq!(
                incs.len(),
                1,
                "the at-most-once tool ran twice: {key} {incs:?}"
            );
        }
        if let Some(r) = j.result_from {
            assert!(
                incs.iter().all(|&i| i <= r),
                "{key}: invoked after its result (from run {r}) was journaled: {incs:?}"
            );
        }
        if incs.len() > 1 {
            repeated += 1;
        }
    }
    let results: usize = journaled.values().map(|j| j.results).sum();
    eprintln!(
        "{kills} kills; {} invocations of {} journaled calls ({results} results); \
         {repeated} calls run again with their key; {interrupted_turns} turns answered again",
        invocations.len(),
        journaled.len()
    );
    assert!(
        interrupted_turns > 0,
        "no kill interrupted a turn: the test tested nothing"
    );
}

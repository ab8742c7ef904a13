//! The sessions suite: 10,000 sessions of 20 turns each on the local
//! backend with zero latency, every turn a real agent turn (user turn
//! journaled, attempt started, reply streamed into the session under a GPU
//! lease, turn completed), against the same journal appends made directly
//! with the same durability (the nearest baseline: what the turns cost
//! without actors, leases or a model). Then the time from subscribing at a
//! sequence number to the first event, for passivated sessions, and the
//! process's memory with most sessions passivated: its RSS (RocksDB's
//! caches and memtables and the allocator's retained pages included) and
//! the Rust heap still live since the suite started.
//!
//! `agent_turns_concurrent`: one agent kind answering 1,000 sessions at
//! once with a model that takes 50 ms per reply, against the ideal for
//! its per-kind limit (`min(limit, 1000) / 50 ms`, the default limit 256:
//! 5,120 turns/s; the sessions alone would allow 20,000). It measures how
//! close the instances come to their limit, not the limit itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Semaphore;
use troupe_agent::{
    Agent, AgentError, AgentKey, AgentOptions, AgentSystem, Dispatch, Inference, LeaseSpec,
    LocalBackend, SessionConfig, SessionEvent, SessionItem, Sessions,
};
use troupe_gpu::probe::SimulatedProbe;
use troupe_gpu::{GpuArgs, GpuConfig, GpuSupervisorHandle};
use troupe_journal::{Durability, Journal, NewEvent, PersistenceId, RocksConfig, RocksJournal};

use super::{Report, percentile, rss_kib};

type BoxError = Box<dyn std::error::Error>;

const GB: u64 = 1 << 30;
/// Turns in flight at once (each session runs its turns one after another).
const IN_FLIGHT: usize = 1_000;

/// Answers every turn of its sessions with the model (the default turn);
/// one instance per session.
struct Desk;

impl Agent for Desk {
    type State = ();
}

const DESK: AgentKey<Desk> = AgentKey::new("desk");

fn backend() -> LocalBackend {
    LocalBackend::default().words(24, 2)
}

pub fn run(quick: bool) -> Result<(), BoxError> {
    let report = Report;
    let (sessions_n, turns) = if quick { (1_000, 5) } else { (10_000, 20) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let base = tempfile::Builder::new().prefix("troupe-bench-").tempdir()?;
    crate::alloc_count::start();
    rt.block_on(async {
        // Baseline first: the same appends, straight into the journal.
        let raw = raw_turns(&base.path().join("raw"), sessions_n, turns).await?;
        let rss_before = rss_kib().unwrap_or(0);

        // Without leases first (the framework's own cost), then the real thing.
        let (plain, plain_sessions, _, plain_journal) =
            troupe_turns(&base.path().join("plain"), None, sessions_n, turns).await?;
        plain_sessions.passivate_all().await;
        drop(plain_sessions);
        plain_journal.close().await;
        // Lease decisions go to a buffered journal, as the leases chapter
        // recommends (a process crash ends every in-process holder anyway).
        let lease_journal: Arc<dyn Journal> = Arc::new(RocksJournal::open(
            RocksConfig::new(base.path().join("leases")).durability(Durability::Buffered),
        )?);
        let gpu = GpuSupervisorHandle::spawn(
            GpuArgs {
                probe: Arc::new(SimulatedProbe::new(10, 80 * GB)),
                journal: lease_journal,
                config: GpuConfig::default(),
            },
            None,
        )
        .await?;
        let (troupe, sessions, ids, rocks) = troupe_turns(
            &base.path().join("troupe"),
            Some(gpu.clone()),
            sessions_n,
            turns,
        )
        .await?;
        report.figure("session_turns", troupe, "turns/s");
        report.figure("session_turns_without_leases", plain, "turns/s");
        report.figure("raw_journal_turns", raw, "turns/s");
        report.ratio("session_turns", troupe, raw);
        report.ratio("session_turns_without_leases", plain, raw);

        // Resume: most sessions passivated; subscribe 10 events before the
        // end of a random session and time the first event.
        sessions.passivate_all().await;
        let samples = if quick { 300 } else { 1_000 };
        let mut lat = Vec::with_capacity(samples);
        for i in 0..samples {
            let id = &ids[(i * 7919) % ids.len()];
            let last = rocks
                .highest_seq(&troupe_agent::session::session_pid(id)?)
                .await?;
            let t = Instant::now();
            let mut sub = sessions.subscribe(id, last.saturating_sub(10)).await?;
            match sub.next().await {
                Some(Ok(SessionItem::Event(rec))) => {
                    debug_assert!(matches!(
                        rec.event,
                        SessionEvent::ModelChunk { .. } | SessionEvent::TurnCompleted { .. }
                    ));
                }
                other => return Err(format!("resume of {id} gave {other:?}").into()),
            }
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        report.figure("session_resume_p50", percentile(&lat, 0.5), "ms");
        report.figure("session_resume_p99", percentile(&lat, 0.99), "ms");

        // Memory: 10 % of the sessions active again, the rest passivated.
        for id in ids.iter().step_by(10) {
            sessions.view(id).await?;
        }
        let active = sessions.active_count();
        let rss = rss_kib().unwrap_or(0);
        report.figure(
            &format!("session_memory_{}k", sessions_n / 1_000),
            rss as f64 / 1024.0,
            "MiB",
        );
        report.figure(
            &format!("session_heap_live_{}k", sessions_n / 1_000),
            crate::alloc_count::live() as f64 / (1024.0 * 1024.0),
            "MiB",
        );
        report.figure(
            "session_memory_before_sessions",
            rss_before as f64 / 1024.0,
            "MiB",
        );
        report.figure(
            "sessions_active_at_memory_reading",
            active as f64,
            "sessions",
        );
        let leased: u64 = gpu.status().await?.iter().map(|s| s.leased.0).sum();
        if leased != 0 {
            return Err(format!("{leased} bytes still leased after every turn ended").into());
        }
        gpu.stop().await;
        drop(sessions);
        rocks.close().await;

        let limit = AgentOptions::default().max_concurrent_turns;
        let (concurrent, ideal) =
            concurrent_turns(&base.path().join("concurrent"), limit, quick).await?;
        report.figure("agent_turns_concurrent", concurrent, "turns/s");
        report.figure("agent_turns_concurrent_ideal", ideal, "turns/s");
        report.ratio("agent_turns_concurrent", concurrent, ideal);
        Ok::<_, BoxError>(())
    })
}

/// Runs `turns` turns in each of `sessions_n` sessions through one agent,
/// under leases of `gpu` if given; returns turns/s and what the later
/// measurements need.
async fn troupe_turns(
    dir: &std::path::Path,
    gpu: Option<GpuSupervisorHandle>,
    sessions_n: usize,
    turns: usize,
) -> Result<(f64, Sessions, Vec<String>, RocksJournal), BoxError> {
    let rocks = RocksJournal::open(RocksConfig::new(dir).durability(Durability::Fsync))?;
    let journal: Arc<dyn Journal> = Arc::new(rocks.clone());
    let sessions = Sessions::new(journal, SessionConfig::default());
    let mut inference = Inference::new().with_backend(backend());
    if let Some(gpu) = gpu {
        inference = inference.with_gpu(gpu);
    }
    let system = AgentSystem::new(sessions.clone(), inference);
    // 256 MiB and 1 % per inference: the 1,000 in flight fit on ten
    // simulated GPUs (this measures the framework, not GPU contention).
    let lease = LeaseSpec {
        memory: GB / 4,
        compute: 1,
        expected: Duration::from_millis(5),
        ..LeaseSpec::default()
    };
    let options = AgentOptions {
        lease,
        max_concurrent_turns: IN_FLIGHT,
        ..AgentOptions::default()
    };
    let desk = system.register(&DESK, Desk, options).await?;

    let ids: Vec<String> = {
        let mut v = Vec::with_capacity(sessions_n);
        for _ in 0..sessions_n {
            v.push(sessions.create(DESK.name(), None).await?);
        }
        v
    };
    eprintln!("sessions: {sessions_n} sessions x {turns} turns, {IN_FLIGHT} turns in flight");
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(sessions_n);
    for id in &ids {
        let (id, sessions, desk, gate) = (id.clone(), sessions.clone(), desk.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            for t in 0..turns {
                let _permit = gate.acquire().await.expect("open");
                let posted = sessions
                    .post_with(
                        &id,
                        &format!("question {t} about my order"),
                        Vec::new(),
                        Dispatch::Later,
                    )
                    .await?;
                desk.get(&id).answer(posted.turn).await?;
            }
            Ok::<_, AgentError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let total = (sessions_n * turns) as f64;
    Ok((total / elapsed, sessions, ids, rocks))
}

/// The baseline: per turn, the same three appends (user turn; attempt
/// started; the streamed chunks and the turn's end in one batch, as the
/// agent coalesces them at zero latency), made directly on a journal with
/// the same durability by the same number of concurrent writers.
async fn raw_turns(
    dir: &std::path::Path,
    sessions_n: usize,
    turns: usize,
) -> Result<f64, BoxError> {
    let rocks = RocksJournal::open(RocksConfig::new(dir).durability(Durability::Fsync))?;
    let reply: Vec<String> = backend()
        .reply(&troupe_agent::ChatRequest::new(
            "local",
            vec![troupe_agent::ChatMessage::user("q")],
        ))
        .into_iter()
        .filter_map(|c| match c {
            troupe_agent::Chunk::Text(t) => Some(t),
            _ => None,
        })
        .collect();
    let reply = Arc::new(reply);
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(sessions_n);
    for s in 0..sessions_n {
        let (rocks, reply, gate) = (rocks.clone(), reply.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let id = PersistenceId::new("session", &format!("raw{s}"))?;
            let mut seq = 0;
            for t in 1..=turns as u32 {
                let _permit = gate.acquire().await.expect("open");
                let batches: [Vec<SessionEvent>; 3] = [
                    vec![SessionEvent::UserTurn {
                        turn: t,
                        text: format!("question {t} about my order"),
                        attachments: Vec::new(),
                        key: None,
                    }],
                    vec![SessionEvent::TurnStarted {
                        turn: t,
                        attempt: 1,
                        model: "local".into(),
                        keeps_tool_results: true,
                    }],
                    reply
                        .iter()
                        .map(|text| SessionEvent::ModelChunk {
                            turn: t,
                            text: text.clone(),
                        })
                        .chain([SessionEvent::TurnCompleted {
                            turn: t,
                            finish_reason: "stop".into(),
                            usage: None,
                        }])
                        .collect(),
                ];
                for batch in batches {
                    let events = batch
                        .iter()
                        .map(NewEvent::new)
                        .collect::<Result<Vec<_>, _>>()?;
                    seq = rocks.append(&id, seq, events).await?.last_seq;
                }
            }
            Ok::<_, troupe_journal::JournalError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let per_sec = (sessions_n * turns) as f64 / start.elapsed().as_secs_f64();
    rocks.close().await;
    Ok(per_sec)
}

/// One agent kind, 1,000 sessions posting at once, a model that takes
/// 50 ms per reply, the default per-kind limit: turns/s, and the ideal
/// `min(limit, 1000) / 50 ms`.
async fn concurrent_turns(
    dir: &std::path::Path,
    limit: usize,
    quick: bool,
) -> Result<(f64, f64), BoxError> {
    const SESSIONS: usize = 1_000;
    const REPLY: Duration = Duration::from_millis(50);
    let turns = if quick { 2 } else { 5 };
    let rocks = RocksJournal::open(RocksConfig::new(dir).durability(Durability::Fsync))?;
    let journal: Arc<dyn Journal> = Arc::new(rocks.clone());
    let sessions = Sessions::new(journal, SessionConfig::default());
    let model = LocalBackend::default()
        .words(24, 2)
        .latency(REPLY, Duration::ZERO);
    let system = AgentSystem::new(sessions.clone(), Inference::new().with_backend(model));
    let desk = system
        .register(
            &DESK,
            Desk,
            AgentOptions {
                max_concurrent_turns: limit,
                turn_wait: Duration::from_secs(600),
                ..AgentOptions::default()
            },
        )
        .await?;
    let mut ids = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        ids.push(sessions.create(DESK.name(), None).await?);
    }
    eprintln!("sessions: {SESSIONS} sessions x {turns} turns of 50 ms, limit {limit}");
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(SESSIONS);
    for id in ids {
        let (sessions, desk) = (sessions.clone(), desk.clone());
        tasks.push(tokio::spawn(async move {
            for t in 0..turns {
                let posted = sessions
                    .post_with(&id, &format!("question {t}"), Vec::new(), Dispatch::Later)
                    .await?;
                desk.get(&id).answer(posted.turn).await?;
            }
            Ok::<_, AgentError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let per_sec = (SESSIONS * turns) as f64 / start.elapsed().as_secs_f64();
    let ideal = limit.min(SESSIONS) as f64 / REPLY.as_secs_f64();
    system.passivate_all().await;
    sessions.passivate_all().await;
    drop(system);
    drop(sessions);
    rocks.close().await;
    Ok((per_sec, ideal))
}

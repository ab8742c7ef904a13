//! Agents saturating simulated GPUs: high-priority turns keep flowing,
//! low-priority ones are refused early with a retry hint, and no lease
//! leaks when agents crash in the middle of a streamed reply.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use troupe_agent::{
    Agent, AgentError, AgentKey, AgentOptions, AgentSystem, ChatRequest, Chunk, ChunkStream,
    Dispatch, Inference, LeaseSpec, ModelBackend, SessionConfig, SessionEvent, Sessions,
    TurnOutcome,
};
use troupe_gpu::probe::SimulatedProbe;
use troupe_gpu::{GpuArgs, GpuConfig, GpuSupervisorHandle};
use troupe_journal::InMemoryJournal;

const GIB: u64 = 1 << 30;

/// Streams one chunk, then holds until the test lets one stream finish.
struct Gated {
    started: mpsc::UnboundedSender<()>,
    gate: Arc<Semaphore>,
}

#[async_trait::async_trait]
impl ModelBackend for Gated {
    fn name(&self) -> &str {
        "gated"
    }
    async fn stream(&self, _req: ChatRequest) -> Result<ChunkStream, AgentError> {
        let _ = self.started.send(());
        let gate = self.gate.clone();
        Ok(
            futures::stream::once(async { Ok(Chunk::Text("working".into())) })
                .chain(futures::stream::once(async move {
                    gate.acquire().await.unwrap().forget();
                    Ok(Chunk::Done {
                        finish_reason: "stop".into(),
                        usage: None,
                    })
                }))
                .boxed(),
        )
    }
}

/// Answers with the model (the default turn).
struct Worker;

impl Agent for Worker {
    type State = ();
}

const HI: AgentKey<Worker> = AgentKey::new("hi");
const LO: AgentKey<Worker> = AgentKey::new("lo");

/// `n` simulated 16 GiB GPUs under an agent system whose `gated` backend
/// streams one chunk, then waits for a permit of `gate`.
struct Gpus {
    gpu: GpuSupervisorHandle,
    sessions: Sessions,
    sys: AgentSystem,
    gate: Arc<Semaphore>,
    /// One message per stream begun.
    started: mpsc::UnboundedReceiver<()>,
}

async fn gated_system(n: u32) -> Gpus {
    let journal = Arc::new(InMemoryJournal::new());
    let gpu = GpuSupervisorHandle::spawn(
        GpuArgs {
            probe: Arc::new(SimulatedProbe::new(n, 16 * GIB)),
            journal: journal.clone(),
            config: GpuConfig::default(),
        },
        None,
    )
    .await
    .unwrap();
    let (started_tx, started) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(0));
    let backend = Gated {
        started: started_tx,
        gate: gate.clone(),
    };
    let sessions = Sessions::new(journal, SessionConfig::default());
    let sys = AgentSystem::new(
        sessions.clone(),
        Inference::new().with_backend(backend).with_gpu(gpu.clone()),
    );
    Gpus {
        gpu,
        sessions,
        sys,
        gate,
        started,
    }
}

async fn leased(gpu: &GpuSupervisorHandle) -> u64 {
    gpu.status().await.unwrap().iter().map(|s| s.leased.0).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_gpus_serve_high_priority_refuse_low_priority_and_leak_nothing() {
    // Two 16 GiB GPUs, 8 GiB per inference: four at a time.
    let Gpus {
        gpu,
        sessions,
        sys,
        gate,
        mut started,
    } = gated_system(2).await;
    let (results_tx, mut results) =
        mpsc::unbounded_channel::<(&'static str, Result<TurnOutcome, AgentError>)>();
    let lease = |priority, wait| LeaseSpec {
        memory: 8 * GIB,
        compute: 50,
        priority,
        wait,
        ttl: Duration::from_secs(30),
        expected: Duration::from_secs(5),
        kind: String::new(),
        max_hold: Duration::from_secs(600),
    };
    let hi = sys
        .register(
            &HI,
            Worker,
            AgentOptions::default()
                .model("gated", "m")
                .lease(lease(3, Duration::from_secs(30))),
        )
        .await
        .unwrap();
    sys.register(
        &LO,
        Worker,
        AgentOptions::default()
            .model("gated", "m")
            .lease(lease(0, Duration::from_millis(200))),
    )
    .await
    .unwrap();
    // Opens a session of `kind`, posts a turn, and reports its outcome.
    let turn = |kind: &'static str| {
        let (sys, tx) = (sys.clone(), results_tx.clone());
        async move {
            let sessions = sys.sessions();
            let id = sessions.create(kind, None).await.unwrap();
            let posted = sessions
                .post_with(&id, "render a cat", Vec::new(), Dispatch::Later)
                .await
                .unwrap();
            let (sys, id2) = (sys.clone(), id.clone());
            tokio::spawn(async move {
                let _ = tx.send((kind, sys.answer(&id2, posted.turn).await));
            });
            id
        }
    };

    // Four high-priority turns take every GPU slot.
    for _ in 0..4 {
        turn("hi").await;
    }
    for _ in 0..4 {
        started.recv().await.unwrap();
    }
    assert_eq!(leased(&gpu).await, 32 * GIB);

    // Low priority is refused at once, with a retry hint, and the refusal
    // is journaled in its session.
    let mut low_sessions = Vec::new();
    for _ in 0..2 {
        low_sessions.push(turn("lo").await);
    }
    for _ in 0..2 {
        let (kind, r) = results.recv().await.unwrap();
        assert_eq!(kind, "lo", "{kind} finished first");
        let hint = r.unwrap_err().retry_after().expect("a retry hint");
        assert!(hint > Duration::ZERO);
    }
    let view = sessions.view(&low_sessions[0]).await.unwrap();
    assert_eq!((view.failed, view.pending), (1, None));

    // Two more high-priority turns queue rather than fail, and everything
    // high-priority completes once capacity frees up.
    for _ in 0..2 {
        turn("hi").await;
    }
    gate.add_permits(6);
    let mut done = 0;
    while done < 6 {
        let (kind, r) = results.recv().await.unwrap();
        assert_eq!(kind, "hi");
        r.unwrap();
        done += 1;
    }
    assert_eq!(leased(&gpu).await, 0, "released before the caller saw Done");
    while started.try_recv().is_ok() {} // the two queued streams started too

    // Kill four instances in the middle of streamed replies: their leases
    // are freed, and their turns are answered again by a new attempt.
    let mut crashed = Vec::new();
    for _ in 0..4 {
        crashed.push(turn("hi").await);
    }
    for _ in 0..4 {
        started.recv().await.unwrap();
    }
    assert_eq!(leased(&gpu).await, 32 * GIB);
    for id in &crashed {
        assert!(hi.kill_instance(id));
    }
    // Each killed turn starts again at once, under a new lease.
    for _ in 0..4 {
        started.recv().await.unwrap();
    }
    gate.add_permits(4);
    for _ in 0..4 {
        let (_, r) = results.recv().await.unwrap();
        assert_eq!(r.unwrap().turn.attempt, 2);
    }
    let mut sub = sessions.subscribe(&crashed[0], 0).await.unwrap();
    let mut attempts = Vec::new();
    while let Some(Ok(troupe_agent::SessionItem::Event(rec))) = sub.next().await {
        match &rec.event {
            SessionEvent::TurnStarted { attempt, .. } => attempts.push(*attempt),
            SessionEvent::TurnCompleted { .. } => break,
            _ => {}
        }
    }
    assert_eq!(attempts, [1, 2]);
    assert_eq!(leased(&gpu).await, 0);
    assert_eq!(hi.restarts(), 4);
    sys.stop().await;
    gpu.stop().await;
}

/// An inference that never ends does not keep its GPU share: past the
/// lease's maximum hold it fails with `LeaseLost` and the lease is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_ends_loses_its_lease_at_the_maximum_hold() {
    let journal = Arc::new(InMemoryJournal::new());
    let gpu = GpuSupervisorHandle::spawn(
        GpuArgs {
            probe: Arc::new(SimulatedProbe::new(1, 16 * GIB)),
            journal,
            config: GpuConfig::default(),
        },
        None,
    )
    .await
    .unwrap();
    let (started, _started_rx) = mpsc::unbounded_channel();
    // The gate never opens: the stream would hold its lease for good.
    let backend = Gated {
        started,
        gate: Arc::new(Semaphore::new(0)),
    };
    let inference = Inference::new().with_backend(backend).with_gpu(gpu.clone());
    let lease = LeaseSpec {
        memory: 8 * GIB,
        max_hold: Duration::from_millis(300),
        ..LeaseSpec::default()
    };
    let holder = troupe_agent::Holder {
        name: "forever".into(),
        actor: None,
    };
    let mut stream = inference
        .stream("gated", ChatRequest::new("m", vec![]), &lease, &holder)
        .await
        .unwrap();
    assert!(matches!(stream.next().await, Some(Ok(Chunk::Text(_)))));
    assert_eq!(leased(&gpu).await, 8 * GIB, "held while streaming");
    match stream.next().await {
        Some(Err(AgentError::LeaseLost { reason, .. })) => {
            assert!(reason.contains("maximum"), "{reason}")
        }
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    assert_eq!(leased(&gpu).await, 0, "released at the maximum hold");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_lease_hold_caps_its_sessions_turns_and_no_one_elses() {
    let Gpus {
        gpu,
        sessions,
        sys,
        gate,
        mut started,
    } = gated_system(1).await;
    // The agent would hold a lease for ten minutes; tenant `brief` may
    // hold one for 300 ms.
    sys.register(
        &HI,
        Worker,
        AgentOptions::default()
            .model("gated", "m")
            .lease(LeaseSpec {
                memory: 4 * GIB,
                max_hold: Duration::from_secs(600),
                ..LeaseSpec::default()
            }),
    )
    .await
    .unwrap();
    sys.set_tenant_lease_hold(|tenant| (tenant == "brief").then(|| Duration::from_millis(300)));
    let turn = |tenant: &'static str| {
        let sys = sys.clone();
        async move {
            let id = sys.sessions().create("hi", Some(tenant)).await.unwrap();
            let posted = sys
                .sessions()
                .post_with(&id, "go", Vec::new(), Dispatch::Later)
                .await
                .unwrap();
            let sys2 = sys.clone();
            let id2 = id.clone();
            (
                id,
                tokio::spawn(async move { sys2.answer(&id2, posted.turn).await }),
            )
        }
    };
    let (brief_id, brief) = turn("brief").await;
    let (_, patient) = turn("patient").await;
    started.recv().await.unwrap();
    started.recv().await.unwrap();
    // The gate is shut: only the tenant's maximum hold can end its turn.
    // (Were the cap not applied, the turn would hang: bounded here so the
    // failure says so.)
    let brief = tokio::time::timeout(Duration::from_secs(60), brief)
        .await
        .expect("the tenant's lease hold did not end its turn");
    match brief.unwrap() {
        Err(AgentError::LeaseLost { reason, .. }) => {
            assert!(reason.contains("maximum"), "{reason}")
        }
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    let view = sessions.view(&brief_id).await.unwrap();
    assert_eq!((view.failed, view.pending), (1, None));
    assert_eq!(
        leased(&gpu).await,
        4 * GIB,
        "only the other tenant's lease is held"
    );
    // The other tenant's turn is still streaming; it ends when let go.
    gate.add_permits(1);
    patient.await.unwrap().unwrap();
    assert_eq!(leased(&gpu).await, 0);
}

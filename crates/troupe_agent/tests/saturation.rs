//! Agents saturating simulated GPUs: high-priority turns keep flowing,
//! low-priority ones are refused early with a retry hint, and no lease
//! leaks when agents crash in the middle of a streamed reply.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use troupe_agent::{
    Agent, AgentContext, AgentError, AgentOptions, AgentSystem, ChatRequest, Chunk, ChunkStream,
    Inference, LeaseSpec, ModelBackend, SessionConfig, SessionEvent, Sessions, TurnOutcome,
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

struct Worker(mpsc::UnboundedSender<(String, Result<TurnOutcome, AgentError>)>);

#[async_trait::async_trait]
impl Agent for Worker {
    type Msg = String;
    async fn handle(&mut self, ctx: &AgentContext, session: String) -> Result<(), AgentError> {
        let r = ctx.reply(&session).await;
        let _ = self.0.send((ctx.name().to_owned(), r));
        Ok(())
    }
}

async fn leased(gpu: &GpuSupervisorHandle) -> u64 {
    gpu.status().await.unwrap().iter().map(|s| s.leased.0).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_gpus_serve_high_priority_refuse_low_priority_and_leak_nothing() {
    let journal = Arc::new(InMemoryJournal::new());
    // Two 16 GiB GPUs, 8 GiB per inference: four at a time.
    let gpu = GpuSupervisorHandle::spawn(
        GpuArgs {
            probe: Arc::new(SimulatedProbe::new(2, 16 * GIB)),
            journal: journal.clone(),
            config: GpuConfig::default(),
        },
        None,
    )
    .await
    .unwrap();
    let (started_tx, mut started) = mpsc::unbounded_channel();
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
    let (results_tx, mut results) = mpsc::unbounded_channel();
    let lease = |priority, wait| LeaseSpec {
        memory: 8 * GIB,
        compute: 50,
        priority,
        wait,
        ttl: Duration::from_secs(30),
        expected: Duration::from_secs(5),
    };
    let mut agents = Vec::new();
    let mut sups = Vec::new();
    for (name, priority, wait) in [
        ("hi-0", 3, 30),
        ("hi-1", 3, 30),
        ("hi-2", 3, 30),
        ("hi-3", 3, 30),
        ("hi-4", 3, 30),
        ("hi-5", 3, 30),
        ("lo-0", 0, 0),
        ("lo-1", 0, 0),
    ] {
        let options = AgentOptions::default().model("gated", "m").lease(lease(
            priority,
            Duration::from_millis(200).max(Duration::from_secs(wait)),
        ));
        let tx = results_tx.clone();
        let (h, sup) = sys
            .spawn(name, options, move || Worker(tx.clone()))
            .await
            .unwrap();
        agents.push((name, h));
        sups.push(sup);
    }
    let turn = |name: &str| {
        let sessions = sessions.clone();
        let name = name.to_owned();
        async move {
            let id = sessions.create(&name, None).await.unwrap();
            sessions.post(&id, "render a cat").await.unwrap();
            id
        }
    };

    // Four high-priority turns take every GPU slot.
    for (name, h) in &agents[..4] {
        h.tell(turn(name).await).unwrap();
    }
    for _ in 0..4 {
        started.recv().await.unwrap();
    }
    assert_eq!(leased(&gpu).await, 32 * GIB);

    // Low priority is refused at once, with a retry hint, and the refusal
    // is journaled in its session.
    let mut low_sessions = Vec::new();
    for (name, h) in &agents[6..] {
        let id = turn(name).await;
        h.tell(id.clone()).unwrap();
        low_sessions.push(id);
    }
    for _ in 0..2 {
        let (name, r) = results.recv().await.unwrap();
        assert!(name.starts_with("lo-"), "{name} finished first");
        let hint = r.unwrap_err().retry_after().expect("a retry hint");
        assert!(hint > Duration::ZERO);
    }
    let view = sessions.view(&low_sessions[0]).await.unwrap();
    assert_eq!((view.failed, view.pending), (1, None));

    // Two more high-priority turns queue rather than fail, and everything
    // high-priority completes once capacity frees up.
    for (name, h) in &agents[4..6] {
        h.tell(turn(name).await).unwrap();
    }
    gate.add_permits(6);
    let mut done = 0;
    while done < 6 {
        let (name, r) = results.recv().await.unwrap();
        assert!(name.starts_with("hi-"));
        r.unwrap();
        done += 1;
    }
    assert_eq!(leased(&gpu).await, 0, "released before the caller saw Done");
    while started.try_recv().is_ok() {} // the two queued streams started too

    // Crash four agents in the middle of streamed replies: their leases
    // are freed, and their sessions can be answered again after restart.
    let mut crashed = Vec::new();
    for (name, h) in &agents[..4] {
        let id = turn(name).await;
        h.tell(id.clone()).unwrap();
        crashed.push(id);
    }
    for _ in 0..4 {
        started.recv().await.unwrap();
    }
    assert_eq!(leased(&gpu).await, 32 * GIB);
    for (_, h) in &agents[..4] {
        h.cell().expect("running").kill();
    }
    let freed = async {
        while leased(&gpu).await > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), freed)
        .await
        .expect("leases of crashed agents leaked");
    // The interrupted turns are retried (a new attempt) by the restarted agents.
    gate.add_permits(4);
    for (i, (_, h)) in agents[..4].iter().enumerate() {
        h.send(crashed[i].clone(), Duration::from_secs(10))
            .await
            .unwrap();
    }
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
    for s in sups {
        s.stop(Duration::from_secs(5)).await;
    }
    gpu.stop().await;
}

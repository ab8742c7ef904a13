//! The GPU supervisor actor over simulated devices and a real journal.

use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorProcessingErr, ActorRef};
use troupe_gpu::probe::SimulatedProbe;
use troupe_gpu::scheduler::{EndReason, LeaseRequest, SchedulerConfig};
use troupe_gpu::{GpuArgs, GpuConfig, GpuError, GpuSupervisorHandle, LeaseNotice};
use troupe_journal::{InMemoryJournal, Journal, now_ms};

const GB: u64 = 1 << 30;

fn config() -> GpuConfig {
    GpuConfig {
        scheduler: SchedulerConfig {
            grace_ms: 100,
            cold_factor: 1.0,
            ..SchedulerConfig::default()
        },
        poll_interval: Duration::from_millis(10),
        tick_interval: Duration::from_millis(5),
        snapshot_every: 5,
        reserve_block: 4,
        ..GpuConfig::default()
    }
}

async fn start(probe: &SimulatedProbe, journal: &InMemoryJournal) -> GpuSupervisorHandle {
    let j: Arc<dyn Journal> = Arc::new(journal.clone());
    GpuSupervisorHandle::spawn(
        GpuArgs {
            probe: Arc::new(probe.clone()),
            journal: j,
            config: config(),
        },
        None,
    )
    .await
    .expect("start")
}

/// A request that must start within `start_within` and then holds its
/// lease for about 30 s (the estimate the test gives; the supervisor has
/// learned nothing yet, and the test config trusts cold estimates as is).
fn req(holder: &str, gb: u64, priority: u8, start_within: Duration) -> LeaseRequest {
    LeaseRequest {
        holder: holder.into(),
        memory: gb * GB,
        compute: 25,
        priority,
        deadline_ms: now_ms() + start_within.as_millis() as u64 + 30_000,
        ttl_ms: 60_000,
        estimate_ms: Some(30_000),
        ..LeaseRequest::default()
    }
}

async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn grants_best_fit_and_refuses_early_what_cannot_start_in_time() {
    let probe = SimulatedProbe::new(2, 16 * GB);
    let gpu = start(&probe, &InMemoryJournal::new()).await;
    let a = gpu
        .acquire(req("a", 12, 1, Duration::from_secs(5)), None, None)
        .await
        .expect("a");
    let b = gpu
        .acquire(req("b", 4, 1, Duration::from_secs(5)), None, None)
        .await
        .expect("b");
    assert_eq!(
        a.device, b.device,
        "best fit puts the small lease beside the big one"
    );
    gpu.acquire(req("c", 16, 1, Duration::from_secs(5)), None, None)
        .await
        .expect("c on the other device");
    // Both devices are full for ~30 s; a 1 s deadline cannot be met.
    match gpu
        .acquire(req("d", 8, 1, Duration::from_secs(1)), None, None)
        .await
    {
        Err(GpuError::Overloaded { retry_after, .. }) => {
            assert!(retry_after >= Duration::from_secs(20))
        }
        other => panic!("expected Overloaded, got {other:?}"),
    }
    gpu.release(&a).await.expect("release");
    assert!(matches!(
        gpu.release(&a).await,
        Err(GpuError::UnknownLease(_))
    ));
    gpu.stop().await;
}

#[tokio::test]
async fn a_supervisor_restarted_elsewhere_recovers_durable_leases_and_never_grants_them_twice() {
    let probe = SimulatedProbe::new(1, 16 * GB);
    let journal = InMemoryJournal::new();
    let gpu = start(&probe, &journal).await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(
            gpu.acquire(
                LeaseRequest {
                    durable: true,
                    ..req(&format!("h{i}"), 4, 1, Duration::from_secs(5))
                },
                None,
                None,
            )
            .await
            .expect("grant"),
        );
    }
    let released = held.remove(0);
    gpu.release(&released).await.expect("release");
    gpu.renew(&held[0], 50_000).await.expect("renew");
    // An in-process lease: gone with the process, but its id and
    // generation are never issued again.
    let volatile = gpu
        .acquire(req("v", 4, 1, Duration::from_secs(5)), None, None)
        .await
        .expect("volatile");
    gpu.stop().await;

    // A new handle: what a restarted process sees.
    let gpu = start(&probe, &journal.reopen()).await;
    let status = gpu.status().await.expect("status");
    assert_eq!(status[0].leased.0, 8 * GB, "recovered lease table differs");
    for l in &held {
        gpu.check_fence(l.device, l.id, l.generation)
            .await
            .expect("recovered lease still fenced in");
    }
    assert!(
        gpu.check_fence(released.device, released.id, released.generation)
            .await
            .is_err()
    );
    // 8 GB are free; 12 GB would mean granting recovered capacity twice.
    assert!(
        gpu.acquire(req("big", 12, 1, Duration::from_millis(300)), None, None)
            .await
            .is_err()
    );
    let fresh = gpu
        .acquire(req("fits", 8, 1, Duration::from_secs(5)), None, None)
        .await
        .expect("fits");
    let max_id = held
        .iter()
        .chain([&released, &volatile])
        .map(|l| l.id)
        .max()
        .unwrap_or(0);
    let max_gen = held
        .iter()
        .chain([&released, &volatile])
        .map(|l| l.generation)
        .max()
        .unwrap_or(0);
    assert!(
        fresh.id > max_id && fresh.generation > max_gen,
        "ids or generations reused after restart"
    );
    gpu.stop().await;
}

struct Holder;
impl ractor::Actor for Holder {
    type Msg = ();
    type State = ();
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }
}

#[tokio::test]
async fn a_dead_holder_loses_its_leases_and_capacity_returns() {
    let probe = SimulatedProbe::new(1, 16 * GB);
    let gpu = start(&probe, &InMemoryJournal::new()).await;
    let (holder, _) = ractor::Actor::spawn(None, Holder, ())
        .await
        .expect("holder");
    let lease = gpu
        .acquire(
            req("agent-7", 16, 1, Duration::from_secs(5)),
            Some(holder.get_cell()),
            None,
        )
        .await
        .expect("grant");
    holder.stop(None);
    eventually("lease of the dead holder ended", || {
        let gpu = gpu.clone();
        let l = lease.clone();
        async move { gpu.check_fence(l.device, l.id, l.generation).await.is_err() }
    })
    .await;
    gpu.acquire(req("next", 16, 1, Duration::from_secs(5)), None, None)
        .await
        .expect("capacity came back");
    gpu.stop().await;
}

#[tokio::test]
async fn a_failed_device_revokes_its_leases_tells_holders_and_comes_back() {
    let probe = SimulatedProbe::new(2, 16 * GB);
    let gpu = start(&probe, &InMemoryJournal::new()).await;
    let (tx, mut notices) = tokio::sync::mpsc::channel(8);
    let lease = gpu
        .acquire(req("x", 16, 1, Duration::from_secs(5)), None, Some(tx))
        .await
        .expect("grant");
    probe.set_fault(lease.device, Some("Xid 79: GPU has fallen off the bus"));
    let notice = tokio::time::timeout(Duration::from_secs(20), notices.recv())
        .await
        .expect("notice")
        .expect("open");
    assert_eq!(
        notice,
        LeaseNotice::Ended {
            lease: lease.id,
            reason: EndReason::DeviceFailed
        }
    );
    let status = gpu.status().await.expect("status");
    assert!(!status[lease.device as usize].device.healthy);
    let other = gpu
        .acquire(req("y", 16, 1, Duration::from_secs(5)), None, None)
        .await
        .expect("other device");
    assert_ne!(other.device, lease.device, "granted on a failed device");
    probe.set_fault(lease.device, None);
    eventually("device healthy again", || {
        let gpu = gpu.clone();
        let d = lease.device as usize;
        async move {
            gpu.status()
                .await
                .map(|s| s[d].device.healthy)
                .unwrap_or(false)
        }
    })
    .await;
    gpu.acquire(req("z", 16, 1, Duration::from_secs(5)), None, None)
        .await
        .expect("healed device grants again");
    gpu.stop().await;
}

#[tokio::test]
async fn preemption_notifies_the_holder_and_grants_after_the_grace_period() {
    let probe = SimulatedProbe::new(1, 16 * GB);
    let gpu = start(&probe, &InMemoryJournal::new()).await;
    let (tx, mut notices) = tokio::sync::mpsc::channel(8);
    let batch = gpu
        .acquire(req("batch", 16, 0, Duration::from_secs(5)), None, Some(tx))
        .await
        .expect("grant");
    let urgent = {
        let gpu = gpu.clone();
        tokio::spawn(async move {
            gpu.acquire(req("urgent", 8, 3, Duration::from_secs(5)), None, None)
                .await
        })
    };
    let notice = tokio::time::timeout(Duration::from_secs(20), notices.recv())
        .await
        .expect("notice")
        .expect("open");
    assert!(
        matches!(notice, LeaseNotice::Preempt { lease, .. } if lease == batch.id),
        "{notice:?}"
    );
    let granted = urgent
        .await
        .expect("join")
        .expect("urgent granted after grace");
    assert_eq!(granted.priority, 3);
    assert!(
        gpu.check_fence(batch.device, batch.id, batch.generation)
            .await
            .is_err(),
        "preempted lease still valid"
    );
    gpu.stop().await;
}

#[tokio::test]
async fn a_supervisor_restarted_in_the_process_sees_the_leases_still_held() {
    use troupe_actor::{SupervisorHandle, SupervisorSpec};
    let probe = SimulatedProbe::new(1, 16 * GB);
    let journal = InMemoryJournal::new();
    let (child, gpu) = {
        let (probe, journal) = (probe.clone(), journal.clone());
        GpuSupervisorHandle::child("gpus", move || GpuArgs {
            probe: Arc::new(probe.clone()),
            journal: Arc::new(journal.clone()),
            config: config(),
        })
    };
    let root = SupervisorHandle::spawn(SupervisorSpec::new("root").child(child))
        .await
        .expect("root");
    let (tx, mut notices) = tokio::sync::mpsc::channel(8);
    // More grants than one reserved block: more than one mark journaled.
    let mut held = Vec::new();
    for i in 0..6 {
        let notices = (i == 0).then(|| tx.clone());
        held.push(
            gpu.acquire(
                LeaseRequest {
                    compute: 10,
                    ..req(&format!("h{i}"), 2, 0, Duration::from_secs(5))
                },
                None,
                notices,
            )
            .await
            .expect("grant"),
        );
    }
    let appends = journal
        .highest_seq(&"gpu/leases".parse().expect("id"))
        .await
        .expect("seq");
    assert!(
        (1..6).contains(&appends),
        "one high-water mark per block of 4 grants, not one event per grant: {appends}"
    );
    let before = gpu.actor().expect("actor").get_id();
    gpu.actor().expect("actor").kill();
    eventually("restarted", || {
        let gpu = gpu.clone();
        async move { gpu.is_running() && gpu.actor().is_ok_and(|a| a.get_id() != before) }
    })
    .await;
    let status = gpu.status().await.expect("status");
    assert_eq!(
        status[0].leased.0,
        12 * GB,
        "held capacity not seen after the restart"
    );
    for l in &held {
        gpu.check_fence(l.device, l.id, l.generation)
            .await
            .expect("a held lease is still current");
    }
    // 4 GB are free: 6 GB would be granting held capacity twice.
    assert!(
        gpu.acquire(req("big", 6, 0, Duration::from_millis(300)), None, None)
            .await
            .is_err()
    );
    // The holders keep their notice channel: h0 hears of its device's
    // failure from the new incarnation.
    probe.set_fault(0, Some("Xid 79"));
    let notice = tokio::time::timeout(Duration::from_secs(20), notices.recv())
        .await
        .expect("notice")
        .expect("open");
    assert_eq!(
        notice,
        LeaseNotice::Ended {
            lease: held[0].id,
            reason: EndReason::DeviceFailed
        }
    );
    probe.set_fault(0, None);
    eventually("device healthy again", || {
        let gpu = gpu.clone();
        async move { gpu.status().await.is_ok_and(|s| s[0].device.healthy) }
    })
    .await;
    let fresh = gpu
        .acquire(req("fresh", 16, 3, Duration::from_secs(5)), None, None)
        .await
        .expect("fresh");
    assert!(
        held.iter()
            .all(|l| l.id < fresh.id && l.generation < fresh.generation)
    );
    root.stop(Duration::from_secs(5)).await;
}

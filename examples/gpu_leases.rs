//! GPU leases on simulated devices: grants placed by best fit, an early
//! refusal with a retry hint, a preemption with a grace period, and a
//! device that fails and comes back.
//!
//! Run with `cargo run --release --example gpu_leases` (uses the NVIDIA
//! driver's devices where one is present, else two simulated 80 GB GPUs).
//! `--quick` and `--data-dir DIR` are accepted like the other examples.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use troupe::gpu::probe::{self, SimulatedProbe};
use troupe::gpu::scheduler::LeaseRequest;
use troupe::gpu::{GpuArgs, GpuConfig, GpuSupervisorHandle, LeaseNotice};
use troupe::prelude::*;

const GB: u64 = 1 << 30;

fn request(holder: &str, gb: u64, priority: u8, start_within: Duration) -> LeaseRequest {
    LeaseRequest {
        holder: holder.into(),
        memory: gb * GB,
        compute: 50,
        priority,
        // Start within `start_within`, then about 20 s of work: done by then.
        deadline_ms: troupe::journal::now_ms() + start_within.as_millis() as u64 + 20_000,
        ttl_ms: 30_000,
        estimate_ms: Some(20_000),
        ..LeaseRequest::default()
    }
}

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let data_dir = args
        .iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("troupe-data/gpu_leases"));
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }

    // ANCHOR: start
    let simulated = SimulatedProbe::new(2, 80 * GB);
    let probe = probe::detect(simulated.clone());
    let journal = RocksJournal::open(RocksConfig::new(&data_dir).durability(Durability::Buffered))?;
    let config = GpuConfig {
        poll_interval: Duration::from_millis(20),
        ..GpuConfig::default()
    };
    let gpu = GpuSupervisorHandle::spawn(
        GpuArgs {
            probe: probe.clone(),
            journal: Arc::new(journal.clone()),
            config,
        },
        None,
    )
    .await?;
    // ANCHOR_END: start
    println!(
        "GPU supervisor up on {} {} device(s)",
        probe.devices()?.len(),
        probe.kind()
    );
    if probe.kind() != "simulated" {
        println!(
            "real GPUs found: this example only scripts faults on simulated ones; stopping here"
        );
        gpu.stop().await;
        return Ok(());
    }

    // ANCHOR: lease
    let (notices_tx, mut notices) = tokio::sync::mpsc::channel(16);
    let batch = gpu
        .acquire(
            request("batch-render", 60, 0, Duration::from_secs(5)),
            None,
            Some(notices_tx),
        )
        .await?;
    println!(
        "  batch-render: lease {} on GPU {} (generation {})",
        batch.id, batch.device, batch.generation
    );
    let chat = gpu
        .acquire(request("chat", 60, 2, Duration::from_secs(5)), None, None)
        .await?;
    println!("  chat: lease {} on GPU {}", chat.id, chat.device);
    match gpu
        .acquire(request("report", 60, 0, Duration::from_secs(2)), None, None)
        .await
    {
        Err(e) => println!("  report: refused at once: {e}"),
        Ok(l) => println!("  report: unexpectedly granted lease {}", l.id),
    }
    // ANCHOR_END: lease

    // ANCHOR: preempt
    let urgent = {
        let gpu = gpu.clone();
        tokio::spawn(async move {
            gpu.acquire(request("urgent", 60, 3, Duration::from_secs(5)), None, None)
                .await
        })
    };
    if let Some(LeaseNotice::Preempt { lease, grace_until }) = notices.recv().await {
        let grace = grace_until.saturating_sub(troupe::journal::now_ms());
        println!("  batch-render: preempt notice for lease {lease}, {grace} ms to finish");
    }
    let urgent = urgent.await??;
    println!(
        "  urgent: lease {} on GPU {} after the grace period",
        urgent.id, urgent.device
    );
    // The device actor refuses work under the preempted lease.
    let stale = gpu.admit(&batch).await;
    println!(
        "  GPU {} refuses batch-render's old lease: {}",
        batch.device,
        stale.is_err()
    );
    gpu.admit(&urgent).await?;
    // ANCHOR_END: preempt

    simulated.set_fault(chat.device, Some("Xid 79: GPU has fallen off the bus"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = gpu.status().await?;
    println!(
        "  GPU {} failed: healthy={}, chat's lease revoked: {}",
        chat.device,
        status[chat.device as usize].device.healthy,
        gpu.check_fence(chat.device, chat.id, chat.generation)
            .await
            .is_err()
    );
    simulated.set_fault(chat.device, None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let status = gpu.status().await?;
    println!(
        "  GPU {} back: healthy={}",
        chat.device, status[chat.device as usize].device.healthy
    );

    gpu.release(&urgent).await?;
    gpu.stop().await;
    journal.close().await;
    println!("done: leases granted, refused early, preempted, revoked; all journaled");
    Ok(())
}

//! A rush of image-generation tasks on four simulated GPUs, admitted by a
//! `GpuSupervisor`: the first wave is granted at once, a live request
//! preempts a lower tier (whose holder checkpoints and releases within its
//! grace period), a stream of catalog renders queues up, a batch task that
//! waited long enough is served ahead of them (aging), and speculative
//! requests that could not start in time are refused at once with a retry
//! hint. A line of per-GPU leases is printed as it goes, and a table at the
//! end; the run fails if one of those did not happen.
//!
//! Run with `cargo run --release --example gpu_rush`.
//! `--quick` runs the same script five times faster; `--data-dir DIR`
//! chooses where the lease journal goes (default: a fresh temporary
//! directory).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use troupe::gpu::probe::SimulatedProbe;
use troupe::gpu::scheduler::{LeaseRequest, SchedulerConfig};
use troupe::gpu::{GpuArgs, GpuConfig, GpuError, GpuSupervisorHandle, LeaseNotice};
use troupe::journal::now_ms;
use troupe::prelude::*;

const GB: u64 = 1 << 30;
const GPUS: u32 = 4;
/// Every task runs the same diffusion model: this much memory and half a GPU.
const TASK_MEMORY: u64 = 24 * GB;
const TASK_COMPUTE: u32 = 50;
/// Customer tiers; a task's lease priority is its tier's index.
const TIERS: [&str; 4] = ["batch", "catalog", "studio", "live"];

// ANCHOR: script
/// One task of the rush; times are in units of the run's time scale.
struct Task {
    name: String,
    priority: u8,
    /// When it arrives.
    at: f64,
    /// How long it renders.
    work: f64,
    /// Its result is useless unless rendering starts within this long.
    start_within: f64,
}

fn task(name: String, priority: u8, at: f64, work: f64, start_within: f64) -> Task {
    Task {
        name,
        priority,
        at,
        work,
        start_within,
    }
}

fn script() -> Vec<Task> {
    let mut tasks = vec![
        task("studio-1".into(), 2, 0.0, 2.6, 1.0),
        task("studio-2".into(), 2, 0.0, 3.0, 1.0),
    ];
    // The first wave fills the 8 half-GPU slots.
    for (i, work) in [1.8, 2.0, 2.2, 2.6, 2.8, 3.2].into_iter().enumerate() {
        tasks.push(task(format!("catalog-{}", i + 1), 1, 0.0, work, 1.0));
    }
    // A live keynote cannot wait for a slot to free up.
    tasks.push(task("live-1".into(), 3, 0.5, 1.0, 0.6));
    // A small batch job, then a stream of catalog renders that outranks it.
    tasks.push(task("thumbs-1".into(), 0, 0.8, 0.3, 8.0));
    for i in 0..12 {
        let at = 1.0 + 0.2 * i as f64;
        tasks.push(task(format!("catalog-{}", i + 7), 1, at, 2.0, 10.0));
    }
    // Speculative variations: only worth rendering if they start soon.
    tasks.push(task("variation-1".into(), 0, 2.4, 0.5, 0.4));
    tasks.push(task("variation-2".into(), 0, 2.6, 0.5, 0.4));
    tasks
}
// ANCHOR_END: script

/// What happened to one task.
#[derive(Clone, Default)]
struct Record {
    name: String,
    priority: u8,
    /// When it asked, and when it was granted or refused (ms since the epoch).
    asked_ms: u64,
    answered_ms: Option<u64>,
    /// Granted, after this long.
    wait: Option<Duration>,
    /// Refused at once, with this retry hint.
    retry_after: Option<Duration>,
    /// Preempted: whether it released before its grace period ended.
    preempted: Option<bool>,
}

/// The run's clock, time scale and records, shared by every task.
#[derive(Clone)]
struct Rush {
    gpu: GpuSupervisorHandle,
    started: Instant,
    unit: Duration,
    records: Arc<Mutex<Vec<Record>>>,
}

impl Rush {
    fn units(&self, n: f64) -> Duration {
        self.unit.mul_f64(n)
    }

    fn log(&self, task: &Task, what: String) {
        let t = self.started.elapsed().as_secs_f64();
        let tier = TIERS[task.priority as usize];
        println!("  {t:6.2}s  {:<11} {tier:<8} {what}", task.name);
    }

    fn update(&self, i: usize, f: impl FnOnce(&mut Record)) {
        f(&mut self.records.lock().unwrap_or_else(|p| p.into_inner())[i]);
    }

    fn records(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    // ANCHOR: task
    /// Asks for a lease, renders while renewing it, and answers a preemption.
    async fn run(self, i: usize, task: Task) -> Result<(), GpuError> {
        let (notices_tx, mut notices) = tokio::sync::mpsc::channel(4);
        let asked_ms = now_ms();
        let ttl = self.units(2.0);
        let request = LeaseRequest {
            holder: task.name.clone(),
            memory: TASK_MEMORY,
            compute: TASK_COMPUTE,
            priority: task.priority,
            // It must start within `start_within` and then do its work.
            deadline_ms: asked_ms + self.units(task.start_within + task.work).as_millis() as u64,
            ttl_ms: ttl.as_millis() as u64,
            estimate_ms: Some(self.units(task.work).as_millis() as u64),
            // Every renderer here checkpoints when preempted: taking its
            // GPU loses no work, so a higher tier may.
            resumable: true,
            ..LeaseRequest::default()
        };
        self.update(i, |r| r.asked_ms = asked_ms);
        let lease = match self.gpu.acquire(request, None, Some(notices_tx)).await {
            Ok(lease) => lease,
            Err(GpuError::Overloaded { retry_after, .. }) => {
                self.update(i, |r| {
                    r.answered_ms = Some(now_ms());
                    r.retry_after = Some(retry_after);
                });
                let hint = retry_after.as_secs_f64();
                self.log(&task, format!("refused at once: retry in {hint:.2} s"));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let wait = Duration::from_millis(lease.granted_ms.saturating_sub(asked_ms));
        self.update(i, |r| {
            r.answered_ms = Some(lease.granted_ms);
            r.wait = Some(wait);
        });
        let queued = if wait < self.units(0.05) {
            "at once".to_owned()
        } else {
            format!("after {} ms in the queue", wait.as_millis())
        };
        self.log(&task, format!("granted on GPU {} {queued}", lease.device));
        // The device refuses work that does not present a current lease.
        self.gpu.admit(&lease).await?;

        let render = tokio::time::sleep(self.units(task.work));
        tokio::pin!(render);
        let mut keepalive =
            tokio::time::interval_at(tokio::time::Instant::now() + ttl / 4, ttl / 4);
        let mut grace_until = None;
        loop {
            tokio::select! {
                () = &mut render => break,
                _ = keepalive.tick() => {
                    self.gpu.renew(&lease, ttl.as_millis() as u64).await?;
                }
                Some(notice) = notices.recv() => {
                    let LeaseNotice::Preempt { grace_until: until, .. } = notice else {
                        self.log(&task, format!("lost its lease: {notice:?}"));
                        return Ok(());
                    };
                    grace_until = Some(until);
                    let grace = Duration::from_millis(until.saturating_sub(now_ms()));
                    let left = render.deadline() - tokio::time::Instant::now();
                    let ms = grace.as_millis();
                    if left + self.units(0.1) < grace {
                        self.log(&task, format!("preempted; finishes within its {ms} ms grace"));
                        continue;
                    }
                    self.log(&task, format!("preempted; checkpoints within its {ms} ms grace"));
                    tokio::time::sleep(self.units(0.1)).await;
                    break;
                }
            }
        }
        self.gpu.release(&lease).await?;
        if let Some(until) = grace_until {
            let in_time = now_ms() <= until;
            self.update(i, |r| r.preempted = Some(in_time));
            self.log(&task, format!("released (within grace: {in_time})"));
        }
        Ok(())
    }
    // ANCHOR_END: task
}

// ANCHOR: report
/// One line: each GPU's leased compute and memory, and the queue.
async fn report(rush: &Rush) -> Result<(), GpuError> {
    let t = rush.started.elapsed().as_secs_f64();
    let mut line = format!("  {t:6.2}s  |");
    for gpu in rush.gpu.status().await? {
        let (memory, compute) = gpu.leased;
        let total = gpu.device.memory / GB;
        let bar = "#".repeat(compute as usize / 25) + &".".repeat(4 - compute as usize / 25);
        line += &format!(
            " GPU{} {bar} {:2}/{total} GB |",
            gpu.device.index,
            memory / GB
        );
    }
    let waiting = rush
        .records()
        .iter()
        .filter(|r| r.asked_ms > 0 && r.answered_ms.is_none())
        .count();
    println!("{line} {waiting} waiting");
    Ok(())
}
// ANCHOR_END: report

/// A task that was granted while a higher-priority one of the same size,
/// waiting since well before, was still waiting: only aging explains it.
fn aged_past(records: &[Record], margin: Duration) -> Vec<(&Record, &Record)> {
    let margin = margin.as_millis() as u64;
    let mut found = Vec::new();
    for low in records.iter().filter(|r| r.wait.is_some()) {
        let granted = low.answered_ms.unwrap_or(0);
        let overtaken = records.iter().find(|high| {
            high.priority > low.priority
                && high.asked_ms + margin < granted
                && high.answered_ms.is_none_or(|t| t > granted)
        });
        if let Some(high) = overtaken {
            found.push((low, high));
        }
    }
    found
}

/// The `p`-th percentile (nearest rank) of sorted `xs`.
fn percentile(xs: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
    xs[rank.clamp(1, xs.len()) - 1]
}

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let temp = tempfile::tempdir()?;
    let data_dir = match args.iter().position(|a| a == "--data-dir") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--data-dir needs a directory")?),
        None => temp.path().to_owned(),
    };
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }
    let unit = Duration::from_millis(if quick { 200 } else { 1000 });
    let report_every = if quick { unit / 2 } else { unit };

    // ANCHOR: start
    let journal = RocksJournal::open(RocksConfig::new(&data_dir).durability(Durability::Buffered))?;
    let config = GpuConfig {
        scheduler: SchedulerConfig {
            aging_ms: unit.as_millis() as u64,
            grace_ms: unit.as_millis() as u64 / 2,
            ..SchedulerConfig::default()
        },
        poll_interval: unit,
        tick_interval: unit / 40,
        ..GpuConfig::default()
    };
    let gpu = GpuSupervisorHandle::spawn(
        GpuArgs {
            probe: Arc::new(SimulatedProbe::new(GPUS, 80 * GB)),
            journal: Arc::new(journal.clone()),
            config,
        },
        None,
    )
    .await?;
    // ANCHOR_END: start
    let script = script();
    println!(
        "{GPUS} simulated 80 GB GPUs; every task takes {} GB and {TASK_COMPUTE}% of one GPU.",
        TASK_MEMORY / GB
    );
    println!(
        "tiers (priority 0-3): {}; +1 level per {:.1} s waited; {:.1} s grace when preempted; \
         {} tasks",
        TIERS.join(" < "),
        unit.as_secs_f64(),
        unit.as_secs_f64() / 2.0,
        script.len()
    );
    println!("  time     |  leased compute (# = 25%) and memory per GPU  | queue");

    let rush = Rush {
        gpu: gpu.clone(),
        started: Instant::now(),
        unit,
        records: Arc::new(Mutex::new(
            script
                .iter()
                .map(|t| Record {
                    name: t.name.clone(),
                    priority: t.priority,
                    ..Record::default()
                })
                .collect(),
        )),
    };
    let reporter = {
        let rush = rush.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(report_every);
            loop {
                every.tick().await;
                if report(&rush).await.is_err() {
                    break;
                }
            }
        })
    };
    let mut running = Vec::new();
    for (i, task) in script.into_iter().enumerate() {
        tokio::time::sleep_until((rush.started + rush.units(task.at)).into()).await;
        running.push(tokio::spawn(rush.clone().run(i, task)));
    }
    for r in running {
        r.await??;
    }
    reporter.abort();
    report(&rush).await?;
    gpu.stop().await;
    journal.close().await;

    let records = rush.records();
    let granted: Vec<&Record> = records.iter().filter(|r| r.wait.is_some()).collect();
    let at_once = granted
        .iter()
        .filter(|r| r.wait.is_some_and(|w| w < unit / 20))
        .count();
    let hints: Vec<Duration> = records.iter().filter_map(|r| r.retry_after).collect();
    let preempted: Vec<bool> = records.iter().filter_map(|r| r.preempted).collect();
    let aged = aged_past(&records, unit / 10);
    let mut waits: Vec<Duration> = granted.iter().filter_map(|r| r.wait).collect();
    waits.sort();

    println!("\n  {} tasks", records.len());
    println!(
        "  granted             {:3}  ({at_once} at once, {} after queueing)",
        granted.len(),
        granted.len() - at_once
    );
    let mean_hint = hints.iter().sum::<Duration>() / hints.len().max(1) as u32;
    println!(
        "  refused early       {:3}  (mean retry hint {:.2} s)",
        hints.len(),
        mean_hint.as_secs_f64()
    );
    println!(
        "  preempted           {:3}  ({} released within the grace period)",
        preempted.len(),
        preempted.iter().filter(|&&in_time| in_time).count()
    );
    println!("  served after aging  {:3}", aged.len());
    for (low, high) in &aged {
        println!(
            "      {} ({}) went ahead of {} ({}), which had waited {:.2} s",
            low.name,
            TIERS[low.priority as usize],
            high.name,
            TIERS[high.priority as usize],
            (low.answered_ms.unwrap_or(0) - high.asked_ms) as f64 / 1000.0
        );
    }
    if !waits.is_empty() {
        println!(
            "  wait p50 / p99      {:.2} s / {:.2} s",
            percentile(&waits, 50.0).as_secs_f64(),
            percentile(&waits, 99.0).as_secs_f64()
        );
    }

    let missing: Vec<&str> = [
        ("a grant at once", at_once > 0),
        ("a grant after queueing", granted.len() > at_once),
        ("an early refusal", !hints.is_empty()),
        ("a preemption released in grace", preempted.contains(&true)),
        ("a grant by aging", !aged.is_empty()),
    ]
    .into_iter()
    .filter(|(_, seen)| !seen)
    .map(|(what, _)| what)
    .collect();
    if !missing.is_empty() {
        eprintln!("gpu_rush: this run showed no {}", missing.join(", no "));
        std::process::exit(1);
    }
    println!("\ndone: admission, queueing, aging, preemption and early refusal all seen");
    Ok(())
}

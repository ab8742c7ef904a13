//! The leases suite: a bursty synthetic inference load on 4 simulated GPUs,
//! run once through Troupe's admission (the real `Scheduler`) and once
//! through a plain FIFO queue that admits everything, on the same arrivals
//! in virtual time; then the real `GpuSupervisor`'s grant latency and the
//! scheduler's decision rate in wall-clock time.
//!
//! Workload: tasks need 20 GB and 25 % of a GPU (four fit on an 80 GB
//! GPU), run 1.5-2.5 s, and their clients give up 8 s after submitting. A
//! client that gives up cancels its task, queued or running. Arrivals come
//! in bursts of 3 s at 24 tasks/s, then 3 s at 2 tasks/s: 13 tasks/s on
//! average against a capacity of about 8. 10 % are high priority, 30 %
//! medium, 60 % low.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use troupe_gpu::probe::SimulatedProbe;
use troupe_gpu::scheduler::{
    DeviceCapacity, LeaseRequest, Ms, Outcome, Scheduler, SchedulerConfig,
};
use troupe_gpu::{GpuArgs, GpuConfig, GpuSupervisorHandle};
use troupe_journal::{Durability, Journal, RocksConfig, RocksJournal, now_ms};

use super::{Report, percentile};

type BoxError = Box<dyn std::error::Error>;

const GB: u64 = 1 << 30;
const DEVICES: u32 = 4;
const TASK_MEMORY: u64 = 20 * GB;
const TASK_COMPUTE: u32 = 25;
const CLIENT_TIMEOUT: Ms = 8_000;
const STEP: Ms = 10;

#[derive(Clone)]
struct Task {
    arrival: Ms,
    runtime: Ms,
    priority: u8,
}

/// A tiny deterministic generator (xorshift), so both runs see the same load.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn workload(duration: Ms) -> Vec<Task> {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut tasks = Vec::new();
    let mut t = 0;
    while t < duration {
        let rate = if (t / 3_000) % 2 == 0 { 24 } else { 2 };
        let gap = 1_000 / rate;
        let priority = match rng.below(10) {
            0 => 3,
            1..=3 => 1,
            _ => 0,
        };
        tasks.push(Task {
            arrival: t,
            runtime: 1_500 + rng.below(1_001),
            priority,
        });
        t += gap;
    }
    tasks
}

#[derive(Default)]
struct Stats {
    admitted: u64,
    admitted_timed_out: u64,
    refused_early: u64,
    total: u64,
    /// Leased (or busy) compute fraction per step while work was waiting.
    busy_while_waiting: Vec<f64>,
    high_waits: Vec<Ms>,
    admitted_tickets: Vec<u64>,
    /// Tasks that finished before their client gave up.
    completed: u64,
    horizon: Ms,
}

impl Stats {
    fn report(&self, prefix: &str, r: &Report) {
        let pct = |a: u64, b: u64| {
            if b == 0 {
                0.0
            } else {
                100.0 * a as f64 / b as f64
            }
        };
        r.figure(
            &format!("{prefix}_admitted_timeout_share"),
            pct(self.admitted_timed_out, self.admitted),
            "%",
        );
        let mean = if self.busy_while_waiting.is_empty() {
            0.0
        } else {
            100.0 * self.busy_while_waiting.iter().sum::<f64>()
                / self.busy_while_waiting.len() as f64
        };
        r.figure(&format!("{prefix}_utilization_mean"), mean, "%");
        // Spread over one-second windows.
        let per_sec: Vec<f64> = self
            .busy_while_waiting
            .chunks((1_000 / STEP) as usize)
            .map(|c| 100.0 * c.iter().sum::<f64>() / c.len() as f64)
            .collect();
        r.figure(
            &format!("{prefix}_utilization_spread"),
            percentile(&per_sec, 0.9) - percentile(&per_sec, 0.1),
            "points",
        );
        let waits: Vec<f64> = self.high_waits.iter().map(|w| *w as f64).collect();
        r.figure(
            &format!("{prefix}_high_priority_wait_p99"),
            percentile(&waits, 0.99),
            "ms",
        );
        r.figure(
            &format!("{prefix}_refused_early_share"),
            pct(self.refused_early, self.total),
            "%",
        );
        r.figure(
            &format!("{prefix}_goodput"),
            self.completed as f64 * 1000.0 / self.horizon as f64,
            "tasks/s",
        );
    }
}

fn simulate_troupe(tasks: &[Task], horizon: Ms) -> Stats {
    let devices = (0..DEVICES)
        .map(|i| DeviceCapacity {
            index: i,
            memory: 80 * GB,
            compute: 100,
            healthy: true,
        })
        .collect();
    let config = SchedulerConfig {
        queue_bound: 64,
        aging_ms: 4_000,
        grace_ms: 500,
        max_ttl_ms: 60_000,
    };
    let mut s = Scheduler::new(devices, config);
    let mut stats = Stats {
        total: tasks.len() as u64,
        horizon,
        ..Stats::default()
    };
    // lease id -> finish time
    let mut running: Vec<(u64, Ms)> = Vec::new();
    let mut next = 0;
    let mut now = 0;
    let handle = |out: Vec<Outcome>, now: Ms, running: &mut Vec<(u64, Ms)>, stats: &mut Stats| {
        for o in out {
            match o {
                Outcome::Granted { ticket, lease } => {
                    let task = &tasks[ticket as usize];
                    running.push((lease.id, now + task.runtime));
                    if now + task.runtime <= task.arrival + CLIENT_TIMEOUT {
                        stats.completed += 1;
                    }
                    if task.priority == 3 {
                        stats.high_waits.push(now - task.arrival);
                    }
                }
                Outcome::Refused { ticket, .. } => {
                    if !stats.admitted_ticket_seen(ticket) {
                        stats.refused_early += 1;
                    } else {
                        stats.admitted_timed_out += 1;
                    }
                }
                Outcome::Ended { lease, .. } => running.retain(|(id, _)| *id != lease.id),
                Outcome::PreemptNotice { .. } => {}
            }
        }
    };
    while now <= horizon {
        // Finished tasks release their leases.
        let done: Vec<u64> = running
            .iter()
            .filter(|(_, f)| *f <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in done {
            running.retain(|(l, _)| *l != id);
            if let Ok(out) = s.release(id, now) {
                handle(out, now, &mut running, &mut stats);
            }
        }
        while next < tasks.len() && tasks[next].arrival <= now {
            let t = &tasks[next];
            let req = LeaseRequest {
                holder: format!("task{next}"),
                memory: TASK_MEMORY,
                compute: TASK_COMPUTE,
                priority: t.priority,
                // It must start early enough to finish before its client gives up.
                deadline_ms: t.arrival + CLIENT_TIMEOUT - t.runtime,
                ttl_ms: t.runtime + 1_000,
                expected_ms: 2_000,
            };
            let out = s.request(next as u64, req, now);
            let refused_now = out
                .iter()
                .any(|o| matches!(o, Outcome::Refused { ticket, .. } if *ticket == next as u64));
            if !refused_now {
                stats.admitted += 1;
                stats.admitted_tickets.push(next as u64);
            }
            handle(out, now, &mut running, &mut stats);
            next += 1;
        }
        let out = s.tick(now);
        handle(out, now, &mut running, &mut stats);
        if s.queued().iter().sum::<usize>() > 0 {
            let used: u32 = (0..DEVICES).map(|d| s.used(d).1).sum();
            stats
                .busy_while_waiting
                .push(used as f64 / (100 * DEVICES) as f64);
        }
        now += STEP;
    }
    stats
}

impl Stats {
    fn admitted_ticket_seen(&self, ticket: u64) -> bool {
        self.admitted_tickets.binary_search(&ticket).is_ok()
    }
}

fn simulate_fifo(tasks: &[Task], horizon: Ms) -> Stats {
    let slots = (DEVICES * 100 / TASK_COMPUTE) as usize;
    let mut stats = Stats {
        total: tasks.len() as u64,
        admitted: tasks.len() as u64,
        horizon,
        ..Stats::default()
    };
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut running: Vec<(usize, Ms)> = Vec::new();
    let mut next = 0;
    let mut now = 0;
    while now <= horizon {
        let before = running.len();
        running.retain(|(_, f)| *f > now);
        stats.completed += (before - running.len()) as u64;
        // Clients that gave up cancel their task, queued or running.
        let before = running.len();
        running.retain(|(i, _)| now < tasks[*i].arrival + CLIENT_TIMEOUT);
        stats.admitted_timed_out += (before - running.len()) as u64;
        let before = queue.len();
        queue.retain(|i| now < tasks[*i].arrival + CLIENT_TIMEOUT);
        stats.admitted_timed_out += (before - queue.len()) as u64;
        while next < tasks.len() && tasks[next].arrival <= now {
            queue.push_back(next);
            next += 1;
        }
        while running.len() < slots {
            let Some(i) = queue.pop_front() else { break };
            running.push((i, now + tasks[i].runtime));
            if tasks[i].priority == 3 {
                stats.high_waits.push(now - tasks[i].arrival);
            }
        }
        if !queue.is_empty() {
            stats
                .busy_while_waiting
                .push(running.len() as f64 / slots as f64);
        }
        now += STEP;
    }
    stats
}

pub fn run(quick: bool) -> Result<(), BoxError> {
    let report = Report;
    let horizon: Ms = if quick { 60_000 } else { 300_000 };
    let tasks = workload(horizon - 10_000);
    simulate_troupe(&tasks, horizon).report("troupe", &report);
    simulate_fifo(&tasks, horizon).report("fifo", &report);

    // Real supervisor, one-thread runtime, buffered RocksDB lease journal.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dir = tempfile::Builder::new().prefix("troupe-bench-").tempdir()?;
    let n = if quick { 2_000 } else { 10_000 };
    let p99 = rt.block_on(async {
        let rocks =
            RocksJournal::open(RocksConfig::new(dir.path()).durability(Durability::Buffered))?;
        let journal: Arc<dyn Journal> = Arc::new(rocks.clone());
        let probe = Arc::new(SimulatedProbe::new(DEVICES, 80 * GB));
        let gpu = GpuSupervisorHandle::spawn(
            GpuArgs {
                probe,
                journal,
                config: GpuConfig::default(),
            },
            None,
        )
        .await?;
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let req = LeaseRequest {
                holder: format!("b{i}"),
                memory: TASK_MEMORY,
                compute: TASK_COMPUTE,
                priority: 1,
                deadline_ms: now_ms() + 5_000,
                ttl_ms: 10_000,
                expected_ms: 1_000,
            };
            let t = Instant::now();
            let lease = gpu.acquire(req, None, None).await?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            gpu.release(&lease).await?;
        }
        gpu.stop().await;
        rocks.close().await;
        Ok::<_, BoxError>(percentile(&lat, 0.99))
    })?;
    report.figure("lease_grant_p99", p99, "us");

    // Scheduler decisions per second (request + release), wall clock.
    let devices: Vec<DeviceCapacity> = (0..DEVICES)
        .map(|i| DeviceCapacity {
            index: i,
            memory: 80 * GB,
            compute: 100,
            healthy: true,
        })
        .collect();
    let mut s = Scheduler::new(devices, SchedulerConfig::default());
    let ops = if quick { 200_000 } else { 1_000_000 };
    let start = Instant::now();
    let mut held: VecDeque<u64> = VecDeque::new();
    for i in 0..ops as u64 {
        let req = LeaseRequest {
            holder: "d".into(),
            memory: TASK_MEMORY,
            compute: TASK_COMPUTE,
            priority: (i % 4) as u8,
            deadline_ms: i + 10_000,
            ttl_ms: 60_000,
            expected_ms: 1_000,
        };
        for o in s.request(i, req, i) {
            if let Outcome::Granted { lease, .. } = o {
                held.push_back(lease.id);
            }
        }
        if held.len() >= 12
            && let Some(id) = held.pop_front()
        {
            let _ = s.release(id, i);
        }
    }
    let decisions = ops as f64 / start.elapsed().as_secs_f64();
    report.figure("lease_decisions", decisions, "/s");
    Ok(())
}

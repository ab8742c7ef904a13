//! The leases suite: GPU admission on a load the scheduler is not told,
//! through the real `GpuSupervisor`, against four baselines on the same
//! arrivals; then the lease path's latency with 1,000 concurrent requesters.
//!
//! ## The load (fixed before the policy was tuned)
//!
//! 4 simulated GPUs of 80 GB. Four kinds of work, mixed sizes and
//! log-normal run times (median, sigma): `chat-small` 10 GB and 25 % (0.8 s,
//! 0.6; 45 % of tasks), `chat-large` 40 GB and 50 % (2.5 s, 0.7; 25 %),
//! `embed` 20 GB and 25 % (1.5 s, 0.5; 20 %), `long-gen` a whole GPU (4 s,
//! 0.6; 10 %). Priorities 0-3 (50/25/15/10 %). A task's client gives up at
//! its deadline, arrival plus 3 to 6 times its kind's median plus 1 s.
//! Arrivals alternate 5 s bursts at 2-4x capacity (about 3.7 tasks/s) with
//! 5 s at 0.3x. Three seeds.
//!
//! ## What each policy is told
//!
//! Troupe gets each task's kind, size, priority and deadline, and an
//! estimate of its run time: the true one times a factor drawn from 0.5 to
//! 1.5 (`troupe_`), or none at all (`troupe_noest_`). It learns the rest
//! from the leases it sees released. It runs as the real supervisor (actor,
//! in-memory lease journal, inbox, ticks) on a paused Tokio runtime: the
//! real code path in virtual time. The baselines are simulated in 10 ms
//! steps: `fifo_` (everything admitted, started in order), `fifo_drop_`
//! (drops at dequeue what cannot finish by its deadline at its kind's true
//! mean run time), `priority_drop_` (strict priority with that drop, as
//! Triton's priority levels with a reject time-out), `priority_preempt_`
//! (strict priority; a higher-priority task that does not fit preempts
//! lower-priority ones, which are re-queued and computed again from the
//! start, as vLLM does).
//!
//! ## What counts
//!
//! Every admitted task that does not finish by its deadline (timed out in
//! the queue or running, dropped, preempted and killed, expired) is a
//! failure: `admitted_failed_share`. Refused at once: `refused_early_share`.
//! `goodput`: tasks finished in time per second. `top_priority_wait_p50` /
//! `_p99`: arrival to start of priority-3 tasks that started.
//! `utilization_mean` / `_spread`: compute share of work that went on to
//! finish in time (work thrown away is not useful), per 1 s window in which
//! demand exceeded capacity throughout, mean and max minus min. Each figure
//! is the median over the seeds, with `_min` and `_max`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use troupe_gpu::probe::SimulatedProbe;
use troupe_gpu::scheduler::{LeaseRequest, Ms, SchedulerConfig};
use troupe_gpu::{Clock, GpuArgs, GpuConfig, GpuError, GpuSupervisorHandle, LeaseNotice};
use troupe_journal::{Durability, InMemoryJournal, Journal, RocksConfig, RocksJournal};

use super::{Report, percentile};

type BoxError = Box<dyn std::error::Error>;

const GB: u64 = 1 << 30;
const DEVICES: u32 = 4;
const DEVICE_MEMORY: u64 = 80 * GB;
const STEP: Ms = 10;
const SEEDS: [u64; 3] = [
    0x5eed_1234_abcd_ef01,
    0x0dd_ba11_cafe_f00d,
    0x7e57_5eed_0042_1337,
];

struct Kind {
    name: &'static str,
    memory: u64,
    compute: u32,
    median_ms: f64,
    sigma: f64,
    share: u64,
}

const KINDS: [Kind; 4] = [
    Kind {
        name: "chat-small",
        memory: 10 * GB,
        compute: 25,
        median_ms: 800.0,
        sigma: 0.6,
        share: 45,
    },
    Kind {
        name: "chat-large",
        memory: 40 * GB,
        compute: 50,
        median_ms: 2_500.0,
        sigma: 0.7,
        share: 25,
    },
    Kind {
        name: "embed",
        memory: 20 * GB,
        compute: 25,
        median_ms: 1_500.0,
        sigma: 0.5,
        share: 20,
    },
    Kind {
        name: "long-gen",
        memory: 80 * GB,
        compute: 100,
        median_ms: 4_000.0,
        sigma: 0.6,
        share: 10,
    },
];

impl Kind {
    fn mean_ms(&self) -> f64 {
        self.median_ms * (self.sigma * self.sigma / 2.0).exp()
    }
}

#[derive(Clone)]
struct Task {
    arrival: Ms,
    kind: usize,
    runtime: Ms,
    priority: u8,
    deadline: Ms,
    /// The estimate Troupe is handed: the true run time, 50 % off either way.
    estimate: Ms,
}

/// A small deterministic generator (xorshift), so every policy sees the same load.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.unit().max(1e-12), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Capacity in tasks per second: device-seconds per second over the mean
/// device-seconds of a task (its larger share, memory or compute).
fn capacity_rate() -> f64 {
    let total: u64 = KINDS.iter().map(|k| k.share).sum();
    let work: f64 = KINDS
        .iter()
        .map(|k| {
            let share = (k.memory as f64 / DEVICE_MEMORY as f64).max(f64::from(k.compute) / 100.0);
            k.share as f64 / total as f64 * k.mean_ms() / 1000.0 * share
        })
        .sum();
    f64::from(DEVICES) / work
}

fn workload(seed: u64, duration: Ms) -> Vec<Task> {
    let mut rng = Rng(seed);
    let cap = capacity_rate();
    let mut tasks = Vec::new();
    let mut t = 0.0;
    let mut burst_rate = cap * (2.0 + 2.0 * rng.unit());
    let mut period = 0;
    while (t as Ms) < duration {
        let p = (t as Ms) / 5_000;
        if p != period {
            period = p;
            burst_rate = cap * (2.0 + 2.0 * rng.unit());
        }
        let rate = if p.is_multiple_of(2) {
            burst_rate
        } else {
            0.3 * cap
        };
        let mut pick = rng.next() % 100;
        let kind = KINDS
            .iter()
            .position(|k| {
                if pick < k.share {
                    true
                } else {
                    pick -= k.share;
                    false
                }
            })
            .unwrap_or(0);
        let k = &KINDS[kind];
        let runtime = (k.median_ms * (k.sigma * rng.normal()).exp()).max(1.0) as Ms;
        let priority = match rng.next() % 100 {
            0..=49 => 0,
            50..=74 => 1,
            75..=89 => 2,
            _ => 3,
        };
        let slack = k.median_ms * (3.0 + 3.0 * rng.unit()) + 1_000.0;
        let estimate = ((runtime as f64) * (0.5 + rng.unit())).max(1.0) as Ms;
        let arrival = t as Ms;
        tasks.push(Task {
            arrival,
            kind,
            runtime,
            priority,
            deadline: arrival + slack as Ms,
            estimate,
        });
        // Poisson arrivals at the period's rate.
        t += -(1.0 - rng.unit()).max(1e-12).ln() / rate * 1000.0;
    }
    tasks
}

/// What happened to one task.
#[derive(Clone, Default)]
struct Fate {
    refused_early: bool,
    succeeded: bool,
    started: Option<Ms>,
    /// When it stopped counting as demand (done, given up, dropped).
    left: Ms,
    /// Compute intervals it ran, and whether each went on to finish in time.
    runs: Vec<(Ms, Ms, bool)>,
}

#[derive(Default, Clone, Copy)]
struct Figures {
    admitted_failed_share: f64,
    refused_early_share: f64,
    goodput: f64,
    top_wait_p50: f64,
    top_wait_p99: f64,
    utilization_mean: f64,
    utilization_spread: f64,
}

fn figures(tasks: &[Task], fates: &[Fate], horizon: Ms) -> Figures {
    let n = tasks.len() as f64;
    let refused = fates.iter().filter(|f| f.refused_early).count() as f64;
    let admitted = n - refused;
    let ok = fates.iter().filter(|f| f.succeeded).count() as f64;
    let waits: Vec<f64> = tasks
        .iter()
        .zip(fates)
        .filter(|(t, _)| t.priority == 3)
        .filter_map(|(t, f)| f.started.map(|s| (s - t.arrival) as f64))
        .collect();
    // Demand and useful work per step.
    let steps = (horizon / STEP) as usize + 1;
    let mut demand = vec![0u64; steps];
    let mut useful = vec![0u64; steps];
    for (t, f) in tasks.iter().zip(fates) {
        let c = u64::from(KINDS[t.kind].compute);
        if !f.refused_early {
            for s in &mut demand[(t.arrival / STEP) as usize..((f.left / STEP) as usize).min(steps)]
            {
                *s += c;
            }
        }
        for &(a, b, good) in &f.runs {
            if good {
                for s in &mut useful[(a / STEP) as usize..((b / STEP) as usize).min(steps)] {
                    *s += c;
                }
            }
        }
    }
    let capacity = u64::from(DEVICES) * 100;
    let per = (1_000 / STEP) as usize;
    let windows: Vec<f64> = (0..steps / per)
        .filter(|w| demand[w * per..(w + 1) * per].iter().all(|d| *d > capacity))
        .map(|w| {
            let u: u64 = useful[w * per..(w + 1) * per].iter().sum();
            100.0 * u as f64 / (capacity * per as u64) as f64
        })
        .collect();
    let mean = windows.iter().sum::<f64>() / windows.len().max(1) as f64;
    let spread = windows.iter().cloned().fold(f64::MIN, f64::max)
        - windows.iter().cloned().fold(f64::MAX, f64::min);
    Figures {
        admitted_failed_share: 100.0 * (admitted - ok) / admitted.max(1.0),
        refused_early_share: 100.0 * refused / n.max(1.0),
        goodput: ok * 1000.0 / horizon as f64,
        top_wait_p50: percentile(&waits, 0.5),
        top_wait_p99: percentile(&waits, 0.99),
        utilization_mean: mean,
        utilization_spread: if windows.is_empty() { 0.0 } else { spread },
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Baseline {
    Fifo,
    FifoDrop,
    PriorityDrop,
    PriorityPreempt,
}

struct Running {
    task: usize,
    device: usize,
    started: Ms,
}

/// A baseline in 10 ms steps.
fn simulate(policy: Baseline, tasks: &[Task], horizon: Ms) -> Vec<Fate> {
    let mut fates = vec![Fate::default(); tasks.len()];
    let mut free: Vec<(u64, u32)> = vec![(DEVICE_MEMORY, 100); DEVICES as usize];
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut running: Vec<Running> = Vec::new();
    let mut next = 0;
    let mut now = 0;
    let by_priority = matches!(policy, Baseline::PriorityDrop | Baseline::PriorityPreempt);
    let drop = matches!(policy, Baseline::FifoDrop | Baseline::PriorityDrop);
    let place = |free: &Vec<(u64, u32)>, t: &Task| {
        let k = &KINDS[t.kind];
        free.iter()
            .enumerate()
            .filter(|(_, (m, c))| *m >= k.memory && *c >= k.compute)
            .min_by_key(|(i, (m, _))| (m - k.memory, *i))
            .map(|(i, _)| i)
    };
    while now <= horizon {
        // Finished, and given up (running or queued).
        running.retain(|r| {
            let t = &tasks[r.task];
            let done = r.started + t.runtime <= now;
            let gave_up = now >= t.deadline;
            if done || gave_up {
                let k = &KINDS[t.kind];
                free[r.device].0 += k.memory;
                free[r.device].1 += k.compute;
                let ok = done && r.started + t.runtime <= t.deadline;
                let f = &mut fates[r.task];
                f.runs.push((r.started, now, ok));
                f.succeeded = ok;
                f.left = now;
                false
            } else {
                true
            }
        });
        queue.retain(|&i| {
            if now >= tasks[i].deadline {
                fates[i].left = now;
                false
            } else {
                true
            }
        });
        while next < tasks.len() && tasks[next].arrival <= now {
            queue.push_back(next);
            next += 1;
        }
        if by_priority {
            // Stable: arrival order within a priority.
            queue
                .make_contiguous()
                .sort_by_key(|&i| (std::cmp::Reverse(tasks[i].priority), tasks[i].arrival));
        }
        while let Some(&head) = queue.front() {
            let t = &tasks[head];
            if drop && now as f64 + KINDS[t.kind].mean_ms() > t.deadline as f64 {
                queue.pop_front();
                fates[head].left = now;
                continue;
            }
            if let Some(d) = place(&free, t) {
                queue.pop_front();
                let k = &KINDS[t.kind];
                free[d].0 -= k.memory;
                free[d].1 -= k.compute;
                running.push(Running {
                    task: head,
                    device: d,
                    started: now,
                });
                fates[head].started.get_or_insert(now);
                continue;
            }
            if policy == Baseline::PriorityPreempt {
                // Evict lower-priority work on the device where the least
                // needs to go; it is re-queued and starts over.
                let k = &KINDS[t.kind];
                let mut best: Option<(usize, Vec<usize>)> = None;
                for (d, &room) in free.iter().enumerate() {
                    let mut victims: Vec<usize> = (0..running.len())
                        .filter(|&r| {
                            running[r].device == d && tasks[running[r].task].priority < t.priority
                        })
                        .collect();
                    victims.sort_by_key(|&r| {
                        (
                            tasks[running[r].task].priority,
                            std::cmp::Reverse(running[r].started),
                        )
                    });
                    let (mut m, mut c) = room;
                    let mut chosen = Vec::new();
                    for r in victims {
                        if m >= k.memory && c >= k.compute {
                            break;
                        }
                        let vk = &KINDS[tasks[running[r].task].kind];
                        m += vk.memory;
                        c += vk.compute;
                        chosen.push(r);
                    }
                    if m >= k.memory
                        && c >= k.compute
                        && best.as_ref().is_none_or(|(_, b)| chosen.len() < b.len())
                    {
                        best = Some((d, chosen));
                    }
                }
                if let Some((_, mut victims)) = best {
                    victims.sort_unstable_by(|a, b| b.cmp(a));
                    for r in victims {
                        let v = running.remove(r);
                        let vk = &KINDS[tasks[v.task].kind];
                        free[v.device].0 += vk.memory;
                        free[v.device].1 += vk.compute;
                        fates[v.task].runs.push((v.started, now, false));
                        queue.push_back(v.task);
                    }
                    queue
                        .make_contiguous()
                        .sort_by_key(|&i| (std::cmp::Reverse(tasks[i].priority), tasks[i].arrival));
                    continue;
                }
            }
            break;
        }
        now += STEP;
    }
    for (i, f) in fates.iter_mut().enumerate() {
        if f.left == 0 {
            f.left = tasks[i].deadline.min(horizon);
        }
    }
    fates
}

/// Troupe: the real supervisor on a paused runtime, one client task per
/// task. Time is the supervisor's Tokio clock, from 0.
fn run_troupe(tasks: &[Task], horizon: Ms, estimates: bool) -> Result<Vec<Fate>, BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    rt.block_on(async {
        let clock = Clock::Tokio {
            base_ms: 0,
            start: tokio::time::Instant::now(),
        };
        let journal: Arc<dyn Journal> = Arc::new(InMemoryJournal::new());
        let gpu = GpuSupervisorHandle::spawn(
            GpuArgs {
                probe: Arc::new(SimulatedProbe::new(DEVICES, DEVICE_MEMORY)),
                journal,
                config: GpuConfig {
                    scheduler: SchedulerConfig {
                        queue_bound: 256,
                        aging_ms: 30_000,
                        grace_ms: 500,
                        run_quantile: 0.995,
                        ..SchedulerConfig::default()
                    },
                    tick_interval: Duration::from_millis(STEP),
                    clock,
                    ..GpuConfig::default()
                },
            },
            None,
        )
        .await?;
        let fates = Rc::new(RefCell::new(vec![Fate::default(); tasks.len()]));
        let local = tokio::task::LocalSet::new();
        for (i, t) in tasks.iter().cloned().enumerate() {
            let (gpu, fates) = (gpu.clone(), fates.clone());
            local.spawn_local(async move {
                let at = clock_at(&clock, t.arrival);
                tokio::time::sleep_until(at).await;
                let k = &KINDS[t.kind];
                let (tx, mut notices) = tokio::sync::mpsc::channel(4);
                let req = LeaseRequest {
                    holder: format!("task{i}"),
                    kind: k.name.into(),
                    memory: k.memory,
                    compute: k.compute,
                    priority: t.priority,
                    deadline_ms: t.deadline,
                    ttl_ms: t.deadline.saturating_sub(t.arrival) + 1_000,
                    estimate_ms: estimates.then_some(t.estimate),
                    ..LeaseRequest::default()
                };
                let deadline = clock_at(&clock, t.deadline);
                let granted =
                    tokio::time::timeout_at(deadline, gpu.acquire(req, None, Some(tx))).await;
                let now = || clock.now_ms();
                let lease = match granted {
                    Ok(Ok(lease)) => lease,
                    Ok(Err(
                        GpuError::Overloaded { .. }
                        | GpuError::TooLarge { .. }
                        | GpuError::Invalid(_),
                    )) => {
                        let mut f = fates.borrow_mut();
                        f[i].refused_early = true;
                        f[i].left = t.arrival;
                        return;
                    }
                    _ => {
                        fates.borrow_mut()[i].left = now();
                        return;
                    }
                };
                let start = now();
                let finish = clock_at(&clock, start + t.runtime);
                let mut stop = deadline.min(finish);
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(stop) => break,
                        n = notices.recv() => match n {
                            Some(LeaseNotice::Preempt { grace_until, .. }) => {
                                stop = stop.min(clock_at(&clock, grace_until));
                            }
                            Some(LeaseNotice::Ended { .. }) => break,
                            None => std::future::pending::<()>().await,
                        },
                    }
                }
                let end = now();
                let ok = start + t.runtime <= end.min(t.deadline) && end >= start + t.runtime;
                let _ = gpu.release(&lease).await;
                let mut f = fates.borrow_mut();
                f[i].started = Some(start);
                f[i].runs.push((start, end, ok));
                f[i].succeeded = ok;
                f[i].left = end;
            });
        }
        local
            .run_until(tokio::time::sleep_until(clock_at(&clock, horizon)))
            .await;
        gpu.stop().await;
        let fates = fates.borrow().clone();
        Ok(fates)
    })
}

fn clock_at(clock: &Clock, ms: Ms) -> tokio::time::Instant {
    match clock {
        Clock::Tokio { base_ms, start } => {
            *start + Duration::from_millis(ms.saturating_sub(*base_ms))
        }
        Clock::Wall => tokio::time::Instant::now(),
    }
}

fn report_policy(r: &Report, prefix: &str, runs: &[Figures]) {
    let fig = |name: &str, unit: &str, get: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(get).collect();
        v.sort_by(f64::total_cmp);
        r.figure(&format!("{prefix}_{name}"), v[v.len() / 2], unit);
        r.figure(&format!("{prefix}_{name}_min"), v[0], unit);
        r.figure(&format!("{prefix}_{name}_max"), v[v.len() - 1], unit);
    };
    fig("admitted_failed_share", "%", |f| f.admitted_failed_share);
    fig("refused_early_share", "%", |f| f.refused_early_share);
    fig("goodput", "tasks/s", |f| f.goodput);
    fig("top_priority_wait_p50", "ms", |f| f.top_wait_p50);
    fig("top_priority_wait_p99", "ms", |f| f.top_wait_p99);
    fig("utilization_mean", "%", |f| f.utilization_mean);
    fig("utilization_spread", "points", |f| f.utilization_spread);
}

fn median(runs: &[Figures], get: fn(&Figures) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(get).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Lease latency with `requesters` concurrent holders whose leases all
/// fit, each acquiring and releasing `rounds` times.
fn lease_path(
    durability: Durability,
    durable: bool,
    requesters: usize,
    rounds: usize,
) -> Result<(f64, f64, f64), BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::Builder::new().prefix("troupe-bench-").tempdir()?;
    rt.block_on(async {
        let rocks = RocksJournal::open(RocksConfig::new(dir.path()).durability(durability))?;
        let journal: Arc<dyn Journal> = Arc::new(rocks.clone());
        let gpu = GpuSupervisorHandle::spawn(
            GpuArgs {
                probe: Arc::new(SimulatedProbe::new(DEVICES, DEVICE_MEMORY)),
                journal,
                config: GpuConfig::default(),
            },
            None,
        )
        .await?;
        let started = Instant::now();
        let mut joins = Vec::new();
        for i in 0..requesters {
            let gpu = gpu.clone();
            joins.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    let req = LeaseRequest {
                        holder: format!("r{i}"),
                        kind: "path".into(),
                        memory: 256 << 20,
                        compute: 0,
                        priority: 1,
                        deadline_ms: gpu.now_ms() + 60_000,
                        ttl_ms: 60_000,
                        estimate_ms: Some(10),
                        durable,
                        ..LeaseRequest::default()
                    };
                    let t = Instant::now();
                    let lease = gpu.acquire(req, None, None).await?;
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                    gpu.release(&lease).await?;
                }
                Ok::<_, GpuError>(lat)
            }));
        }
        let mut lat = Vec::new();
        for j in joins {
            lat.extend(j.await??);
        }
        let decisions = (2 * requesters * rounds) as f64 / started.elapsed().as_secs_f64();
        gpu.stop().await;
        rocks.close().await;
        Ok::<_, BoxError>((percentile(&lat, 0.5), percentile(&lat, 0.99), decisions))
    })
}

/// The same concurrency through a Tokio semaphore (the least a lease
/// could cost: no policy, no journal, no fencing).
fn semaphore_path(requesters: usize, rounds: usize) -> Result<(f64, f64), BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(requesters));
        let mut joins = Vec::new();
        for _ in 0..requesters {
            let sem = sem.clone();
            joins.push(tokio::spawn(async move {
                let mut lat = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    let t = Instant::now();
                    let p = sem.acquire().await;
                    lat.push(t.elapsed().as_secs_f64() * 1e6);
                    drop(p);
                    tokio::task::yield_now().await;
                }
                lat
            }));
        }
        let mut lat = Vec::new();
        for j in joins {
            lat.extend(j.await?);
        }
        Ok::<_, BoxError>((percentile(&lat, 0.5), percentile(&lat, 0.99)))
    })
}

pub fn run(quick: bool) -> Result<(), BoxError> {
    let report = Report;
    let horizon: Ms = if quick { 60_000 } else { 180_000 };
    let mut per: Vec<(&str, Vec<Figures>)> = vec![
        ("troupe", Vec::new()),
        ("troupe_noest", Vec::new()),
        ("fifo", Vec::new()),
        ("fifo_drop", Vec::new()),
        ("priority_drop", Vec::new()),
        ("priority_preempt", Vec::new()),
    ];
    for seed in SEEDS {
        let tasks = workload(seed, horizon - 20_000);
        let runs = [
            run_troupe(&tasks, horizon, true)?,
            run_troupe(&tasks, horizon, false)?,
            simulate(Baseline::Fifo, &tasks, horizon),
            simulate(Baseline::FifoDrop, &tasks, horizon),
            simulate(Baseline::PriorityDrop, &tasks, horizon),
            simulate(Baseline::PriorityPreempt, &tasks, horizon),
        ];
        for (slot, fates) in per.iter_mut().zip(runs) {
            slot.1.push(figures(&tasks, &fates, horizon));
        }
    }
    report.figure("offered_capacity", capacity_rate(), "tasks/s");
    for (prefix, runs) in &per {
        report_policy(&report, prefix, runs);
    }
    let best = per[2..]
        .iter()
        .map(|(_, r)| median(r, |f| f.goodput))
        .fold(0.0, f64::max);
    report.ratio(
        "troupe_goodput_vs_best_baseline",
        median(&per[0].1, |f| f.goodput),
        best,
    );
    report.ratio(
        "troupe_top_priority_wait_p99_vs_priority_drop",
        median(&per[0].1, |f| f.top_wait_p99),
        median(&per[4].1, |f| f.top_wait_p99),
    );

    // The lease path: 1,000 concurrent requesters whose leases all fit.
    let (requesters, rounds) = if quick { (1_000, 5) } else { (1_000, 20) };
    let (p50, p99, decisions) = lease_path(Durability::Buffered, false, requesters, rounds)?;
    report.figure("lease_grant_p50", p50, "us");
    report.figure("lease_grant_p99", p99, "us");
    report.figure("lease_decisions", decisions, "/s");
    let (p50, p99, _) = lease_path(Durability::Fsync, false, requesters, rounds)?;
    report.figure("lease_grant_fsync_p50", p50, "us");
    report.figure("lease_grant_fsync_p99", p99, "us");
    let (p50, p99, decisions) = lease_path(Durability::Fsync, true, requesters, rounds.min(5))?;
    report.figure("lease_grant_durable_fsync_p50", p50, "us");
    report.figure("lease_grant_durable_fsync_p99", p99, "us");
    report.figure("lease_decisions_durable_fsync", decisions, "/s");
    let (s50, s99) = semaphore_path(requesters, rounds)?;
    report.figure("semaphore_grant_p50", s50, "us");
    report.figure("semaphore_grant_p99", s99, "us");
    Ok(())
}

//! The lease scheduler: a deterministic state machine with no I/O and no
//! clock of its own (every call takes `now` in milliseconds), so that the
//! [`GpuSupervisor`](crate::GpuSupervisor) actor, the property tests and the
//! benchmark's simulations all run the same code.
//!
//! ## What a request says, and what the scheduler learns
//!
//! A [`LeaseRequest`] carries the time its work must **finish** by
//! (`deadline_ms`), what kind of work it is (`kind`) and, optionally, the
//! caller's estimate of its run time (`estimate_ms`). The scheduler is never
//! told the true run time. It learns from every lease released normally,
//! per kind and lease size, the distribution of hold times ([`RunTimes`]:
//! decaying log-scale histograms), as the ratio of the hold to the caller's
//! estimate where there is one, and absolutely where there is not. From it
//! each request gets a *mean* (for wait predictions) and a *high quantile*
//! (`run_quantile`, 95 % by default: what admission is decided on).
//!
//! ## Admission policy
//!
//! | situation | decision |
//! |---|---|
//! | the high quantile alone ends after the deadline | refused at once: `Overloaded` with the time until what was learned is forgotten, or `Invalid` when the caller's own estimate is too long for its own deadline |
//! | a healthy device has room and nobody of equal or higher priority waits | granted at once, on the device it fits best (least memory left over) |
//! | the predicted start plus the high quantile meets the deadline, queue below its bound | queued |
//! | it does not, but preempting lower-ranked leases would, and the gain outweighs the loss | those leases get a preempt notice and `grace_ms`; the request waits |
//! | otherwise, or the priority's queue is full | refused at once with `Overloaded { retry_after }` |
//!
//! A queued request is granted only while `now` plus the high quantile it
//! was admitted on still meets its deadline; once it cannot, it is refused
//! (`Expired`) rather than started to fail. Waiting requests are served by
//! *effective* priority (priority plus one level per `aging_ms` waited, up
//! to the top level); within a level, requests near their latest start go
//! first (earliest latest start), then the shortest predicted run. A
//! request that does not fit yet does not block smaller ones behind it
//! that do (backfill), except that past a head that waits, lower priorities
//! are backfilled only with work predicted to end before the head could
//! start (and its own level too once the head is near its latest start).
//!
//! What is learned of a kind is forgotten after
//! [`SchedulerConfig::forget_ms`] without a finished lease of it, so a kind
//! refused on what it learned is tried on the cold rule again rather than
//! refused forever.
//!
//! ## Preemption
//!
//! A preempted lease's work is lost (it counts as a failure) unless its
//! request said it is `resumable` (it checkpoints and continues elsewhere:
//! a batch job that saves its progress can; an LLM generation cannot, its
//! stream is retried from the start) or it is predicted to finish within
//! the grace period anyway. Preemption happens only when the request could
//! not otherwise meet its deadline, could with it, and its weight
//! (`4^rank`, rank being the *aged* priority) is more than `preempt_gain`
//! (16) times the summed weight of the leases that would be lost: a
//! priority-3 request preempts one priority-0 lease, not four, and never a
//! priority-2 one. Leases keep the rank they were granted
//! at, so aging is not undone by preemption.
//!
//! Granted capacity, counting leases in their grace period, never exceeds a
//! device's capacity; every grant carries a fresh fencing generation.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::GpuError;

/// Milliseconds on the scheduler's clock.
pub type Ms = u64;

/// Priority levels: 0 (lowest) to `PRIORITIES - 1` (highest).
pub const PRIORITIES: usize = 4;

/// What a holder asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LeaseRequest {
    /// Who will hold the lease (an actor name, a task id).
    pub holder: String,
    /// What kind of work it is (a model name, a task type): run times are
    /// learned per kind and lease size. Empty is a kind too.
    #[serde(default)]
    pub kind: String,
    /// Device memory, in bytes.
    pub memory: u64,
    /// Compute share, in percent of one device (0 to 100).
    pub compute: u32,
    /// 0 (lowest) to `PRIORITIES - 1`.
    pub priority: u8,
    /// The work must *finish* by this time, or it is not worth doing.
    pub deadline_ms: Ms,
    /// Lease lifetime without a renewal.
    pub ttl_ms: Ms,
    /// The caller's estimate of how long it will hold the lease, if it has
    /// one. Never trusted as is: the scheduler learns how far off a kind's
    /// estimates are.
    #[serde(default)]
    pub estimate_ms: Option<Ms>,
    /// The work checkpoints: preempting it loses nothing.
    #[serde(default)]
    pub resumable: bool,
    /// Journal this lease's grant, renewals and end one by one, so that a
    /// supervisor restarted in *another* process still sees it (holders
    /// outside this process: a cluster peer, an external worker). Holders
    /// in the process leave it `false`: a crash ends them with the
    /// supervisor, and only a block high-water mark of ids is journaled.
    #[serde(default)]
    pub durable: bool,
}

fn yes() -> bool {
    true
}

/// A granted share of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Lease id.
    pub id: u64,
    /// Device index.
    pub device: u32,
    /// Holder.
    pub holder: String,
    /// Memory held.
    pub memory: u64,
    /// Compute share held.
    pub compute: u32,
    /// Priority it was asked at.
    pub priority: u8,
    /// When it was granted.
    pub granted_ms: Ms,
    /// When it ends unless renewed.
    pub expires_ms: Ms,
    /// Fencing generation: a device refuses work that presents another one.
    pub generation: u64,
    /// Set once preempted: the end of its grace period.
    pub preempt_at: Option<Ms>,
    /// Predicted mean hold time (for wait predictions).
    pub expected_ms: Ms,
    /// Kind of work (from the request).
    #[serde(default)]
    pub kind: String,
    /// The caller's estimate (from the request).
    #[serde(default)]
    pub estimate_ms: Option<Ms>,
    /// Its finish deadline (0 in journals written before deadlines meant
    /// the finish).
    #[serde(default)]
    pub deadline_ms: Ms,
    /// Aged priority at grant: what preemption compares.
    #[serde(default)]
    pub rank: u8,
    /// Preempting it loses nothing.
    #[serde(default)]
    pub resumable: bool,
    /// Journaled one by one (see [`LeaseRequest::durable`]); leases read
    /// from older journals are.
    #[serde(default = "yes")]
    pub durable: bool,
}

/// Why a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// Its holder released it.
    Released,
    /// Its TTL ran out.
    Expired,
    /// Its holder died.
    HolderGone,
    /// Higher-priority work took its capacity (after the grace period).
    Preempted,
    /// Its device failed.
    DeviceFailed,
}

/// Something the scheduler decided, for the caller to act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Request `ticket` got `lease`.
    Granted {
        /// The request's ticket.
        ticket: u64,
        /// The lease.
        lease: Lease,
    },
    /// Request `ticket` will not be served.
    Refused {
        /// The request's ticket.
        ticket: u64,
        /// Why.
        error: GpuError,
    },
    /// A lease must finish by `grace_until`.
    PreemptNotice {
        /// The lease.
        lease: Lease,
        /// End of its grace period.
        grace_until: Ms,
    },
    /// A lease ended.
    Ended {
        /// The lease.
        lease: Lease,
        /// Why.
        reason: EndReason,
    },
}

/// A device as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCapacity {
    /// Device index.
    pub index: u32,
    /// Memory that may be leased.
    pub memory: u64,
    /// Compute that may be leased, in percent (100 = the whole device).
    pub compute: u32,
    /// Accepting leases.
    pub healthy: bool,
}

/// Scheduler bounds and timings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    /// Most waiting requests per priority.
    pub queue_bound: usize,
    /// A waiting request gains one priority level per this many ms.
    pub aging_ms: Ms,
    /// Grace period of a preempted lease.
    pub grace_ms: Ms,
    /// Longest TTL a lease may ask for.
    pub max_ttl_ms: Ms,
    /// The quantile of the learned run time admission is decided on.
    pub run_quantile: f64,
    /// Before a kind has `min_samples` finished leases: the run time
    /// assumed when the caller gives no estimate.
    pub default_run_ms: Ms,
    /// Before a kind has `min_samples` finished leases: the high quantile
    /// is the estimate (or `default_run_ms`) times this.
    pub cold_factor: f64,
    /// Finished leases of a kind before its learned distribution is used.
    pub min_samples: u32,
    /// The share of capacity queued work is predicted to keep busy (the
    /// rest is lost to packing), in percent.
    pub packing_pct: u32,
    /// Preemption happens only when the request's weight is more than this
    /// many times the weight of the work it throws away.
    pub preempt_gain: u64,
    /// What was learned of a kind is forgotten once none of its leases has
    /// finished for this long: its requests are admitted on the cold rule
    /// again. Without it, a kind whose learned run time is longer than its
    /// callers' deadlines would be refused forever, and nothing it could
    /// learn would ever change that (a faster model server, a lighter load).
    pub forget_ms: Ms,
}

impl Default for SchedulerConfig {
    /// 256 waiting per priority, one level per 2 s of waiting, 1 s grace,
    /// TTLs up to 10 minutes, admission on the 95th percentile, the
    /// caller's estimate (or 2 s) as is until 16 leases of a kind have
    /// finished, 90 % packing, preemption for a 16-fold gain, run times
    /// forgotten after 10 minutes without a finished lease of their kind.
    fn default() -> Self {
        Self {
            queue_bound: 256,
            aging_ms: 2_000,
            grace_ms: 1_000,
            max_ttl_ms: 600_000,
            run_quantile: 0.95,
            default_run_ms: 2_000,
            cold_factor: 1.0,
            min_samples: 16,
            packing_pct: 90,
            preempt_gain: 16,
            forget_ms: 600_000,
        }
    }
}

/// A decaying histogram on a log scale (5 % wide buckets): constant memory,
/// constant-time updates, quantiles good to a bucket. Old samples fade:
/// once it holds `2 * WINDOW` samples every count is halved.
#[derive(Debug, Clone)]
struct LogHist {
    min: f64,
    counts: Vec<f64>,
    total: f64,
    sum: f64,
}

const GROWTH: f64 = 1.05;
const WINDOW: f64 = 512.0;

impl LogHist {
    fn new(min: f64, max: f64) -> Self {
        let n = ((max / min).ln() / GROWTH.ln()).ceil() as usize + 1;
        Self {
            min,
            counts: vec![0.0; n],
            total: 0.0,
            sum: 0.0,
        }
    }

    fn record(&mut self, v: f64) {
        let i = if v <= self.min {
            0
        } else {
            ((v / self.min).ln() / GROWTH.ln()) as usize
        };
        let i = i.min(self.counts.len() - 1);
        self.counts[i] += 1.0;
        self.total += 1.0;
        self.sum += v;
        if self.total >= 2.0 * WINDOW {
            for c in &mut self.counts {
                *c /= 2.0;
            }
            self.total /= 2.0;
            self.sum /= 2.0;
        }
    }

    fn mean(&self) -> f64 {
        self.sum / self.total.max(f64::MIN_POSITIVE)
    }

    /// The upper edge of the bucket holding quantile `q` (conservative).
    fn quantile(&self, q: f64) -> f64 {
        let target = q.clamp(0.0, 1.0) * self.total;
        let mut seen = 0.0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target && *c > 0.0 {
                return self.min * GROWTH.powi(i as i32 + 1);
            }
        }
        self.min * GROWTH.powi(self.counts.len() as i32)
    }
}

#[derive(Debug, Clone)]
struct Learned {
    /// hold / estimate, for requests that gave an estimate.
    ratio: LogHist,
    /// hold in ms, for those that did not.
    absolute: LogHist,
    /// When the last lease of this kind finished.
    last_ms: Ms,
}

impl Learned {
    fn new(now: Ms) -> Self {
        Self {
            ratio: LogHist::new(1.0 / 64.0, 64.0),
            absolute: LogHist::new(1.0, 1e7),
            last_ms: now,
        }
    }

    fn stale(&self, now: Ms, config: &SchedulerConfig) -> bool {
        now.saturating_sub(self.last_ms) >= config.forget_ms
    }
}

/// What the scheduler predicts of a request's run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prediction {
    /// Mean hold (for wait predictions).
    pub mean_ms: Ms,
    /// The high quantile admission is decided on.
    pub high_ms: Ms,
    /// Whether it came from learned leases (false: the cold rule).
    pub learned: bool,
}

/// Run times learned from finished leases, per kind and lease size (memory
/// in powers of two of GiB, and compute share).
#[derive(Debug, Clone, Default)]
pub struct RunTimes {
    by: HashMap<(String, u32, u32), Learned>,
}

/// At most this many kinds and sizes are learned (a bound against callers
/// that put ids in `kind`); past it, new ones use the cold rule.
pub const MAX_LEARNED_KINDS: usize = 4_096;

fn size_class(memory: u64, compute: u32) -> (u32, u32) {
    let gib = (memory >> 30).max(1);
    (64 - gib.leading_zeros(), compute)
}

impl RunTimes {
    fn key(kind: &str, memory: u64, compute: u32) -> (String, u32, u32) {
        let (m, c) = size_class(memory, compute);
        (kind.to_owned(), m, c)
    }

    /// Records a lease held for `held_ms` that ended normally at `now`.
    /// What was learned of its kind before it went stale
    /// ([`SchedulerConfig::forget_ms`]) is dropped first.
    pub fn record(&mut self, lease: &Lease, held_ms: Ms, now: Ms, config: &SchedulerConfig) {
        let key = Self::key(&lease.kind, lease.memory, lease.compute);
        if !self.by.contains_key(&key) && self.by.len() >= MAX_LEARNED_KINDS {
            return;
        }
        let l = self.by.entry(key).or_insert_with(|| Learned::new(now));
        if l.stale(now, config) {
            *l = Learned::new(now);
        }
        l.last_ms = l.last_ms.max(now);
        match lease.estimate_ms {
            Some(e) if e > 0 => l.ratio.record(held_ms.max(1) as f64 / e as f64),
            _ => l.absolute.record(held_ms.max(1) as f64),
        }
    }

    /// When what was learned of `req`'s kind and size goes stale (and
    /// predictions fall back to the cold rule), if anything is learned.
    pub fn forgotten_at(&self, req: &LeaseRequest, config: &SchedulerConfig) -> Option<Ms> {
        self.by
            .get(&Self::key(&req.kind, req.memory, req.compute))
            .map(|l| l.last_ms.saturating_add(config.forget_ms))
    }

    /// The prediction for `req` at `now` (at the quantile
    /// [`SchedulerConfig::run_quantile`]).
    pub fn predict(&self, req: &LeaseRequest, config: &SchedulerConfig, now: Ms) -> Prediction {
        let learned = self
            .by
            .get(&Self::key(&req.kind, req.memory, req.compute))
            .filter(|l| !l.stale(now, config));
        let enough = |h: &LogHist| h.total >= f64::from(config.min_samples.max(1)) / 2.0;
        let (mean, high, learned) = match (req.estimate_ms, learned) {
            (Some(e), Some(l)) if e > 0 && enough(&l.ratio) => (
                e as f64 * l.ratio.mean(),
                e as f64 * l.ratio.quantile(config.run_quantile),
                true,
            ),
            (Some(e), _) if e > 0 => (e as f64, e as f64 * config.cold_factor, false),
            (_, Some(l)) if enough(&l.absolute) => (
                l.absolute.mean(),
                l.absolute.quantile(config.run_quantile),
                true,
            ),
            _ => {
                let d = config.default_run_ms as f64;
                (d, d * config.cold_factor, false)
            }
        };
        let mean_ms = mean.ceil().max(1.0) as Ms;
        Prediction {
            mean_ms,
            high_ms: (high.ceil() as Ms).max(mean_ms),
            learned,
        }
    }
}

#[derive(Debug, Clone)]
struct Pending {
    ticket: u64,
    req: LeaseRequest,
    enqueued_ms: Ms,
    /// What it was admitted on.
    predicted: Prediction,
}

impl Pending {
    /// The latest start that still meets the deadline on the prediction it
    /// was admitted on.
    fn latest_start(&self) -> Ms {
        self.req.deadline_ms.saturating_sub(self.predicted.high_ms)
    }
}

/// The lease table and the queues. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    devices: Vec<DeviceCapacity>,
    /// Leased (memory, compute) per device, in `devices` order.
    used: Vec<(u64, u32)>,
    leases: BTreeMap<u64, Lease>,
    queues: [VecDeque<Pending>; PRIORITIES],
    next_lease: u64,
    next_generation: u64,
    run_times: RunTimes,
    /// Work arriving per priority, in devices kept busy (decaying average).
    arriving: [f64; PRIORITIES],
    arriving_at: Ms,
    /// The latest `now` seen (for predictions asked without one).
    clock_ms: Ms,
}

/// Time constant of the arriving-work averages.
const ARRIVING_MS: f64 = 5_000.0;

fn overloaded(retry_after: Ms, reason: impl Into<String>) -> GpuError {
    GpuError::Overloaded {
        retry_after: Duration::from_millis(retry_after.max(1)),
        reason: reason.into(),
    }
}

fn weight(rank: usize) -> u64 {
    4u64.pow(rank.min(PRIORITIES) as u32)
}

impl Scheduler {
    /// A scheduler over `devices`.
    pub fn new(devices: Vec<DeviceCapacity>, config: SchedulerConfig) -> Self {
        Self {
            config,
            used: vec![(0, 0); devices.len()],
            devices,
            leases: BTreeMap::new(),
            queues: Default::default(),
            next_lease: 1,
            next_generation: 1,
            run_times: RunTimes::default(),
            arriving: [0.0; PRIORITIES],
            arriving_at: 0,
            clock_ms: 0,
        }
    }

    fn decay_arriving(&mut self, now: Ms) {
        let dt = now.saturating_sub(self.arriving_at) as f64;
        let k = (-dt / ARRIVING_MS).exp();
        for a in &mut self.arriving {
            *a *= k;
        }
        self.arriving_at = self.arriving_at.max(now);
    }

    /// The devices.
    pub fn devices(&self) -> &[DeviceCapacity] {
        &self.devices
    }

    /// The settings.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Active leases (including those in their grace period).
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// One lease.
    pub fn lease(&self, id: u64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    /// Requests waiting, per priority.
    pub fn queued(&self) -> [usize; PRIORITIES] {
        std::array::from_fn(|p| self.queues[p].len())
    }

    /// Waiting requests with when they were queued, by priority then arrival.
    pub fn waiting(&self) -> impl Iterator<Item = (&LeaseRequest, Ms)> {
        self.queues
            .iter()
            .rev()
            .flat_map(|q| q.iter().map(|p| (&p.req, p.enqueued_ms)))
    }

    /// A waiting request's ticket and the prediction it was admitted on.
    pub fn admitted_on(&self) -> impl Iterator<Item = (u64, &LeaseRequest, Prediction)> {
        self.queues
            .iter()
            .flatten()
            .map(|p| (p.ticket, &p.req, p.predicted))
    }

    /// What is learned of run times.
    pub fn run_times(&self) -> &RunTimes {
        &self.run_times
    }

    /// The prediction `req` would be admitted on now (the latest time the
    /// scheduler was given).
    pub fn predict(&self, req: &LeaseRequest) -> Prediction {
        self.predict_at(req, self.clock_ms)
    }

    fn predict_at(&self, req: &LeaseRequest, now: Ms) -> Prediction {
        self.run_times.predict(req, &self.config, now)
    }

    /// Would `memory` and `compute` fit on some healthy device now?
    pub fn fits(&self, memory: u64, compute: u32) -> bool {
        self.place(memory, compute).is_some()
    }

    fn pos(&self, device: u32) -> Option<usize> {
        self.devices.iter().position(|d| d.index == device)
    }

    /// Memory and compute leased on `device` (grace periods included).
    pub fn used(&self, device: u32) -> (u64, u32) {
        self.pos(device).map_or((0, 0), |i| self.used[i])
    }

    /// Best fit: the healthy device with room that leaves the least memory
    /// over.
    fn place(&self, memory: u64, compute: u32) -> Option<u32> {
        self.devices
            .iter()
            .zip(&self.used)
            .filter(|(d, (m, c))| d.healthy && m + memory <= d.memory && c + compute <= d.compute)
            .min_by_key(|(d, (m, _))| (d.memory - m - memory, d.index))
            .map(|(d, _)| d.index)
    }

    fn insert_lease(&mut self, lease: Lease) {
        if let Some(i) = self.pos(lease.device) {
            self.used[i].0 += lease.memory;
            self.used[i].1 += lease.compute;
        }
        self.leases.insert(lease.id, lease);
    }

    fn grant(&mut self, ticket: u64, p: Pending, device: u32, now: Ms) -> Outcome {
        let rank = self.effective(&p, now) as u8;
        let req = p.req;
        let lease = Lease {
            id: self.next_lease,
            device,
            holder: req.holder,
            memory: req.memory,
            compute: req.compute,
            priority: req.priority,
            granted_ms: now,
            expires_ms: now + req.ttl_ms,
            generation: self.next_generation,
            preempt_at: None,
            expected_ms: p.predicted.mean_ms,
            kind: req.kind,
            estimate_ms: req.estimate_ms,
            deadline_ms: req.deadline_ms,
            rank,
            resumable: req.resumable,
            durable: req.durable,
        };
        self.next_lease += 1;
        self.next_generation += 1;
        self.insert_lease(lease.clone());
        Outcome::Granted { ticket, lease }
    }

    fn effective(&self, p: &Pending, now: Ms) -> usize {
        let aged = (now.saturating_sub(p.enqueued_ms) / self.config.aging_ms.max(1)) as usize;
        (p.req.priority as usize + aged).min(PRIORITIES - 1)
    }

    fn urgent(p: &Pending, now: Ms) -> bool {
        now + p.predicted.mean_ms >= p.latest_start()
    }

    /// The serving order: effective priority, then urgent ones by latest
    /// start, then the shortest predicted run, then arrival.
    fn order_key(&self, p: &Pending, now: Ms) -> (std::cmp::Reverse<usize>, u8, Ms, Ms) {
        let urgent = Self::urgent(p, now);
        (
            std::cmp::Reverse(self.effective(p, now)),
            u8::from(!urgent),
            if urgent {
                p.latest_start()
            } else {
                p.predicted.mean_ms
            },
            p.enqueued_ms,
        )
    }

    fn validate(&self, req: &LeaseRequest) -> Result<(), GpuError> {
        if req.priority as usize >= PRIORITIES {
            return Err(GpuError::Invalid(format!(
                "priority {} is outside 0..{PRIORITIES}",
                req.priority
            )));
        }
        if req.compute == 0 && req.memory == 0 {
            return Err(GpuError::Invalid("a lease needs memory or compute".into()));
        }
        if req.ttl_ms == 0 || req.ttl_ms > self.config.max_ttl_ms {
            return Err(GpuError::Invalid(format!(
                "ttl of {} ms is outside 1..={} ms",
                req.ttl_ms, self.config.max_ttl_ms
            )));
        }
        if !self
            .devices
            .iter()
            .any(|d| d.memory >= req.memory && d.compute >= req.compute)
        {
            return Err(GpuError::TooLarge {
                memory: req.memory,
                compute: req.compute,
            });
        }
        Ok(())
    }

    /// The share of one device a request occupies (its larger dimension).
    fn share(&self, memory: u64, compute: u32) -> f64 {
        let (dm, dc) = self
            .devices
            .iter()
            .filter(|d| d.healthy)
            .map(|d| (d.memory, d.compute))
            .max()
            .unwrap_or((1, 100));
        (memory as f64 / dm.max(1) as f64).max(f64::from(compute) / f64::from(dc.max(1)))
    }

    /// When a lease is predicted to end: at its grace period's end if
    /// preempted, else at its predicted finish; one that has run past it
    /// is given another half of its mean (run times have long tails); never
    /// past its expiry.
    fn predicted_end(l: &Lease, now: Ms) -> Ms {
        if let Some(at) = l.preempt_at {
            return at.max(now);
        }
        let finish = l.granted_ms + l.expected_ms;
        let finish = if finish > now {
            finish
        } else {
            now + l.expected_ms / 2
        };
        finish.min(l.expires_ms).max(now)
    }

    /// Predicted time until enough of one device is free for `memory` and
    /// `compute`, leases ending at their predicted finish (at the latest at
    /// expiry, or their grace period's end).
    fn fit_wait(&self, memory: u64, compute: u32, now: Ms) -> Ms {
        let mut best = Ms::MAX;
        for (d, &(mut m, mut c)) in self.devices.iter().zip(&self.used) {
            if !d.healthy {
                continue;
            }
            if m + memory <= d.memory && c + compute <= d.compute {
                return 0;
            }
            let mut ends: Vec<(Ms, u64, u32)> = self
                .leases
                .values()
                .filter(|l| l.device == d.index)
                .map(|l| (Self::predicted_end(l, now), l.memory, l.compute))
                .collect();
            ends.sort_unstable();
            for (t, lm, lc) in ends {
                m -= lm;
                c -= lc;
                if m + memory <= d.memory && c + compute <= d.compute {
                    best = best.min(t - now);
                    break;
                }
            }
        }
        best
    }

    /// Predicted wait before `req` (with prediction `pred`) is granted: until
    /// it fits, or until the work queued ahead of it in the serving order
    /// has run on the healthy devices, whichever is later.
    fn predicted_wait(&self, req: &LeaseRequest, pred: Prediction, now: Ms) -> Ms {
        let me = Pending {
            ticket: u64::MAX,
            req: req.clone(),
            enqueued_ms: now,
            predicted: pred,
        };
        let key = self.order_key(&me, now);
        let ahead: f64 = self
            .queues
            .iter()
            .flatten()
            .filter(|p| self.order_key(p, now) < key)
            .map(|p| p.predicted.mean_ms as f64 * self.share(p.req.memory, p.req.compute))
            .sum();
        let healthy = self.devices.iter().filter(|d| d.healthy).count().max(1) as f64;
        let capacity = healthy * f64::from(self.config.packing_pct.clamp(1, 100)) / 100.0;
        // Work that will keep arriving ahead of it while it waits (higher
        // priorities, and about half of its own level, whose shorter runs
        // go first) takes capacity from it.
        let p = req.priority as usize;
        let k = (-(now.saturating_sub(self.arriving_at) as f64) / ARRIVING_MS).exp();
        let overtaking = k * (self.arriving[p + 1..].iter().sum::<f64>() + 0.25 * self.arriving[p]);
        let left = (capacity - overtaking).max(0.05 * capacity);
        let queue_wait = (ahead / left).ceil() as Ms;
        self.fit_wait(req.memory, req.compute, now).max(queue_wait)
    }

    /// Expected time until `req` could be granted (with the prediction it
    /// would be admitted on now).
    pub fn expected_wait(&self, req: &LeaseRequest, now: Ms) -> Ms {
        self.predicted_wait(req, self.predict_at(req, now), now)
    }

    /// Plans preemption on one device so that `memory`/`compute` fits, for
    /// work of rank `rank`: the victims and the weight of the work lost.
    /// `None` if no plan pays off.
    fn preemption_plan(&self, memory: u64, compute: u32, rank: usize, now: Ms) -> Option<Vec<u64>> {
        let grace_until = now + self.config.grace_ms;
        let lost = |l: &Lease| -> u64 {
            let finishes_in_grace = l.granted_ms + l.expected_ms <= grace_until;
            if l.resumable || finishes_in_grace {
                0
            } else {
                weight(l.rank as usize)
            }
        };
        let mut best: Option<(u64, Vec<u64>)> = None;
        for (d, &(mut m, mut c)) in self.devices.iter().zip(&self.used) {
            if !d.healthy {
                continue;
            }
            // Leases already in grace will end anyway.
            for l in self.leases.values() {
                if l.device == d.index && l.preempt_at.is_some() {
                    m -= l.memory;
                    c -= l.compute;
                }
            }
            let mut victims: Vec<&Lease> = self
                .leases
                .values()
                .filter(|l| {
                    l.device == d.index && l.preempt_at.is_none() && (l.rank as usize) < rank
                })
                .collect();
            // Cheapest first: nothing lost, then the lowest rank, then the
            // youngest (least work thrown away).
            victims.sort_by_key(|l| (lost(l), l.rank, std::cmp::Reverse(l.granted_ms)));
            let (mut chosen, mut cost) = (Vec::new(), 0);
            for v in victims {
                if m + memory <= d.memory && c + compute <= d.compute {
                    break;
                }
                m -= v.memory;
                c -= v.compute;
                cost += lost(v);
                chosen.push(v.id);
            }
            let fits = m + memory <= d.memory && c + compute <= d.compute;
            if fits && !chosen.is_empty() && best.as_ref().is_none_or(|(b, _)| cost < *b) {
                best = Some((cost, chosen));
            }
        }
        best.filter(|(cost, _)| cost.saturating_mul(self.config.preempt_gain.max(1)) < weight(rank))
            .map(|(_, v)| v)
    }

    fn preempt(&mut self, victims: Vec<u64>, now: Ms) -> Vec<Outcome> {
        let grace_until = now + self.config.grace_ms;
        victims
            .into_iter()
            .filter_map(|id| {
                let l = self.leases.get_mut(&id)?;
                let at = grace_until.min(l.expires_ms);
                l.preempt_at = Some(at);
                Some(Outcome::PreemptNotice {
                    lease: l.clone(),
                    grace_until: at,
                })
            })
            .collect()
    }

    /// Asks for a lease. The request is granted, queued (its outcome comes
    /// from a later call) or refused at once.
    pub fn request(&mut self, ticket: u64, req: LeaseRequest, now: Ms) -> Vec<Outcome> {
        if let Err(error) = self.validate(&req) {
            return vec![Outcome::Refused { ticket, error }];
        }
        if req.deadline_ms <= now {
            return vec![Outcome::Refused {
                ticket,
                error: GpuError::Expired { holder: req.holder },
            }];
        }
        self.clock_ms = self.clock_ms.max(now);
        let predicted = self.predict_at(&req, now);
        self.decay_arriving(now);
        self.arriving[req.priority as usize] +=
            predicted.mean_ms as f64 * self.share(req.memory, req.compute) / ARRIVING_MS;
        if now.saturating_add(predicted.high_ms) > req.deadline_ms {
            let budget = req.deadline_ms - now;
            let error = match self.run_times.forgotten_at(&req, &self.config) {
                // What was learned says it cannot make it; a retry can
                // once that is forgotten (sooner if a lease of its kind
                // finishes faster meanwhile and changes what is learned).
                Some(at) if predicted.learned => overloaded(
                    at.saturating_sub(now),
                    format!(
                        "`{}` has lately run {} ms at the {:.0}th percentile, more than the \
                         {budget} ms left before its deadline",
                        req.kind,
                        predicted.high_ms,
                        self.config.run_quantile * 100.0
                    ),
                ),
                // Its own estimate (or the default) does not fit its own
                // deadline: no retry can help.
                _ => GpuError::Invalid(format!(
                    "`{}` is assumed to run {} ms (its estimate, or the default, times the \
                     cold factor), more than the {budget} ms left before its deadline: give it \
                     a later deadline",
                    req.kind, predicted.high_ms
                )),
            };
            return vec![Outcome::Refused { ticket, error }];
        }
        let p = req.priority as usize;
        let pending = Pending {
            ticket,
            req,
            enqueued_ms: now,
            predicted,
        };
        let nobody_ahead = self.queues[p..].iter().all(VecDeque::is_empty);
        if nobody_ahead && let Some(device) = self.place(pending.req.memory, pending.req.compute) {
            return vec![self.grant(ticket, pending, device, now)];
        }
        if self.queues[p].len() >= self.config.queue_bound {
            let wait = self.predicted_wait(&pending.req, predicted, now);
            return vec![Outcome::Refused {
                ticket,
                error: overloaded(
                    wait,
                    format!("priority {p} queue is full ({})", self.config.queue_bound),
                ),
            }];
        }
        let wait = self.predicted_wait(&pending.req, predicted, now);
        let mut out = Vec::new();
        if now.saturating_add(wait).saturating_add(predicted.high_ms) > pending.req.deadline_ms {
            // Only preemption could serve it in time: does it pay?
            let in_time = now + self.config.grace_ms + predicted.high_ms <= pending.req.deadline_ms;
            let plan = in_time
                .then(|| self.preemption_plan(pending.req.memory, pending.req.compute, p, now))
                .flatten();
            match plan {
                Some(victims) => out = self.preempt(victims, now),
                None => {
                    return vec![Outcome::Refused {
                        ticket,
                        error: overloaded(
                            wait,
                            format!(
                                "predicted wait {wait} ms plus run {} ms ends after its deadline",
                                predicted.high_ms
                            ),
                        ),
                    }];
                }
            }
        }
        self.queues[p].push_back(pending);
        // Someone ahead may not fit while this one does (backfill).
        out.extend(self.schedule(now));
        out
    }

    /// Renews a lease for another `ttl_ms` (not past a preemption deadline).
    pub fn renew(&mut self, id: u64, generation: u64, ttl_ms: Ms, now: Ms) -> Result<Ms, GpuError> {
        let l = self.leases.get_mut(&id).ok_or(GpuError::UnknownLease(id))?;
        if l.generation != generation {
            return Err(GpuError::StaleGeneration {
                lease: id,
                device: l.device,
                presented: generation,
                current: Some(l.generation),
            });
        }
        let ttl = ttl_ms.clamp(1, self.config.max_ttl_ms);
        l.expires_ms = match l.preempt_at {
            Some(at) => (now + ttl).min(at),
            None => now + ttl,
        };
        Ok(l.expires_ms)
    }

    /// Checks that work on `device` presenting (`lease`, `generation`) may run.
    pub fn check_fence(&self, device: u32, lease: u64, generation: u64) -> Result<(), GpuError> {
        match self.leases.get(&lease) {
            Some(l) if l.device == device && l.generation == generation => Ok(()),
            other => Err(GpuError::StaleGeneration {
                lease,
                device,
                presented: generation,
                current: other.map(|l| l.generation),
            }),
        }
    }

    fn end(&mut self, id: u64, reason: EndReason) -> Option<Outcome> {
        let lease = self.leases.remove(&id)?;
        if let Some(i) = self.pos(lease.device) {
            self.used[i].0 -= lease.memory;
            self.used[i].1 -= lease.compute;
        }
        Some(Outcome::Ended { lease, reason })
    }

    /// Releases a lease; its hold time is learned (unless it was being
    /// preempted) and waiting requests may be granted.
    pub fn release(&mut self, id: u64, now: Ms) -> Result<Vec<Outcome>, GpuError> {
        self.clock_ms = self.clock_ms.max(now);
        let ended = self
            .end(id, EndReason::Released)
            .ok_or(GpuError::UnknownLease(id))?;
        if let Outcome::Ended { lease, .. } = &ended
            && lease.preempt_at.is_none()
        {
            self.run_times.record(
                lease,
                now.saturating_sub(lease.granted_ms),
                now,
                &self.config,
            );
        }
        let mut out = vec![ended];
        out.extend(self.schedule(now));
        Ok(out)
    }

    /// The holder is gone: its leases end and its waiting requests are dropped.
    pub fn holder_gone(&mut self, holder: &str, now: Ms) -> Vec<Outcome> {
        let ids: Vec<u64> = self
            .leases
            .values()
            .filter(|l| l.holder == holder)
            .map(|l| l.id)
            .collect();
        let mut out: Vec<Outcome> = ids
            .into_iter()
            .filter_map(|id| self.end(id, EndReason::HolderGone))
            .collect();
        for q in &mut self.queues {
            q.retain(|p| {
                if p.req.holder == holder {
                    out.push(Outcome::Refused {
                        ticket: p.ticket,
                        error: GpuError::Expired {
                            holder: holder.to_owned(),
                        },
                    });
                    false
                } else {
                    true
                }
            });
        }
        out.extend(self.schedule(now));
        out
    }

    /// A device failed: no more grants on it, and its leases are revoked.
    pub fn device_failed(&mut self, index: u32, now: Ms) -> Vec<Outcome> {
        if let Some(d) = self.devices.iter_mut().find(|d| d.index == index) {
            d.healthy = false;
        }
        let ids: Vec<u64> = self
            .leases
            .values()
            .filter(|l| l.device == index)
            .map(|l| l.id)
            .collect();
        let mut out: Vec<Outcome> = ids
            .into_iter()
            .filter_map(|id| self.end(id, EndReason::DeviceFailed))
            .collect();
        out.extend(self.schedule(now));
        out
    }

    /// A device is healthy again.
    pub fn device_recovered(&mut self, index: u32, now: Ms) -> Vec<Outcome> {
        if let Some(d) = self.devices.iter_mut().find(|d| d.index == index) {
            d.healthy = true;
        }
        self.schedule(now)
    }

    /// Advances time: ends expired leases and finished grace periods, then
    /// grants what now fits (refusing what can no longer finish in time).
    pub fn tick(&mut self, now: Ms) -> Vec<Outcome> {
        self.clock_ms = self.clock_ms.max(now);
        let mut out = Vec::new();
        let due: Vec<(u64, EndReason)> = self
            .leases
            .values()
            .filter_map(|l| match l.preempt_at {
                Some(at) if at <= now => Some((l.id, EndReason::Preempted)),
                _ if l.expires_ms <= now => Some((l.id, EndReason::Expired)),
                _ => None,
            })
            .collect();
        for (id, reason) in due {
            out.extend(self.end(id, reason));
        }
        out.extend(self.schedule(now));
        out
    }

    /// Refuses waiting requests that can no longer finish by their deadline
    /// on the prediction they were admitted on.
    fn drop_hopeless(&mut self, now: Ms) -> Vec<Outcome> {
        let mut out = Vec::new();
        for q in &mut self.queues {
            q.retain(|p| {
                if now > p.latest_start() {
                    out.push(Outcome::Refused {
                        ticket: p.ticket,
                        error: GpuError::Expired {
                            holder: p.req.holder.clone(),
                        },
                    });
                    false
                } else {
                    true
                }
            });
        }
        out
    }

    /// Grants waiting requests that fit, in the serving order (see the
    /// [module docs](self)), refusing those that can no longer finish in
    /// time; when the head waits, near its latest start, and only
    /// preemption can serve it in time, preempts if that pays.
    pub fn schedule(&mut self, now: Ms) -> Vec<Outcome> {
        let mut out = self.drop_hopeless(now);
        loop {
            let mut order: Vec<(_, usize, usize)> = Vec::new();
            for (p, q) in self.queues.iter().enumerate() {
                for (i, w) in q.iter().enumerate() {
                    order.push((self.order_key(w, now), p, i));
                }
            }
            if order.is_empty() {
                break;
            }
            order.sort_unstable_by_key(|o| o.0);
            let (_, hp, hi) = order[0];
            let head = &self.queues[hp][hi];
            let head_fits = self.place(head.req.memory, head.req.compute).is_some();
            // Past a head that waits, lower priorities are backfilled only
            // with work predicted to be done before the head could start
            // (its own level too, once the head nears its latest start).
            let head_rank = self.effective(head, now);
            let head_urgent = Self::urgent(head, now);
            let horizon = (!head_fits)
                .then(|| now.saturating_add(self.fit_wait(head.req.memory, head.req.compute, now)));
            let mut granted = false;
            for &(_, p, i) in &order {
                let w = &self.queues[p][i];
                let guarded = head_urgent || self.effective(w, now) < head_rank;
                if (p, i) != (hp, hi)
                    && guarded
                    && horizon.is_some_and(|h| now + w.predicted.high_ms > h)
                {
                    continue;
                }
                if let Some(device) = self.place(w.req.memory, w.req.compute) {
                    let w = self.queues[p].remove(i).expect("index from this scan");
                    out.push(self.grant(w.ticket, w, device, now));
                    granted = true;
                    break;
                }
            }
            if !granted {
                let head = &self.queues[hp][hi];
                let (memory, compute) = (head.req.memory, head.req.compute);
                let rank = self.effective(head, now);
                let in_time =
                    now + self.config.grace_ms + head.predicted.high_ms <= head.req.deadline_ms;
                let needs = now + self.fit_wait(memory, compute, now) > head.latest_start();
                let preempting = self.leases.values().any(|l| l.preempt_at.is_some());
                if in_time
                    && needs
                    && !preempting
                    && let Some(victims) = self.preemption_plan(memory, compute, rank, now)
                {
                    out.extend(self.preempt(victims, now));
                }
                break;
            }
        }
        out
    }

    /// Rebuilds a scheduler from journaled (and re-registered) leases, after
    /// a restart: the leases stand until released or expired; ids and
    /// generations continue past the highest seen and past the given
    /// high-water marks, so nothing is granted twice.
    pub fn recover(
        devices: Vec<DeviceCapacity>,
        config: SchedulerConfig,
        leases: Vec<Lease>,
        next_lease: u64,
        next_generation: u64,
    ) -> Self {
        let mut s = Self::new(devices, config);
        for mut l in leases {
            s.next_lease = s.next_lease.max(l.id + 1);
            s.next_generation = s.next_generation.max(l.generation + 1);
            l.rank = l.rank.max(l.priority);
            s.insert_lease(l);
        }
        s.next_lease = s.next_lease.max(next_lease);
        s.next_generation = s.next_generation.max(next_generation);
        s
    }

    /// Carries what was learned of run times over (to a recovered scheduler).
    pub fn with_run_times(mut self, run_times: RunTimes) -> Self {
        self.run_times = run_times;
        self
    }

    /// Next lease id and generation (journaled so a restart continues them).
    pub fn counters(&self) -> (u64, u64) {
        (self.next_lease, self.next_generation)
    }
}

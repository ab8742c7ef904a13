//! The lease scheduler: a deterministic state machine with no I/O and no
//! clock of its own (every call takes `now` in milliseconds), so that the
//! [`GpuSupervisor`](crate::GpuSupervisor) actor, the property tests and the
//! benchmark's simulations all run the same code.
//!
//! ## Admission policy
//!
//! | situation | decision |
//! |---|---|
//! | a healthy device has room and nobody of higher effective priority waits | granted at once, on the device it fits best (least memory left over) |
//! | no room, a lower-priority lease could make room | that lease gets a preempt notice and `grace_ms` to finish; the request waits |
//! | no room, the expected wait ends before the deadline, queue below its bound | queued |
//! | expected wait past the deadline, or the priority's queue is full | refused at once with `Overloaded { retry_after }` |
//!
//! Waiting requests are served by *effective* priority: their priority plus
//! one level per `aging_ms` waited, so low priority cannot starve. A
//! request that does not fit yet does not block smaller ones behind it that
//! do (backfill): capacity is never left idle while something fits.
//!
//! Granted capacity, counting leases in their grace period, never exceeds a
//! device's capacity; every grant carries a fresh fencing generation.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::GpuError;

/// Milliseconds on the scheduler's clock.
pub type Ms = u64;

/// Priority levels: 0 (lowest) to `PRIORITIES - 1` (highest).
pub const PRIORITIES: usize = 4;

/// What a holder asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// Who will hold the lease (an actor name, a task id).
    pub holder: String,
    /// Device memory, in bytes.
    pub memory: u64,
    /// Compute share, in percent of one device (1 to 100).
    pub compute: u32,
    /// 0 (lowest) to `PRIORITIES - 1`.
    pub priority: u8,
    /// The work must *start* by this time, or it is not worth doing.
    pub deadline_ms: Ms,
    /// Lease lifetime without a renewal.
    pub ttl_ms: Ms,
    /// How long the work is expected to hold the lease (for wait estimates).
    pub expected_ms: Ms,
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
    /// Priority it was granted at.
    pub priority: u8,
    /// When it was granted.
    pub granted_ms: Ms,
    /// When it ends unless renewed.
    pub expires_ms: Ms,
    /// Fencing generation: a device refuses work that presents another one.
    pub generation: u64,
    /// Set once preempted: the end of its grace period.
    pub preempt_at: Option<Ms>,
    /// Expected hold time (from the request).
    pub expected_ms: Ms,
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
}

impl Default for SchedulerConfig {
    /// 256 waiting per priority, one level per 2 s of waiting, 1 s grace,
    /// TTLs up to 10 minutes.
    fn default() -> Self {
        Self {
            queue_bound: 256,
            aging_ms: 2_000,
            grace_ms: 1_000,
            max_ttl_ms: 600_000,
        }
    }
}

#[derive(Debug, Clone)]
struct Pending {
    ticket: u64,
    req: LeaseRequest,
    enqueued_ms: Ms,
}

/// The lease table and the queues. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Scheduler {
    config: SchedulerConfig,
    devices: Vec<DeviceCapacity>,
    leases: BTreeMap<u64, Lease>,
    queues: [VecDeque<Pending>; PRIORITIES],
    next_lease: u64,
    next_generation: u64,
}

fn overloaded(retry_after: Ms, reason: impl Into<String>) -> GpuError {
    GpuError::Overloaded {
        retry_after: Duration::from_millis(retry_after.max(1)),
        reason: reason.into(),
    }
}

impl Scheduler {
    /// A scheduler over `devices`.
    pub fn new(devices: Vec<DeviceCapacity>, config: SchedulerConfig) -> Self {
        Self {
            config,
            devices,
            leases: BTreeMap::new(),
            queues: Default::default(),
            next_lease: 1,
            next_generation: 1,
        }
    }

    /// The devices.
    pub fn devices(&self) -> &[DeviceCapacity] {
        &self.devices
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

    /// Would `memory` and `compute` fit on some healthy device now?
    pub fn fits(&self, memory: u64, compute: u32) -> bool {
        self.place(memory, compute).is_some()
    }

    /// Memory and compute leased on `device` (grace periods included).
    pub fn used(&self, device: u32) -> (u64, u32) {
        self.leases
            .values()
            .filter(|l| l.device == device)
            .fold((0, 0), |(m, c), l| (m + l.memory, c + l.compute))
    }

    /// Best fit: the healthy device with room that leaves the least memory
    /// over. One pass over the leases, whatever the number of devices.
    fn place(&self, memory: u64, compute: u32) -> Option<u32> {
        let mut used: Vec<(u64, u32)> = vec![(0, 0); self.devices.len()];
        for l in self.leases.values() {
            if let Some(i) = self.devices.iter().position(|d| d.index == l.device) {
                used[i].0 += l.memory;
                used[i].1 += l.compute;
            }
        }
        self.devices
            .iter()
            .zip(used)
            .filter(|(d, (m, c))| d.healthy && m + memory <= d.memory && c + compute <= d.compute)
            .min_by_key(|(d, (m, _))| (d.memory - m - memory, d.index))
            .map(|(d, _)| d.index)
    }

    fn grant(&mut self, ticket: u64, req: LeaseRequest, device: u32, now: Ms) -> Outcome {
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
            expected_ms: req.expected_ms,
        };
        self.next_lease += 1;
        self.next_generation += 1;
        self.leases.insert(lease.id, lease.clone());
        Outcome::Granted { ticket, lease }
    }

    fn effective(&self, p: &Pending, now: Ms) -> usize {
        let aged = (now.saturating_sub(p.enqueued_ms) / self.config.aging_ms.max(1)) as usize;
        (p.req.priority as usize + aged).min(PRIORITIES - 1 + aged.min(PRIORITIES))
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

    /// Expected time until `req` could be granted: until enough of a
    /// device frees up (leases end at their expected finish, at the latest
    /// at expiry), plus the work queued ahead of it spread over the devices.
    pub fn expected_wait(&self, req: &LeaseRequest, now: Ms) -> Ms {
        let mut best = Ms::MAX;
        for d in self.devices.iter().filter(|d| d.healthy) {
            let mut ends: Vec<(Ms, u64, u32)> = self
                .leases
                .values()
                .filter(|l| l.device == d.index)
                .map(|l| {
                    let finish = l
                        .preempt_at
                        .unwrap_or((l.granted_ms + l.expected_ms).min(l.expires_ms));
                    (finish.max(now), l.memory, l.compute)
                })
                .collect();
            ends.sort_unstable();
            let (mut m, mut c) = self.used(d.index);
            if m + req.memory <= d.memory && c + req.compute <= d.compute {
                best = 0;
                break;
            }
            for (t, lm, lc) in ends {
                m -= lm;
                c -= lc;
                if m + req.memory <= d.memory && c + req.compute <= d.compute {
                    best = best.min(t - now);
                    break;
                }
            }
        }
        let healthy = self.devices.iter().filter(|d| d.healthy).count().max(1) as u64;
        let ahead: Ms = self.queues[req.priority as usize..]
            .iter()
            .flatten()
            .map(|p| p.req.expected_ms)
            .sum::<Ms>()
            / healthy;
        best.saturating_add(ahead)
    }

    /// Marks lower-priority leases for preemption until `req` would fit on
    /// one device. Returns the notices (none if preemption cannot help).
    fn preempt_for(&mut self, req: &LeaseRequest, now: Ms) -> Vec<Outcome> {
        let mut plan: Option<(u32, Vec<u64>)> = None;
        for d in self.devices.iter().filter(|d| d.healthy) {
            let (mut m, mut c) = self.used(d.index);
            let mut victims: Vec<&Lease> = self
                .leases
                .values()
                .filter(|l| {
                    l.device == d.index && l.preempt_at.is_none() && l.priority < req.priority
                })
                .collect();
            // Evict the lowest priority, then the youngest, first.
            victims.sort_by_key(|l| (l.priority, std::cmp::Reverse(l.granted_ms)));
            let mut chosen = Vec::new();
            for v in victims {
                if m + req.memory <= d.memory && c + req.compute <= d.compute {
                    break;
                }
                m -= v.memory;
                c -= v.compute;
                chosen.push(v.id);
            }
            if m + req.memory <= d.memory
                && c + req.compute <= d.compute
                && plan.as_ref().is_none_or(|(_, p)| chosen.len() < p.len())
            {
                plan = Some((d.index, chosen));
            }
        }
        let Some((_, victims)) = plan else {
            return Vec::new();
        };
        let grace_until = now + self.config.grace_ms;
        victims
            .into_iter()
            .filter_map(|id| {
                let l = self.leases.get_mut(&id)?;
                l.preempt_at = Some(grace_until.min(l.expires_ms));
                Some(Outcome::PreemptNotice {
                    lease: l.clone(),
                    grace_until: grace_until.min(l.expires_ms),
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
        let p = req.priority as usize;
        let nobody_ahead = self.queues[p..].iter().all(VecDeque::is_empty);
        if nobody_ahead && let Some(device) = self.place(req.memory, req.compute) {
            return vec![self.grant(ticket, req, device, now)];
        }
        if self.queues[p].len() >= self.config.queue_bound {
            let wait = self.expected_wait(&req, now);
            return vec![Outcome::Refused {
                ticket,
                error: overloaded(
                    wait,
                    format!("priority {p} queue is full ({})", self.config.queue_bound),
                ),
            }];
        }
        let mut out = Vec::new();
        let already_preempting = self.leases.values().any(|l| l.preempt_at.is_some());
        if !already_preempting || self.expected_wait(&req, now) > self.config.grace_ms {
            out = self.preempt_for(&req, now);
        }
        let wait = self.expected_wait(&req, now);
        if now.saturating_add(wait) > req.deadline_ms {
            // Even preempting cannot serve it in time: take the preemption
            // back (nobody was told yet) and refuse.
            for o in out.drain(..) {
                if let Outcome::PreemptNotice { lease, .. } = o
                    && let Some(l) = self.leases.get_mut(&lease.id)
                {
                    l.preempt_at = None;
                }
            }
            out.push(Outcome::Refused {
                ticket,
                error: overloaded(
                    wait,
                    format!("expected wait {wait} ms exceeds the deadline"),
                ),
            });
            return out;
        }
        self.queues[p].push_back(Pending {
            ticket,
            req,
            enqueued_ms: now,
        });
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
        self.leases
            .remove(&id)
            .map(|lease| Outcome::Ended { lease, reason })
    }

    /// Releases a lease; waiting requests may be granted.
    pub fn release(&mut self, id: u64, now: Ms) -> Result<Vec<Outcome>, GpuError> {
        let ended = self
            .end(id, EndReason::Released)
            .ok_or(GpuError::UnknownLease(id))?;
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

    /// Advances time: ends expired leases and finished grace periods, drops
    /// requests past their deadline, then grants what now fits.
    pub fn tick(&mut self, now: Ms) -> Vec<Outcome> {
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
        for q in &mut self.queues {
            q.retain(|p| {
                if p.req.deadline_ms <= now {
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
        out.extend(self.schedule(now));
        out
    }

    /// Grants waiting requests that fit, by effective priority (backfilling
    /// smaller ones past a head that does not fit yet).
    pub fn schedule(&mut self, now: Ms) -> Vec<Outcome> {
        let mut out = Vec::new();
        loop {
            // Candidates by effective priority (desc), then arrival.
            let mut order: Vec<(usize, Ms, usize, usize)> = Vec::new();
            for (p, q) in self.queues.iter().enumerate() {
                for (i, w) in q.iter().enumerate() {
                    order.push((self.effective(w, now), w.enqueued_ms, p, i));
                }
            }
            if order.is_empty() {
                break;
            }
            order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let mut granted = false;
            for &(_, _, p, i) in &order {
                let w = &self.queues[p][i];
                if let Some(device) = self.place(w.req.memory, w.req.compute) {
                    let w = self.queues[p].remove(i).expect("index from this scan");
                    out.push(self.grant(w.ticket, w.req, device, now));
                    granted = true;
                    break;
                }
            }
            if !granted {
                // The head waits; make room for it if lower priority holds it.
                let (_, _, p, i) = order[0];
                let head = self.queues[p][i].req.clone();
                if !self.leases.values().any(|l| l.preempt_at.is_some()) {
                    out.extend(self.preempt_for(&head, now));
                }
                break;
            }
        }
        out
    }

    /// Rebuilds a scheduler from journaled leases (after a restart): the
    /// leases stand until released or expired; ids and generations continue
    /// past the highest seen, so nothing is granted twice.
    pub fn recover(
        devices: Vec<DeviceCapacity>,
        config: SchedulerConfig,
        leases: Vec<Lease>,
        next_lease: u64,
        next_generation: u64,
    ) -> Self {
        let mut s = Self::new(devices, config);
        for l in leases {
            s.next_lease = s.next_lease.max(l.id + 1);
            s.next_generation = s.next_generation.max(l.generation + 1);
            s.leases.insert(l.id, l);
        }
        s.next_lease = s.next_lease.max(next_lease);
        s.next_generation = s.next_generation.max(next_generation);
        s
    }

    /// Next lease id and generation (journaled so a restart continues them).
    pub fn counters(&self) -> (u64, u64) {
        (self.next_lease, self.next_generation)
    }
}

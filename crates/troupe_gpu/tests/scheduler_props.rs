//! Properties of the lease scheduler over random histories of requests,
//! renewals, releases, time, holder deaths, device failures and restarts.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use troupe_gpu::GpuError;
use troupe_gpu::scheduler::*;

const GB: u64 = 1 << 30;

#[derive(Debug, Clone)]
enum Op {
    Request {
        holder: u8,
        mem: u8,
        compute: u8,
        priority: u8,
        deadline: u16,
        ttl: u16,
        estimate: Option<u16>,
        kind: u8,
    },
    Release {
        pick: u16,
    },
    Renew {
        pick: u16,
        stale: bool,
    },
    Advance {
        ms: u16,
    },
    HolderGone {
        holder: u8,
    },
    DeviceFailed {
        device: u8,
    },
    DeviceRecovered {
        device: u8,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..6u8, 1..16u8, 0..=100u8, 0..4u8, 1..5000u16, 50..3000u16, prop::option::of(10..2000u16), 0..2u8).prop_map(
            |(holder, mem, compute, priority, deadline, ttl, estimate, kind)| Op::Request { holder, mem, compute, priority, deadline, ttl, estimate, kind }),
        3 => any::<u16>().prop_map(|pick| Op::Release { pick }),
        2 => (any::<u16>(), any::<bool>()).prop_map(|(pick, stale)| Op::Renew { pick, stale }),
        4 => (1..1500u16).prop_map(|ms| Op::Advance { ms }),
        1 => (0..6u8).prop_map(|holder| Op::HolderGone { holder }),
        1 => (0..3u8).prop_map(|device| Op::DeviceFailed { device }),
        1 => (0..3u8).prop_map(|device| Op::DeviceRecovered { device }),
        1 => Just(Op::Restart),
    ]
}

fn devices() -> Vec<DeviceCapacity> {
    (0..3)
        .map(|i| DeviceCapacity {
            index: i,
            memory: 16 * GB,
            compute: 100,
            healthy: true,
        })
        .collect()
}

struct Run {
    s: Scheduler,
    now: Ms,
    /// ticket -> final outcome count
    finals: BTreeMap<u64, u32>,
    waiting: BTreeSet<u64>,
    dead: BTreeSet<String>,
    ended_generations: Vec<(u32, u64, u64)>,
    /// ticket -> (deadline, the high run-time quantile it was admitted on)
    admitted_on: BTreeMap<u64, (Ms, Ms)>,
}

impl Run {
    fn apply(&mut self, outcomes: Vec<Outcome>) {
        for o in outcomes {
            match o {
                Outcome::Granted { ticket, lease } => {
                    *self.finals.entry(ticket).or_default() += 1;
                    self.waiting.remove(&ticket);
                    let (deadline, high) = self.admitted_on[&ticket];
                    assert!(
                        lease.granted_ms + high <= deadline,
                        "ticket {ticket} granted at {} with {high} ms to run, past its deadline {deadline}",
                        lease.granted_ms
                    );
                    assert!(
                        !self.dead.contains(&lease.holder),
                        "granted to a dead holder"
                    );
                }
                Outcome::Refused { ticket, .. } => {
                    *self.finals.entry(ticket).or_default() += 1;
                    self.waiting.remove(&ticket);
                }
                Outcome::Ended { lease, .. } => {
                    self.ended_generations
                        .push((lease.device, lease.id, lease.generation))
                }
                Outcome::PreemptNotice { .. } => {}
            }
        }
    }

    fn check(&self) {
        for d in self.s.devices() {
            let (m, c) = self.s.used(d.index);
            assert!(
                m <= d.memory && c <= d.compute,
                "device {} over-granted: {m} bytes, {c}%",
                d.index
            );
        }
        for l in self.s.leases() {
            assert!(
                l.expires_ms > self.now || l.preempt_at.is_some_and(|p| p > self.now),
                "lease {} outlived its TTL",
                l.id
            );
            assert!(
                !self.dead.contains(&l.holder),
                "lease {} outlived its dead holder",
                l.id
            );
            assert!(self.s.check_fence(l.device, l.id, l.generation).is_ok());
            assert!(
                self.s
                    .check_fence(l.device, l.id, l.generation + 1)
                    .is_err()
            );
            let healthy = self
                .s
                .devices()
                .iter()
                .any(|d| d.index == l.device && d.healthy);
            assert!(healthy, "lease {} on a failed device", l.id);
        }
        for (device, id, generation) in &self.ended_generations {
            assert!(
                matches!(
                    self.s.check_fence(*device, *id, *generation),
                    Err(GpuError::StaleGeneration { .. })
                ),
                "an ended lease still passes the fence"
            );
        }
        // Capacity is not left idle: a request waits although it fits only
        // while another, ahead of it, does not fit (backfill is withheld
        // for a head near its latest start).
        let waiting: Vec<&LeaseRequest> = self.s.waiting().map(|(r, _)| r).collect();
        for req in &waiting {
            if self.s.fits(req.memory, req.compute) {
                assert!(
                    waiting.iter().any(|o| !self.s.fits(o.memory, o.compute)),
                    "{} waits although it fits, and nothing ahead waits",
                    req.holder
                );
            }
        }
        // What waits can still finish in time on what it was admitted on.
        for (ticket, req, p) in self.s.admitted_on() {
            assert!(
                self.now + p.high_ms <= req.deadline_ms,
                "ticket {ticket} still waits although it can no longer finish by {}",
                req.deadline_ms
            );
        }
        for (t, n) in &self.finals {
            assert_eq!(*n, 1, "ticket {t} has {n} outcomes");
        }
    }
}

fn run(ops: Vec<Op>) {
    let config = SchedulerConfig {
        queue_bound: 8,
        aging_ms: 500,
        grace_ms: 200,
        max_ttl_ms: 10_000,
        min_samples: 4,
        ..SchedulerConfig::default()
    };
    let mut r = Run {
        s: Scheduler::new(devices(), config),
        now: 0,
        finals: BTreeMap::new(),
        waiting: BTreeSet::new(),
        dead: BTreeSet::new(),
        ended_generations: Vec::new(),
        admitted_on: BTreeMap::new(),
    };
    let mut ticket = 0u64;
    for op in ops {
        match op {
            Op::Request {
                holder,
                mem,
                compute,
                priority,
                deadline,
                ttl,
                estimate,
                kind,
            } => {
                let holder = format!("h{holder}");
                r.dead.remove(&holder); // a new holder by that name
                ticket += 1;
                r.waiting.insert(ticket);
                let req = LeaseRequest {
                    holder,
                    memory: mem as u64 * GB,
                    compute: compute as u32,
                    priority,
                    deadline_ms: r.now + deadline as u64,
                    ttl_ms: ttl as u64,
                    estimate_ms: estimate.map(u64::from),
                    kind: format!("k{kind}"),
                    ..LeaseRequest::default()
                };
                let p = r.s.predict(&req);
                r.admitted_on.insert(ticket, (req.deadline_ms, p.high_ms));
                let out = r.s.request(ticket, req, r.now);
                r.apply(out);
            }
            Op::Release { pick } => {
                let ids: Vec<u64> = r.s.leases().map(|l| l.id).collect();
                if !ids.is_empty() {
                    let out =
                        r.s.release(ids[pick as usize % ids.len()], r.now)
                            .expect("known lease");
                    r.apply(out);
                }
            }
            Op::Renew { pick, stale } => {
                let leases: Vec<(u64, u64)> = r.s.leases().map(|l| (l.id, l.generation)).collect();
                if !leases.is_empty() {
                    let (id, generation) = leases[pick as usize % leases.len()];
                    let res = r.s.renew(
                        id,
                        if stale { generation + 7 } else { generation },
                        1000,
                        r.now,
                    );
                    assert_eq!(
                        res.is_ok(),
                        !stale,
                        "renewal with a {} generation",
                        if stale { "stale" } else { "current" }
                    );
                }
            }
            Op::Advance { ms } => {
                r.now += ms as u64;
                let out = r.s.tick(r.now);
                r.apply(out);
            }
            Op::HolderGone { holder } => {
                let holder = format!("h{holder}");
                let out = r.s.holder_gone(&holder, r.now);
                r.dead.insert(holder);
                r.apply(out);
            }
            Op::DeviceFailed { device } => {
                let out = r.s.device_failed(device as u32, r.now);
                r.apply(out);
            }
            Op::DeviceRecovered { device } => {
                let out = r.s.device_recovered(device as u32, r.now);
                r.apply(out);
            }
            Op::Restart => {
                // Queued requests die with the process (their callers see an error).
                for t in std::mem::take(&mut r.waiting) {
                    *r.finals.entry(t).or_default() += 1;
                }
                let leases: Vec<Lease> = r.s.leases().cloned().collect();
                let (next_lease, next_generation) = r.s.counters();
                let devs = r.s.devices().to_vec();
                // What a restarted supervisor does with holders still alive:
                // their leases re-registered, what was learned kept.
                let learned = r.s.run_times().clone();
                r.s = Scheduler::recover(devs, config, leases, next_lease, next_generation)
                    .with_run_times(learned);
            }
        }
        r.check();
    }
    // Let every deadline and TTL pass: nothing may stay stuck.
    r.now += 20_000;
    let out = r.s.tick(r.now);
    r.apply(out);
    r.check();
    assert!(
        r.waiting.is_empty(),
        "requests stuck forever: {:?}",
        r.waiting
    );
    assert_eq!(r.s.queued(), [0; PRIORITIES]);
    assert_eq!(r.s.leases().count(), 0, "leases outlived their TTL");
    assert_eq!(r.finals.len() as u64, ticket, "a request got no outcome");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn capacity_is_never_over_granted_and_every_request_ends(ops in prop::collection::vec(op(), 1..80)) {
        run(ops);
    }
}

fn req(holder: &str, gb: u64, priority: u8, now: Ms) -> LeaseRequest {
    LeaseRequest {
        holder: holder.into(),
        memory: gb * GB,
        compute: 10,
        priority,
        deadline_ms: now + 60_000,
        ttl_ms: 10_000,
        estimate_ms: Some(1_000),
        ..LeaseRequest::default()
    }
}

/// One healthy 16 GB device.
fn one_gpu(config: SchedulerConfig) -> Scheduler {
    Scheduler::new(
        vec![DeviceCapacity {
            index: 0,
            memory: 16 * GB,
            compute: 100,
            healthy: true,
        }],
        config,
    )
}

fn granted(out: &[Outcome]) -> Vec<u64> {
    out.iter()
        .filter_map(|o| match o {
            Outcome::Granted { ticket, .. } => Some(*ticket),
            _ => None,
        })
        .collect()
}

#[test]
fn higher_priority_is_served_first_and_aging_lifts_the_low() {
    let config = SchedulerConfig {
        aging_ms: 1_000,
        ..SchedulerConfig::default()
    };
    let mut s = one_gpu(config);
    let hog = granted(&s.request(1, req("hog", 16, 3, 0), 0));
    assert_eq!(hog, [1]);
    assert!(granted(&s.request(2, req("low", 16, 0, 0), 0)).is_empty());
    assert!(granted(&s.request(3, req("high", 16, 2, 0), 0)).is_empty());
    let lease = s.leases().next().expect("hog").id;
    assert_eq!(
        granted(&s.release(lease, 10).expect("release")),
        [3],
        "high priority first"
    );
    // The low one has waited ~5 s (5 levels at one per second); a
    // priority-2 request arriving now is behind it.
    let lease = s.leases().next().expect("high").id;
    assert!(granted(&s.request(4, req("high2", 16, 2, 4_900), 4_900)).is_empty());
    assert_eq!(
        granted(&s.release(lease, 5_000).expect("release")),
        [2],
        "the aged low-priority request goes first"
    );
}

#[test]
fn a_request_that_cannot_start_by_its_deadline_is_refused_at_once() {
    let mut s = one_gpu(SchedulerConfig::default());
    let mut long = req("a", 16, 3, 0);
    long.estimate_ms = Some(5_000);
    assert_eq!(granted(&s.request(1, long, 0)), [1]);
    // It could run in time alone (1.5 s at the cold rule), not after the
    // running lease, and there is nobody it may preempt.
    let mut hurried = req("b", 8, 3, 0);
    hurried.deadline_ms = 3_000;
    match s.request(2, hurried, 0).as_slice() {
        [
            Outcome::Refused {
                error: GpuError::Overloaded { retry_after, .. },
                ..
            },
        ] => {
            assert!(
                retry_after.as_millis() >= 4_000,
                "retry hint {retry_after:?} ignores the running lease"
            )
        }
        other => panic!("expected an early refusal, got {other:?}"),
    }
}

#[test]
fn preemption_gives_notice_and_grace_then_grants_the_higher_priority() {
    let config = SchedulerConfig {
        grace_ms: 500,
        ..SchedulerConfig::default()
    };
    let mut s = one_gpu(config);
    let batch = LeaseRequest {
        estimate_ms: Some(20_000),
        ..req("batch", 12, 0, 0)
    };
    assert_eq!(granted(&s.request(1, batch, 0)), [1]);
    // Waiting for the batch would miss its deadline; the grace would not.
    let interactive = LeaseRequest {
        deadline_ms: 2_200,
        ..req("interactive", 8, 3, 0)
    };
    let out = s.request(2, interactive, 0);
    assert!(
        matches!(
            out.as_slice(),
            [Outcome::PreemptNotice {
                grace_until: 500,
                ..
            }]
        ),
        "{out:?}"
    );
    // During the grace period the capacity is still held: no over-grant.
    assert!(granted(&s.tick(499)).is_empty());
    let out = s.tick(500);
    assert!(out.iter().any(|o| matches!(
        o,
        Outcome::Ended {
            reason: EndReason::Preempted,
            ..
        }
    )));
    assert_eq!(granted(&out), [2]);
}

#[test]
fn a_request_refused_anyway_evicts_nobody() {
    let config = SchedulerConfig {
        grace_ms: 500,
        ..SchedulerConfig::default()
    };
    let mut s = one_gpu(config);
    let batch = LeaseRequest {
        estimate_ms: Some(20_000),
        ..req("batch", 12, 0, 0)
    };
    assert_eq!(granted(&s.request(1, batch, 0)), [1]);
    // Priority 3 could preempt, but the grace alone outlasts its deadline.
    let hurried = LeaseRequest {
        deadline_ms: 100,
        estimate_ms: Some(50),
        ..req("interactive", 8, 3, 0)
    };
    let out = s.request(2, hurried, 0);
    assert!(
        matches!(out.as_slice(), [Outcome::Refused { .. }]),
        "refused without preempting: {out:?}"
    );
    assert_eq!(s.lease(1).and_then(|l| l.preempt_at), None);
    assert!(s.tick(1_000).is_empty(), "the batch lease runs on");
    // One that can wait for the grace (and not for the batch) does preempt.
    let patient = LeaseRequest {
        deadline_ms: 3_200,
        ..req("interactive", 8, 3, 1_000)
    };
    let out = s.request(3, patient, 1_000);
    assert!(
        matches!(out.as_slice(), [Outcome::PreemptNotice { .. }]),
        "{out:?}"
    );
}

#[test]
fn run_times_are_learned_from_released_leases_and_estimates_are_not_trusted() {
    let config = SchedulerConfig {
        min_samples: 8,
        cold_factor: 1.5,
        ..SchedulerConfig::default()
    };
    let mut s = one_gpu(config);
    // Cold: an estimate of 1 s is taken at 1.5x (as configured).
    let ask = |deadline| LeaseRequest {
        kind: "summarize".into(),
        deadline_ms: deadline,
        ..req("a", 1, 1, 0)
    };
    assert_eq!(s.predict(&ask(0)).high_ms, 1_500);
    // This kind's estimates are half its real run times.
    let mut now = 0;
    for t in 0..40 {
        let out = s.request(
            t,
            LeaseRequest {
                deadline_ms: now + 60_000,
                ..ask(0)
            },
            now,
        );
        let lease = match out.as_slice() {
            [Outcome::Granted { lease, .. }] => lease.id,
            other => panic!("{other:?}"),
        };
        now += 2_000;
        s.release(lease, now).expect("release");
    }
    let p = s.predict(&ask(0));
    assert!(p.learned);
    assert!((1_900..=2_200).contains(&p.mean_ms), "{p:?}");
    assert!((2_000..=2_300).contains(&p.high_ms), "{p:?}");
    // 1.8 s is enough at the cold rule, not on what was learned.
    let out = s.request(100, ask(now + 1_800), now);
    assert!(
        matches!(
            out.as_slice(),
            [Outcome::Refused {
                error: GpuError::Overloaded { .. },
                ..
            }]
        ),
        "{out:?}"
    );
    // Another kind is still cold.
    let other = LeaseRequest {
        kind: "embed".into(),
        ..ask(0)
    };
    assert!(!s.predict(&other).learned);
}

#[test]
fn a_kind_refused_on_what_it_learned_is_tried_again_once_that_is_forgotten() {
    let config = SchedulerConfig {
        min_samples: 8,
        forget_ms: 60_000,
        ..SchedulerConfig::default()
    };
    let mut s = one_gpu(config);
    let ask = |deadline| LeaseRequest {
        kind: "summarize".into(),
        deadline_ms: deadline,
        ..req("a", 1, 1, 0)
    };
    // A slow spell: the 1 s estimate took 4 s, 10 times.
    let mut now = 0;
    for t in 0..10 {
        let out = s.request(t, ask(now + 60_000), now);
        let [Outcome::Granted { lease, .. }] = out.as_slice() else {
            panic!("{out:?}")
        };
        let id = lease.id;
        now += 4_000;
        s.release(id, now).expect("release");
    }
    let last = now;
    // Callers now give it 2 s: refused on what was learned, with a hint
    // that says when that is forgotten (not the run time, which no retry
    // with the same budget can beat).
    now += 10_000;
    match s.request(100, ask(now + 2_000), now).as_slice() {
        [
            Outcome::Refused {
                error: GpuError::Overloaded { retry_after, .. },
                ..
            },
        ] => assert_eq!(retry_after.as_millis() as u64, last + 60_000 - now),
        other => panic!("{other:?}"),
    }
    // Nothing of its kind finishes meanwhile (every request is refused);
    // once what was learned is stale, it is admitted on its estimate again.
    now = last + 60_000;
    let out = s.request(101, ask(now + 2_000), now);
    let [Outcome::Granted { lease, .. }] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert!(!s.predict(&ask(0)).learned);
    // What it learns from now on starts afresh: one fast run is not yet
    // enough to be learned (min_samples), the old slow spell is gone.
    let id = lease.id;
    now += 900;
    s.release(id, now).expect("release");
    assert!(!s.predict(&ask(0)).learned);
    // A request whose own estimate is longer than its own deadline can
    // never be served: a typed error, not a retry hint.
    let hopeless = LeaseRequest {
        estimate_ms: Some(5_000),
        ..ask(now + 2_000)
    };
    match s.request(102, hopeless, now).as_slice() {
        [
            Outcome::Refused {
                error: GpuError::Invalid(message),
                ..
            },
        ] => assert!(message.contains("later deadline"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn preemption_only_when_it_pays_and_on_aged_ranks() {
    let config = SchedulerConfig {
        grace_ms: 100,
        aging_ms: 1_000,
        ..SchedulerConfig::default()
    };
    let long = |holder: &str, gb, priority, now| LeaseRequest {
        estimate_ms: Some(20_000),
        ..req(holder, gb, priority, now)
    };
    let hurried = |holder: &str, gb, priority, now: Ms| LeaseRequest {
        deadline_ms: now + 3_000,
        ..req(holder, gb, priority, now)
    };
    // One priority-0 lease fills the device: priority 1 (weight 4) and 2
    // (16) do not throw it away (weight 1, times the required gain of 16);
    // priority 3 (64) does.
    let mut s = one_gpu(config);
    assert_eq!(granted(&s.request(0, long("b0", 16, 0, 0), 0)), [0]);
    for (t, p) in [(10, 1), (11, 2)] {
        let out = s.request(t, hurried("p", 16, p, 0), 0);
        assert!(
            matches!(out.as_slice(), [Outcome::Refused { .. }]),
            "{p}: {out:?}"
        );
    }
    let out = s.request(12, hurried("p3", 16, 3, 0), 0);
    assert!(
        matches!(out.as_slice(), [Outcome::PreemptNotice { .. }]),
        "{out:?}"
    );
    // Two priority-0 leases are more than a priority-3 request may throw
    // away (2 x 16 = 32 < 64 would do; four would not).
    let mut s = one_gpu(config);
    for t in 0..4 {
        assert_eq!(
            granted(&s.request(t, long(&format!("b{t}"), 4, 0, 0), 0)),
            [t]
        );
    }
    let out = s.request(12, hurried("p3", 16, 3, 0), 0);
    assert!(
        matches!(out.as_slice(), [Outcome::Refused { .. }]),
        "{out:?}"
    );

    // A request that aged from priority 0 to rank 3 before its grant is
    // not preempted by a priority-2 one.
    let mut s = one_gpu(config);
    assert_eq!(granted(&s.request(1, long("hog", 16, 3, 0), 0)), [1]);
    assert!(granted(&s.request(2, long("patient", 16, 0, 0), 0)).is_empty());
    let hog = s.leases().next().expect("hog").id;
    let out = s.release(hog, 3_500).expect("release");
    let lease = out
        .iter()
        .find_map(|o| match o {
            Outcome::Granted { lease, .. } => Some(lease.clone()),
            _ => None,
        })
        .expect("patient granted");
    assert_eq!((lease.priority, lease.rank), (0, 3));
    let out = s.request(3, hurried("p2", 16, 2, 3_500), 3_500);
    assert!(
        matches!(out.as_slice(), [Outcome::Refused { .. }]),
        "aged rank preempted: {out:?}"
    );
}

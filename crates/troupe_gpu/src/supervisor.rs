//! The [`GpuSupervisor`] actor: the scheduler, a clock, device health, a
//! journal, and notices to lease holders.
//!
//! - Requests and releases go through a bounded inbox that the actor drains
//!   whole: it decides everything waiting in memory, journals the batch in
//!   **one append**, and answers after it commits. Nobody is told anything
//!   that is not journaled.
//! - Leases of holders in this process ([`LeaseRequest::durable`] false,
//!   what [`GpuSupervisorHandle::acquire`] callers in the process use) are
//!   not journaled one by one: a crash of the process ends their holders
//!   too. What is journaled is a *high-water mark* of lease ids and fencing
//!   generations, one per block of [`GpuConfig::reserve_block`] grants, so a
//!   supervisor restarted after a crash never reissues an id or generation.
//!   A supervisor restarted *inside* a running process finds the leases its
//!   predecessor granted in the handle's registry of live leases (with
//!   their holders and notice channels): it sees all capacity still held.
//! - Durable leases (holders elsewhere) have every grant, renewal,
//!   preemption and end journaled (under `gpu/leases`); a restarted
//!   supervisor replays them and lets those whose holders are gone run out
//!   at their TTL.
//! - One [device actor](crate::device) per GPU, linked to the supervisor
//!   (and restarted by it), polls its probe every `poll_interval`, exports
//!   the device's metrics and reports each reading; a reading that fails
//!   marks the device unhealthy (its leases are revoked and their holders
//!   told), a good one heals it. A field the device refuses to report is
//!   unknown, not a failure. Device actors admit work only under a current
//!   lease and fencing generation ([`GpuSupervisorHandle::admit`]).
//! - Holders that pass their actor cell are watched: when the actor stops,
//!   its leases end at the next tick. A caller that gave up before its
//!   grant arrived has the lease released at once.
//! - Time comes from a [`Clock`]: the wall clock, or Tokio's (so a test or
//!   simulation on a paused runtime drives the real supervisor in virtual
//!   time).
//!
//! Use the journal's durability to choose what a batch costs: with `Fsync`
//! each batch waits for a disk sync; with `Buffered` it survives a process
//! crash.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use ractor::{ActorCell, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use troupe_journal::{Journal, NewEvent, NewSnapshot, PersistenceId, Schema, now_ms};

use crate::device::{DeviceActor, DeviceArgs, DeviceMsg, FenceTable};
use crate::error::GpuError;
use crate::probe::{DeviceSample, GpuProbe};
use crate::scheduler::{
    DeviceCapacity, EndReason, Lease, LeaseRequest, Ms, Outcome, PRIORITIES, Scheduler,
    SchedulerConfig,
};

/// What the lease journal records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LeaseEvent {
    /// A durable lease was granted.
    Granted(Lease),
    /// A durable lease was renewed until `expires_ms`.
    Renewed {
        /// Lease id.
        id: u64,
        /// New expiry.
        expires_ms: Ms,
    },
    /// A durable lease must end by `at`.
    Preempting {
        /// Lease id.
        id: u64,
        /// End of grace.
        at: Ms,
    },
    /// A durable lease ended.
    Ended {
        /// Lease id.
        id: u64,
        /// Why.
        reason: EndReason,
    },
    /// Lease ids and generations below these may have been issued (to
    /// holders in the process, not journaled one by one): a recovered
    /// supervisor continues from here.
    Reserved {
        /// Lease ids below this may be in use.
        next_lease: u64,
        /// Generations below this may be in use.
        next_generation: u64,
    },
}

impl Schema for LeaseEvent {
    const TYPE_NAME: &'static str = "gpu.LeaseEvent";
}

/// Snapshot of the lease table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LeaseTable {
    leases: Vec<Lease>,
    next_lease: u64,
    next_generation: u64,
}

impl Schema for LeaseTable {
    const TYPE_NAME: &'static str = "gpu.LeaseTable";
}

/// Something a holder is told about its lease.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseNotice {
    /// Finish and release by `grace_until` (ms on the supervisor's clock).
    Preempt {
        /// Lease id.
        lease: u64,
        /// Deadline.
        grace_until: Ms,
    },
    /// The lease ended without the holder releasing it.
    Ended {
        /// Lease id.
        lease: u64,
        /// Why.
        reason: EndReason,
    },
}

/// Where the supervisor's time comes from.
#[derive(Debug, Clone, Copy, Default)]
pub enum Clock {
    /// Milliseconds since the Unix epoch (what callers get from
    /// `troupe_journal::now_ms`).
    #[default]
    Wall,
    /// Tokio's clock, from `base_ms` at `start`: follows a paused runtime's
    /// virtual time (tests, simulations).
    Tokio {
        /// The reading at `start`.
        base_ms: Ms,
        /// When it read `base_ms`.
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// Tokio's clock, starting at the wall clock's reading now.
    pub fn tokio() -> Self {
        Self::Tokio {
            base_ms: now_ms(),
            start: tokio::time::Instant::now(),
        }
    }

    /// The time now, in ms.
    pub fn now_ms(&self) -> Ms {
        match self {
            Clock::Wall => now_ms(),
            Clock::Tokio { base_ms, start } => base_ms + start.elapsed().as_millis() as Ms,
        }
    }
}

/// Settings of a [`GpuSupervisor`].
#[derive(Clone)]
pub struct GpuConfig {
    /// Scheduler bounds and timings.
    pub scheduler: SchedulerConfig,
    /// How often devices are read.
    pub poll_interval: Duration,
    /// How often expiries, grace periods, deadlines and holders are checked.
    pub tick_interval: Duration,
    /// Snapshot the lease table every this many journaled events.
    pub snapshot_every: u64,
    /// Most requests and releases waiting in the inbox; past it, requests
    /// are refused with `Overloaded`.
    pub inbox_bound: usize,
    /// Ids and generations reserved per journaled high-water mark.
    pub reserve_block: u64,
    /// Where time comes from.
    pub clock: Clock,
}

impl Default for GpuConfig {
    /// Devices read every second, ticks every 20 ms, a snapshot per 1,000
    /// events, 8,192 waiting in the inbox, blocks of 1,024 ids, wall clock.
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            poll_interval: Duration::from_secs(1),
            tick_interval: Duration::from_millis(20),
            snapshot_every: 1_000,
            inbox_bound: 8_192,
            reserve_block: 1_024,
            clock: Clock::Wall,
        }
    }
}

/// Per-device status.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuStatus {
    /// Device capacity and health.
    pub device: DeviceCapacity,
    /// Leased memory and compute.
    pub leased: (u64, u32),
    /// Last utilization reading, if the device answered and reported it.
    pub utilization_pct: Option<u32>,
    /// Fields the device refused in its last reading, and why.
    pub refused: Vec<(&'static str, String)>,
}

/// Messages of the GPU supervisor (use [`GpuSupervisorHandle`]).
pub enum GpuMsg {
    /// Decide everything waiting in the inbox.
    #[doc(hidden)]
    Drain,
    /// Extend a lease.
    Renew(u64, u64, Ms, RpcReplyPort<Result<Ms, GpuError>>),
    /// Check a fencing generation.
    Fence(u32, u64, u64, RpcReplyPort<Result<(), GpuError>>),
    /// Device status.
    Status(RpcReplyPort<Vec<GpuStatus>>),
    /// The actor of device `index`.
    Device(u32, RpcReplyPort<Option<ActorRef<DeviceMsg>>>),
    #[doc(hidden)]
    Tick,
    /// A device actor's reading (or why it failed).
    #[doc(hidden)]
    DeviceReport(u32, Result<DeviceSample, String>),
}

#[cfg(feature = "cluster")]
impl ractor::Message for GpuMsg {}

/// Arguments of the supervisor.
pub struct GpuArgs {
    /// Where devices are read.
    pub probe: Arc<dyn GpuProbe>,
    /// Where leases are journaled.
    pub journal: Arc<dyn Journal>,
    /// Settings.
    pub config: GpuConfig,
}

/// What one incarnation starts with: its arguments and what it shares with
/// the handle (the inbox, the live leases). Built by [`GpuSupervisorHandle`].
pub struct GpuStart {
    args: GpuArgs,
    shared: Arc<Shared>,
}

/// The GPU supervisor actor. See the [module docs](self).
pub struct GpuSupervisor;

enum Op {
    Request {
        req: LeaseRequest,
        holder: Option<ActorCell>,
        notices: Option<mpsc::Sender<LeaseNotice>>,
        reply: oneshot::Sender<Result<Lease, GpuError>>,
    },
    Release {
        id: u64,
        generation: u64,
        reply: oneshot::Sender<Result<(), GpuError>>,
    },
}

/// A lease granted in this process, with who holds it.
struct Live {
    lease: Lease,
    holder: Option<ActorCell>,
    notices: Option<mpsc::Sender<LeaseNotice>>,
}

/// What outlives an incarnation: the inbox, and the leases granted in this
/// process (re-registered by the next incarnation).
struct Shared {
    inbox: Mutex<VecDeque<Op>>,
    draining: AtomicBool,
    live: Mutex<HashMap<u64, Live>>,
    clock: Mutex<Clock>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn new() -> Self {
        Self {
            inbox: Mutex::new(VecDeque::new()),
            draining: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
            clock: Mutex::new(Clock::Wall),
        }
    }
}

struct Waiting {
    reply: oneshot::Sender<Result<Lease, GpuError>>,
    holder: Option<ActorCell>,
    notices: Option<mpsc::Sender<LeaseNotice>>,
}

/// State of the GPU supervisor.
pub struct GpuState {
    sched: Scheduler,
    args: GpuArgs,
    shared: Arc<Shared>,
    id: PersistenceId,
    seq: u64,
    since_snapshot: u64,
    /// Ids and generations below these are covered by a journaled mark.
    reserved: (u64, u64),
    next_ticket: u64,
    waiting: HashMap<u64, Waiting>,
    readings: HashMap<u32, DeviceSample>,
    fences: Arc<FenceTable>,
    devices: Vec<ActorRef<DeviceMsg>>,
}

fn journal_err(e: troupe_journal::JournalError) -> GpuError {
    GpuError::from(e)
}

impl GpuState {
    fn now(&self) -> Ms {
        self.args.config.clock.now_ms()
    }

    async fn persist(&mut self, events: Vec<LeaseEvent>) -> Result<(), GpuError> {
        if events.is_empty() {
            return Ok(());
        }
        let n = events.len() as u64;
        let new: Vec<NewEvent> = events
            .iter()
            .map(NewEvent::new)
            .collect::<Result<_, _>>()
            .map_err(journal_err)?;
        self.args
            .journal
            .append(&self.id, self.seq, new)
            .await
            .map_err(journal_err)?;
        metrics::counter!("troupe_gpu_journal_appends_total").increment(1);
        self.seq += n;
        self.since_snapshot += n;
        if self.since_snapshot >= self.args.config.snapshot_every {
            let table = LeaseTable {
                leases: self.sched.leases().filter(|l| l.durable).cloned().collect(),
                next_lease: self.reserved.0,
                next_generation: self.reserved.1,
            };
            if let Ok(s) = NewSnapshot::new(self.seq, &table)
                && self.args.journal.save_snapshot(&self.id, s).await.is_ok()
            {
                self.since_snapshot = 0;
                let _ = self.args.journal.delete_events_to(&self.id, self.seq).await;
            }
        }
        Ok(())
    }

    /// What the journal must hold before `outcomes` are told.
    fn events(&mut self, outcomes: &[Outcome]) -> Vec<LeaseEvent> {
        let mut events = Vec::new();
        for o in outcomes {
            match o {
                Outcome::Granted { lease, .. } => {
                    if lease.id >= self.reserved.0 || lease.generation >= self.reserved.1 {
                        let block = self.args.config.reserve_block.max(1);
                        self.reserved = (
                            self.reserved.0.max(lease.id + block),
                            self.reserved.1.max(lease.generation + block),
                        );
                        events.push(LeaseEvent::Reserved {
                            next_lease: self.reserved.0,
                            next_generation: self.reserved.1,
                        });
                    }
                    if lease.durable {
                        events.push(LeaseEvent::Granted(lease.clone()));
                    }
                }
                Outcome::PreemptNotice { lease, grace_until } if lease.durable => {
                    events.push(LeaseEvent::Preempting {
                        id: lease.id,
                        at: *grace_until,
                    });
                }
                Outcome::Ended { lease, reason } if lease.durable => {
                    events.push(LeaseEvent::Ended {
                        id: lease.id,
                        reason: *reason,
                    });
                }
                _ => {}
            }
        }
        events
    }

    /// Journals the outcomes (one append), then tells everyone concerned.
    /// A grant whose caller has gone is released at once.
    async fn settle(&mut self, mut outcomes: Vec<Outcome>) -> Result<(), ActorProcessingErr> {
        while !outcomes.is_empty() {
            let events = self.events(&outcomes);
            // Nothing is told before it is journaled; a journal failure fails
            // the supervisor, which restarts from what was journaled.
            self.persist(events).await.map_err(Box::new)?;
            let mut abandoned = Vec::new();
            for o in outcomes {
                self.tell(o, &mut abandoned);
            }
            let now = self.now();
            outcomes = Vec::new();
            for id in abandoned {
                if let Ok(out) = self.sched.release(id, now) {
                    outcomes.extend(out);
                }
            }
        }
        self.export_queues();
        Ok(())
    }

    fn tell(&mut self, o: Outcome, abandoned: &mut Vec<u64>) {
        match o {
            Outcome::Granted { ticket, lease } => {
                metrics::counter!("troupe_gpu_leases_granted_total").increment(1);
                self.fences.grant(lease.id, lease.device, lease.generation);
                if let Some(w) = self.waiting.remove(&ticket) {
                    let id = lease.id;
                    lock(&self.shared.live).insert(
                        id,
                        Live {
                            lease: lease.clone(),
                            holder: w.holder,
                            notices: w.notices,
                        },
                    );
                    if w.reply.send(Ok(lease)).is_err() {
                        abandoned.push(id);
                    }
                } else {
                    abandoned.push(lease.id);
                }
            }
            Outcome::Refused { ticket, error } => {
                metrics::counter!("troupe_gpu_requests_refused_total").increment(1);
                if let Some(w) = self.waiting.remove(&ticket) {
                    let _ = w.reply.send(Err(error));
                }
            }
            Outcome::PreemptNotice { lease, grace_until } => {
                metrics::counter!("troupe_gpu_preemptions_total").increment(1);
                if let Some(l) = lock(&self.shared.live).get_mut(&lease.id) {
                    l.lease.preempt_at = Some(grace_until);
                }
                self.notify(
                    lease.id,
                    LeaseNotice::Preempt {
                        lease: lease.id,
                        grace_until,
                    },
                );
            }
            Outcome::Ended { lease, reason } => {
                self.fences.revoke(lease.id);
                if reason != EndReason::Released {
                    self.notify(
                        lease.id,
                        LeaseNotice::Ended {
                            lease: lease.id,
                            reason,
                        },
                    );
                }
                lock(&self.shared.live).remove(&lease.id);
            }
        }
    }

    fn export_queues(&self) {
        let queued = self.sched.queued();
        for (p, n) in queued.iter().enumerate().take(PRIORITIES) {
            metrics::gauge!("troupe_gpu_pending_requests", "priority" => p.to_string())
                .set(*n as f64);
        }
    }

    fn notify(&self, lease: u64, notice: LeaseNotice) {
        if let Some(Live {
            notices: Some(tx), ..
        }) = lock(&self.shared.live).get(&lease)
            && tx.try_send(notice).is_err()
        {
            metrics::counter!("troupe_gpu_notices_dropped_total").increment(1);
        }
    }

    /// Decides everything in the inbox: one journal append for the lot.
    async fn drain(&mut self) -> Result<(), ActorProcessingErr> {
        self.shared.draining.store(false, Ordering::SeqCst);
        let ops: Vec<Op> = lock(&self.shared.inbox).drain(..).collect();
        if ops.is_empty() {
            return Ok(());
        }
        metrics::histogram!("troupe_gpu_batch_size").record(ops.len() as f64);
        let now = self.now();
        let mut out = Vec::new();
        let mut released = Vec::new();
        for op in ops {
            match op {
                Op::Request {
                    req,
                    holder,
                    notices,
                    reply,
                } => {
                    let ticket = self.next_ticket;
                    self.next_ticket += 1;
                    self.waiting.insert(
                        ticket,
                        Waiting {
                            reply,
                            holder,
                            notices,
                        },
                    );
                    out.extend(self.sched.request(ticket, req, now));
                }
                Op::Release {
                    id,
                    generation,
                    reply,
                } => {
                    let current = self.sched.lease(id).map(|l| (l.generation, l.device));
                    match current {
                        Some((g, _)) if g == generation => match self.sched.release(id, now) {
                            Ok(o) => {
                                out.extend(o);
                                released.push(reply);
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        },
                        Some((g, device)) => {
                            let _ = reply.send(Err(GpuError::StaleGeneration {
                                lease: id,
                                device,
                                presented: generation,
                                current: Some(g),
                            }));
                        }
                        None => {
                            let _ = reply.send(Err(GpuError::UnknownLease(id)));
                        }
                    }
                }
            }
        }
        self.settle(out).await?;
        for r in released {
            let _ = r.send(Ok(()));
        }
        Ok(())
    }
}

async fn recover(journal: &dyn Journal, id: &PersistenceId) -> Result<(LeaseTable, u64), GpuError> {
    let (mut table, from) = match journal.load_snapshot(id).await.map_err(journal_err)? {
        Some(s) => (s.decode::<LeaseTable>().map_err(journal_err)?, s.seq),
        None => (LeaseTable::default(), 0),
    };
    let mut leases: HashMap<u64, Lease> = table.leases.drain(..).map(|l| (l.id, l)).collect();
    let mut seq = from;
    let mut replay = journal.replay(id, from + 1, u64::MAX);
    while let Some(batch) = replay.next().await {
        for ev in batch.map_err(journal_err)? {
            seq = ev.seq;
            match ev.decode::<LeaseEvent>().map_err(journal_err)? {
                LeaseEvent::Granted(l) => {
                    table.next_lease = table.next_lease.max(l.id + 1);
                    table.next_generation = table.next_generation.max(l.generation + 1);
                    leases.insert(l.id, l);
                }
                LeaseEvent::Renewed { id, expires_ms } => {
                    if let Some(l) = leases.get_mut(&id) {
                        l.expires_ms = expires_ms;
                    }
                }
                LeaseEvent::Preempting { id, at } => {
                    if let Some(l) = leases.get_mut(&id) {
                        l.preempt_at = Some(at);
                    }
                }
                LeaseEvent::Ended { id, .. } => {
                    leases.remove(&id);
                }
                LeaseEvent::Reserved {
                    next_lease,
                    next_generation,
                } => {
                    table.next_lease = table.next_lease.max(next_lease);
                    table.next_generation = table.next_generation.max(next_generation);
                }
            }
        }
    }
    let seq = seq.max(journal.highest_seq(id).await.map_err(journal_err)?);
    table.leases = leases.into_values().collect();
    Ok((table, seq))
}

impl ractor::Actor for GpuSupervisor {
    type Msg = GpuMsg;
    type State = GpuState;
    type Arguments = GpuStart;

    async fn pre_start(
        &self,
        myself: ActorRef<GpuMsg>,
        start: GpuStart,
    ) -> Result<GpuState, ActorProcessingErr> {
        let GpuStart { args, shared } = start;
        *lock(&shared.clock) = args.config.clock;
        let devices: Vec<DeviceCapacity> = args
            .probe
            .devices()
            .map_err(Box::new)?
            .into_iter()
            .map(|d| DeviceCapacity {
                index: d.index,
                memory: d.memory_total,
                compute: 100,
                healthy: true,
            })
            .collect();
        let id = PersistenceId::parse("gpu/leases").map_err(Box::new)?;
        let (table, seq) = recover(&*args.journal, &id).await.map_err(Box::new)?;
        // Leases granted in this process by an earlier incarnation, still
        // held: they are re-registered (their holders keep their notices),
        // and they override their journaled copies.
        let mut leases: HashMap<u64, Lease> = table.leases.into_iter().map(|l| (l.id, l)).collect();
        let live: Vec<Lease> = lock(&shared.live)
            .values()
            .map(|l| l.lease.clone())
            .collect();
        let reregistered = live.len();
        for l in live {
            leases.insert(l.id, l);
        }
        tracing::info!(
            devices = devices.len(),
            probe = args.probe.kind(),
            recovered_leases = leases.len(),
            reregistered,
            "GPU supervisor started"
        );
        let sched = Scheduler::recover(
            devices,
            args.config.scheduler,
            leases.into_values().collect(),
            table.next_lease,
            table.next_generation,
        );
        myself.send_interval(args.config.tick_interval, || GpuMsg::Tick);
        let fences = Arc::new(FenceTable::default());
        for l in sched.leases() {
            fences.grant(l.id, l.device, l.generation);
        }
        Ok(GpuState {
            // Nothing at or past the counters is covered by a mark yet.
            reserved: sched.counters(),
            sched,
            args,
            shared,
            id,
            seq,
            since_snapshot: 0,
            next_ticket: 1,
            waiting: HashMap::new(),
            readings: HashMap::new(),
            fences,
            devices: Vec::new(),
        })
    }

    async fn post_start(
        &self,
        me: ActorRef<GpuMsg>,
        st: &mut GpuState,
    ) -> Result<(), ActorProcessingErr> {
        for d in st.sched.devices().to_vec() {
            let actor = spawn_device(&me, st, d.index).await?;
            st.devices.push(actor);
        }
        // Whatever reached the inbox while no incarnation ran.
        st.shared.draining.store(true, Ordering::SeqCst);
        me.cast(GpuMsg::Drain)?;
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<GpuMsg>,
        st: &mut GpuState,
    ) -> Result<(), ActorProcessingErr> {
        for d in &st.devices {
            d.stop(None);
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<GpuMsg>,
        event: ractor::SupervisionEvent,
        st: &mut GpuState,
    ) -> Result<(), ActorProcessingErr> {
        // A device actor that dies is started again; the device keeps its
        // health state in the scheduler meanwhile.
        let cell = match event {
            ractor::SupervisionEvent::ActorFailed(cell, _)
            | ractor::SupervisionEvent::ActorTerminated(cell, _, _) => cell,
            _ => return Ok(()),
        };
        if let Some(pos) = st.devices.iter().position(|d| d.get_id() == cell.get_id()) {
            let index = st.sched.devices()[pos].index;
            tracing::warn!(device = index, "device actor ended; starting it again");
            st.devices[pos] = spawn_device(&me, st, index).await?;
        }
        Ok(())
    }

    async fn handle(
        &self,
        _me: ActorRef<GpuMsg>,
        msg: GpuMsg,
        st: &mut GpuState,
    ) -> Result<(), ActorProcessingErr> {
        let now = st.now();
        match msg {
            GpuMsg::Drain => st.drain().await?,
            GpuMsg::Renew(id, generation, ttl, reply) => {
                match st.sched.renew(id, generation, ttl, now) {
                    Ok(expires_ms) => {
                        let durable = st.sched.lease(id).is_some_and(|l| l.durable);
                        if durable {
                            st.persist(vec![LeaseEvent::Renewed { id, expires_ms }])
                                .await
                                .map_err(Box::new)?;
                        }
                        if let Some(l) = lock(&st.shared.live).get_mut(&id) {
                            l.lease.expires_ms = expires_ms;
                        }
                        let _ = reply.send(Ok(expires_ms));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            GpuMsg::Fence(device, lease, generation, reply) => {
                let _ = reply.send(st.sched.check_fence(device, lease, generation));
            }
            GpuMsg::Status(reply) => {
                let status = st
                    .sched
                    .devices()
                    .iter()
                    .map(|d| {
                        let reading = st.readings.get(&d.index);
                        GpuStatus {
                            device: d.clone(),
                            leased: st.sched.used(d.index),
                            utilization_pct: reading.and_then(|r| r.utilization_pct),
                            refused: reading.map(|r| r.refused.clone()).unwrap_or_default(),
                        }
                    })
                    .collect();
                let _ = reply.send(status);
            }
            GpuMsg::Tick => {
                let gone: Vec<String> = lock(&st.shared.live)
                    .values()
                    .filter(|l| {
                        l.holder
                            .as_ref()
                            .is_some_and(|c| c.get_status() == ActorStatus::Stopped)
                    })
                    .map(|l| l.lease.holder.clone())
                    .collect();
                let mut out = Vec::new();
                for h in gone {
                    out.extend(st.sched.holder_gone(&h, now));
                }
                out.extend(st.sched.tick(now));
                st.settle(out).await?;
            }
            GpuMsg::Device(index, reply) => {
                let pos = st.sched.devices().iter().position(|d| d.index == index);
                let _ = reply.send(pos.and_then(|p| st.devices.get(p).cloned()));
            }
            GpuMsg::DeviceReport(index, report) => {
                let Some(d) = st
                    .sched
                    .devices()
                    .iter()
                    .find(|d| d.index == index)
                    .cloned()
                else {
                    return Ok(());
                };
                let out = match report {
                    Ok(sample) => {
                        st.readings.insert(index, sample);
                        if d.healthy {
                            Vec::new()
                        } else {
                            tracing::info!(device = index, "device healthy again");
                            st.sched.device_recovered(index, now)
                        }
                    }
                    Err(e) => {
                        st.readings.remove(&index);
                        if d.healthy {
                            tracing::warn!(device = index, error = %e, "device unhealthy; revoking its leases");
                            st.sched.device_failed(index, now)
                        } else {
                            Vec::new()
                        }
                    }
                };
                st.settle(out).await?;
            }
        }
        Ok(())
    }
}

async fn spawn_device(
    me: &ActorRef<GpuMsg>,
    st: &GpuState,
    index: u32,
) -> Result<ActorRef<DeviceMsg>, ActorProcessingErr> {
    let args = DeviceArgs {
        index,
        probe: st.args.probe.clone(),
        supervisor: me.clone(),
        poll_interval: st.args.config.poll_interval,
        fences: st.fences.clone(),
    };
    let (actor, _) = ractor::Actor::spawn_linked(None, DeviceActor, args, me.get_cell()).await?;
    Ok(actor)
}

/// A handle on a [`GpuSupervisor`]. Cheap to clone; it stays valid across
/// restarts when the supervisor runs under a Troupe supervisor
/// ([`GpuSupervisorHandle::child`]): requests made while it restarts wait
/// in the inbox for the next incarnation, other calls fail with
/// [`GpuError::Unavailable`], which is transient.
#[derive(Clone)]
pub struct GpuSupervisorHandle {
    actor: Arc<arc_swap::ArcSwapOption<ActorRef<GpuMsg>>>,
    shared: Arc<Shared>,
    inbox_bound: Arc<std::sync::atomic::AtomicUsize>,
}

fn unavailable<T>(
    r: Result<ractor::rpc::CallResult<T>, ractor::MessagingErr<GpuMsg>>,
) -> Result<T, GpuError> {
    match r {
        Ok(ractor::rpc::CallResult::Success(v)) => Ok(v),
        _ => Err(GpuError::Unavailable),
    }
}

impl GpuSupervisorHandle {
    fn empty() -> Self {
        Self {
            actor: Arc::new(arc_swap::ArcSwapOption::empty()),
            shared: Arc::new(Shared::new()),
            inbox_bound: Arc::new(std::sync::atomic::AtomicUsize::new(
                GpuConfig::default().inbox_bound,
            )),
        }
    }

    /// Spawns a supervisor (linked to `parent` if given). Nothing restarts
    /// it: prefer [`GpuSupervisorHandle::child`] under a supervisor.
    pub async fn spawn(args: GpuArgs, parent: Option<ActorCell>) -> Result<Self, GpuError> {
        let handle = Self::empty();
        handle.start(args, parent).await?;
        Ok(handle)
    }

    async fn start(&self, args: GpuArgs, parent: Option<ActorCell>) -> Result<ActorCell, GpuError> {
        self.inbox_bound
            .store(args.config.inbox_bound.max(1), Ordering::Relaxed);
        let start = GpuStart {
            args,
            shared: self.shared.clone(),
        };
        let spawned = match parent {
            Some(p) => ractor::Actor::spawn_linked(None, GpuSupervisor, start, p).await,
            None => ractor::Actor::spawn(None, GpuSupervisor, start).await,
        };
        let (actor, _) = spawned.map_err(|e| GpuError::Start(e.to_string()))?;
        let cell = actor.get_cell();
        self.actor.store(Some(Arc::new(actor)));
        Ok(cell)
    }

    /// The supervisor as a child of a Troupe supervisor, restarted (with
    /// its lease table recovered from the journal and the leases still held
    /// in this process re-registered) whenever it fails, and the handle
    /// that follows its incarnations. `args` builds the arguments of each
    /// incarnation.
    pub fn child(
        name: &str,
        args: impl Fn() -> GpuArgs + Send + Sync + 'static,
    ) -> (troupe_actor::ChildSpec, Self) {
        let handle = Self::empty();
        let h = handle.clone();
        let args = Arc::new(args);
        let spec =
            troupe_actor::ChildSpec::from_fn(name, troupe_actor::Restart::Permanent, move |sup| {
                let (h, args) = (h.clone(), args.clone());
                async move {
                    h.start(args(), Some(sup))
                        .await
                        .map_err(|e| troupe_actor::ActorError::Spawn {
                            actor: "gpu supervisor".into(),
                            message: e.to_string(),
                        })
                }
            });
        (spec, handle)
    }

    /// Whether an incarnation is running now (readiness).
    pub fn is_running(&self) -> bool {
        self.actor.load().as_ref().is_some_and(|a| {
            matches!(
                a.get_status(),
                ractor::ActorStatus::Running | ractor::ActorStatus::Upgrading
            )
        })
    }

    /// The current incarnation's actor.
    pub fn actor(&self) -> Result<ActorRef<GpuMsg>, GpuError> {
        self.actor
            .load_full()
            .map(|a| (*a).clone())
            .ok_or(GpuError::Unavailable)
    }

    /// The supervisor's time now, in ms: what deadlines are measured on.
    pub fn now_ms(&self) -> Ms {
        lock(&self.shared.clock).now_ms()
    }

    /// Leases granted in this process and not ended.
    pub fn live_leases(&self) -> Vec<Lease> {
        lock(&self.shared.live)
            .values()
            .map(|l| l.lease.clone())
            .collect()
    }

    fn post(&self, op: Op) -> Result<(), GpuError> {
        {
            let mut inbox = lock(&self.shared.inbox);
            let bound = self.inbox_bound.load(Ordering::Relaxed);
            if inbox.len() >= bound {
                return Err(GpuError::Overloaded {
                    retry_after: Duration::from_millis(10),
                    reason: format!("the GPU supervisor's inbox is full ({bound} waiting)"),
                });
            }
            inbox.push_back(op);
        }
        if !self.shared.draining.swap(true, Ordering::SeqCst) {
            let sent = self
                .actor()
                .and_then(|a| a.cast(GpuMsg::Drain).map_err(|_| GpuError::Unavailable));
            if sent.is_err() {
                // The next incarnation drains it (its caller may have gone
                // by then: a grant nobody takes is released at once).
                self.shared.draining.store(false, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// Asks for a lease; waits until it is granted or refused (at the
    /// latest when it can no longer finish by its deadline).
    pub async fn acquire(
        &self,
        req: LeaseRequest,
        holder: Option<ActorCell>,
        notices: Option<mpsc::Sender<LeaseNotice>>,
    ) -> Result<Lease, GpuError> {
        let wait = Duration::from_millis(req.deadline_ms.saturating_sub(self.now_ms()))
            + Duration::from_secs(5);
        let name = req.holder.clone();
        let (reply, rx) = oneshot::channel();
        self.post(Op::Request {
            req,
            holder,
            notices,
            reply,
        })?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(GpuError::Unavailable),
            Err(_) => Err(GpuError::Expired { holder: name }),
        }
    }

    /// Renews a lease for `ttl_ms`.
    pub async fn renew(&self, lease: &Lease, ttl_ms: Ms) -> Result<Ms, GpuError> {
        let r = self
            .actor()?
            .call(
                |reply| GpuMsg::Renew(lease.id, lease.generation, ttl_ms, reply),
                Some(Duration::from_secs(10)),
            )
            .await;
        unavailable(r)?
    }

    /// Releases a lease.
    pub async fn release(&self, lease: &Lease) -> Result<(), GpuError> {
        let (reply, rx) = oneshot::channel();
        self.post(Op::Release {
            id: lease.id,
            generation: lease.generation,
            reply,
        })?;
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(r)) => r,
            _ => Err(GpuError::Unavailable),
        }
    }

    /// Checks a fencing generation, as a device does before running work.
    pub async fn check_fence(
        &self,
        device: u32,
        lease: u64,
        generation: u64,
    ) -> Result<(), GpuError> {
        let r = self
            .actor()?
            .call(
                |reply| GpuMsg::Fence(device, lease, generation, reply),
                Some(Duration::from_secs(10)),
            )
            .await;
        unavailable(r)?
    }

    /// Asks the device actor of `lease.device` to admit work under `lease`:
    /// refused with `StaleGeneration` once the lease has ended (released,
    /// expired, preempted, revoked) or was never this one.
    pub async fn admit(&self, lease: &Lease) -> Result<(), GpuError> {
        let r = self
            .actor()?
            .call(
                |reply| GpuMsg::Device(lease.device, reply),
                Some(Duration::from_secs(10)),
            )
            .await;
        let device = unavailable(r)?.ok_or(GpuError::Probe {
            device: Some(lease.device),
            message: "no such device".into(),
        })?;
        match device
            .call(
                |reply| DeviceMsg::Admit(lease.id, lease.generation, reply),
                Some(Duration::from_secs(10)),
            )
            .await
        {
            Ok(ractor::rpc::CallResult::Success(v)) => v,
            _ => Err(GpuError::Unavailable),
        }
    }

    /// Every device's status.
    pub async fn status(&self) -> Result<Vec<GpuStatus>, GpuError> {
        unavailable(
            self.actor()?
                .call(GpuMsg::Status, Some(Duration::from_secs(10)))
                .await,
        )
    }

    /// Stops the supervisor.
    pub async fn stop(&self) {
        if let Ok(a) = self.actor() {
            let _ = a.stop_and_wait(None, Some(Duration::from_secs(10))).await;
        }
    }
}

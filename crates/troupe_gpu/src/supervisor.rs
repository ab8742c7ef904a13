//! The [`GpuSupervisor`] actor: the scheduler, a clock, device health, a
//! journal, and notices to lease holders.
//!
//! - Requests are decided by the [`Scheduler`]; a queued request keeps its
//!   reply port until it is granted, refused or expires.
//! - Every grant, renewal, preemption and end is journaled (under
//!   `gpu/leases`) **before** anyone is told. A restarted supervisor replays
//!   them: it recovers the lease table, continues lease ids and fencing
//!   generations past the highest ever issued, and lets leases whose holders
//!   are gone run out at their TTL. It never grants the same capacity twice.
//! - One [device actor](crate::device) per GPU, linked to the supervisor
//!   (and restarted by it), polls its probe every `poll_interval`, exports
//!   the device's metrics and reports each reading; a failed reading marks
//!   the device unhealthy (its leases are revoked and their holders told),
//!   a good one heals it. Device actors admit work only under a current
//!   lease and fencing generation ([`GpuSupervisorHandle::admit`]).
//! - Holders that pass their actor cell are watched: when the actor stops,
//!   its leases end at the next tick.
//!
//! Use the journal's durability to choose what a grant costs: with `Fsync`
//! each decision waits for a disk sync; with `Buffered` it survives a
//! process crash (which also ends every in-process holder).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ractor::{ActorCell, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
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
    /// A lease was granted.
    Granted(Lease),
    /// A lease was renewed until `expires_ms`.
    Renewed {
        /// Lease id.
        id: u64,
        /// New expiry.
        expires_ms: Ms,
    },
    /// A lease must end by `at`.
    Preempting {
        /// Lease id.
        id: u64,
        /// End of grace.
        at: Ms,
    },
    /// A lease ended.
    Ended {
        /// Lease id.
        id: u64,
        /// Why.
        reason: EndReason,
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

/// A granted lease, with the channel its notices arrive on.
#[derive(Debug)]
pub struct LeaseGrant {
    /// The lease.
    pub lease: Lease,
}

/// Something a holder is told about its lease.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseNotice {
    /// Finish and release by `grace_until` (ms since the Unix epoch).
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
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            poll_interval: Duration::from_secs(1),
            tick_interval: Duration::from_millis(20),
            snapshot_every: 1_000,
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
    /// Last reading, if the device answered.
    pub utilization_pct: Option<u32>,
}

/// Messages of the GPU supervisor (use [`GpuSupervisorHandle`]).
pub enum GpuMsg {
    /// Ask for a lease.
    Request {
        /// The request (absolute deadline).
        req: LeaseRequest,
        /// The holder actor, watched for death.
        holder: Option<ActorCell>,
        /// Where preempt and end notices go (bounded; full means dropped and counted).
        notices: Option<mpsc::Sender<LeaseNotice>>,
        /// The answer.
        reply: RpcReplyPort<Result<LeaseGrant, GpuError>>,
    },
    /// Extend a lease.
    Renew(u64, u64, Ms, RpcReplyPort<Result<Ms, GpuError>>),
    /// Give a lease back.
    Release(u64, u64, RpcReplyPort<Result<(), GpuError>>),
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

/// The GPU supervisor actor. See the [module docs](self).
pub struct GpuSupervisor;

struct Waiting {
    reply: RpcReplyPort<Result<LeaseGrant, GpuError>>,
    holder: Option<ActorCell>,
    notices: Option<mpsc::Sender<LeaseNotice>>,
}

/// Who holds a lease: name, watched actor, notice channel.
type HolderEntry = (String, Option<ActorCell>, Option<mpsc::Sender<LeaseNotice>>);

/// State of the GPU supervisor.
pub struct GpuState {
    sched: Scheduler,
    args: GpuArgs,
    id: PersistenceId,
    seq: u64,
    since_snapshot: u64,
    next_ticket: u64,
    waiting: HashMap<u64, Waiting>,
    holders: HashMap<u64, HolderEntry>,
    utilization: HashMap<u32, u32>,
    fences: Arc<FenceTable>,
    devices: Vec<ActorRef<DeviceMsg>>,
}

fn journal_err(e: troupe_journal::JournalError) -> GpuError {
    GpuError::from(e)
}

impl GpuState {
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
        self.seq += n;
        self.since_snapshot += n;
        if self.since_snapshot >= self.args.config.snapshot_every {
            let (next_lease, next_generation) = self.sched.counters();
            let table = LeaseTable {
                leases: self.sched.leases().cloned().collect(),
                next_lease,
                next_generation,
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

    /// Journals the outcomes, then tells everyone concerned.
    async fn settle(&mut self, outcomes: Vec<Outcome>) -> Result<(), ActorProcessingErr> {
        // Most ticks decide nothing: no journal write, no metric update.
        if outcomes.is_empty() {
            return Ok(());
        }
        let events: Vec<LeaseEvent> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Granted { lease, .. } => Some(LeaseEvent::Granted(lease.clone())),
                Outcome::PreemptNotice { lease, grace_until } => Some(LeaseEvent::Preempting {
                    id: lease.id,
                    at: *grace_until,
                }),
                Outcome::Ended { lease, reason } => Some(LeaseEvent::Ended {
                    id: lease.id,
                    reason: *reason,
                }),
                Outcome::Refused { .. } => None,
            })
            .collect();
        // Nothing is told before it is journaled; a journal failure fails
        // the supervisor, which restarts from what was journaled.
        self.persist(events).await.map_err(Box::new)?;
        for o in outcomes {
            match o {
                Outcome::Granted { ticket, lease } => {
                    metrics::counter!("troupe_gpu_leases_granted_total").increment(1);
                    self.fences.grant(lease.id, lease.device, lease.generation);
                    if let Some(w) = self.waiting.remove(&ticket) {
                        self.holders
                            .insert(lease.id, (lease.holder.clone(), w.holder, w.notices));
                        let _ = w.reply.send(Ok(LeaseGrant { lease }));
                    }
                }
                Outcome::Refused { ticket, error } => {
                    metrics::counter!("troupe_gpu_requests_refused_total").increment(1);
                    if let Some(w) = self.waiting.remove(&ticket) {
                        let _ = w.reply.send(Err(error));
                    }
                }
                Outcome::PreemptNotice { lease, grace_until } => {
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
                    self.holders.remove(&lease.id);
                }
            }
        }
        self.export_queues();
        Ok(())
    }

    fn export_queues(&self) {
        let queued = self.sched.queued();
        for (p, n) in queued.iter().enumerate().take(PRIORITIES) {
            metrics::gauge!("troupe_gpu_pending_requests", "priority" => p.to_string())
                .set(*n as f64);
        }
    }

    fn notify(&self, lease: u64, notice: LeaseNotice) {
        if let Some((_, _, Some(tx))) = self.holders.get(&lease)
            && tx.try_send(notice).is_err()
        {
            metrics::counter!("troupe_gpu_notices_dropped_total").increment(1);
        }
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
    type Arguments = GpuArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<GpuMsg>,
        args: GpuArgs,
    ) -> Result<GpuState, ActorProcessingErr> {
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
        tracing::info!(
            devices = devices.len(),
            probe = args.probe.kind(),
            recovered_leases = table.leases.len(),
            "GPU supervisor started"
        );
        let sched = Scheduler::recover(
            devices,
            args.config.scheduler,
            table.leases,
            table.next_lease,
            table.next_generation,
        );
        myself.send_interval(args.config.tick_interval, || GpuMsg::Tick);
        let fences = Arc::new(FenceTable::default());
        for l in sched.leases() {
            fences.grant(l.id, l.device, l.generation);
        }
        Ok(GpuState {
            sched,
            args,
            id,
            seq,
            since_snapshot: 0,
            next_ticket: 1,
            waiting: HashMap::new(),
            holders: HashMap::new(),
            utilization: HashMap::new(),
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
        let now = now_ms();
        match msg {
            GpuMsg::Request {
                req,
                holder,
                notices,
                reply,
            } => {
                let ticket = st.next_ticket;
                st.next_ticket += 1;
                st.waiting.insert(
                    ticket,
                    Waiting {
                        reply,
                        holder,
                        notices,
                    },
                );
                let out = st.sched.request(ticket, req, now);
                st.settle(out).await?;
                st.export_queues();
            }
            GpuMsg::Renew(id, generation, ttl, reply) => {
                match st.sched.renew(id, generation, ttl, now) {
                    Ok(expires_ms) => {
                        st.persist(vec![LeaseEvent::Renewed { id, expires_ms }])
                            .await
                            .map_err(Box::new)?;
                        let _ = reply.send(Ok(expires_ms));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            GpuMsg::Release(id, generation, reply) => {
                if let Err(e) = st
                    .sched
                    .lease(id)
                    .map_or(Err(GpuError::UnknownLease(id)), |l| {
                        if l.generation == generation {
                            Ok(())
                        } else {
                            Err(GpuError::StaleGeneration {
                                lease: id,
                                device: l.device,
                                presented: generation,
                                current: Some(l.generation),
                            })
                        }
                    })
                {
                    let _ = reply.send(Err(e));
                    return Ok(());
                }
                match st.sched.release(id, now) {
                    Ok(out) => {
                        st.settle(out).await?;
                        let _ = reply.send(Ok(()));
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
                    .map(|d| GpuStatus {
                        device: d.clone(),
                        leased: st.sched.used(d.index),
                        utilization_pct: st.utilization.get(&d.index).copied(),
                    })
                    .collect();
                let _ = reply.send(status);
            }
            GpuMsg::Tick => {
                let gone: Vec<String> = st
                    .holders
                    .values()
                    .filter(|(_, cell, _)| {
                        cell.as_ref()
                            .is_some_and(|c| c.get_status() == ActorStatus::Stopped)
                    })
                    .map(|(h, _, _)| h.clone())
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
                        st.utilization.insert(index, sample.utilization_pct);
                        if d.healthy {
                            Vec::new()
                        } else {
                            tracing::info!(device = index, "device healthy again");
                            st.sched.device_recovered(index, now)
                        }
                    }
                    Err(e) => {
                        st.utilization.remove(&index);
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
/// ([`GpuSupervisorHandle::child`]): calls made while it restarts fail with
/// [`GpuError::Unavailable`], which is transient.
#[derive(Clone)]
pub struct GpuSupervisorHandle {
    actor: Arc<arc_swap::ArcSwapOption<ActorRef<GpuMsg>>>,
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
    /// Spawns a supervisor (linked to `parent` if given). Nothing restarts
    /// it: prefer [`GpuSupervisorHandle::child`] under a supervisor.
    pub async fn spawn(args: GpuArgs, parent: Option<ActorCell>) -> Result<Self, GpuError> {
        let handle = Self {
            actor: Arc::new(arc_swap::ArcSwapOption::empty()),
        };
        handle.start(args, parent).await?;
        Ok(handle)
    }

    async fn start(&self, args: GpuArgs, parent: Option<ActorCell>) -> Result<ActorCell, GpuError> {
        let spawned = match parent {
            Some(p) => ractor::Actor::spawn_linked(None, GpuSupervisor, args, p).await,
            None => ractor::Actor::spawn(None, GpuSupervisor, args).await,
        };
        let (actor, _) = spawned.map_err(|e| GpuError::Start(e.to_string()))?;
        let cell = actor.get_cell();
        self.actor.store(Some(Arc::new(actor)));
        Ok(cell)
    }

    /// The supervisor as a child of a Troupe supervisor, restarted (with
    /// its lease table recovered from the journal) whenever it fails, and
    /// the handle that follows its incarnations. `args` builds the
    /// arguments of each incarnation.
    pub fn child(
        name: &str,
        args: impl Fn() -> GpuArgs + Send + Sync + 'static,
    ) -> (troupe_actor::ChildSpec, Self) {
        let handle = Self {
            actor: Arc::new(arc_swap::ArcSwapOption::empty()),
        };
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

    /// Asks for a lease; waits until it is granted, refused or expires.
    pub async fn acquire(
        &self,
        req: LeaseRequest,
        holder: Option<ActorCell>,
        notices: Option<mpsc::Sender<LeaseNotice>>,
    ) -> Result<Lease, GpuError> {
        let wait = Duration::from_millis(req.deadline_ms.saturating_sub(now_ms()))
            + Duration::from_secs(5);
        let r = self
            .actor()?
            .call(
                |reply| GpuMsg::Request {
                    req,
                    holder,
                    notices,
                    reply,
                },
                Some(wait),
            )
            .await;
        unavailable(r)?.map(|g| g.lease)
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
        let r = self
            .actor()?
            .call(
                |reply| GpuMsg::Release(lease.id, lease.generation, reply),
                Some(Duration::from_secs(10)),
            )
            .await;
        unavailable(r)?
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

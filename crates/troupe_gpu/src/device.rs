//! Device actors: one per GPU. Each polls its probe, exports the device's
//! metrics, reports every reading (or failure) to the
//! [`GpuSupervisor`](crate::GpuSupervisor), and admits work only when it
//! presents a lease that is current on this device: a holder whose lease
//! expired, was preempted or revoked carries a stale fencing generation and
//! is refused.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::error::GpuError;
use crate::probe::{DeviceSample, GpuProbe};
use crate::supervisor::GpuMsg;

/// Leases currently valid, by lease id: `(device, generation)`. Written by
/// the supervisor after each journaled decision, read by device actors.
#[derive(Debug, Default)]
pub struct FenceTable {
    valid: RwLock<HashMap<u64, (u32, u64)>>,
}

impl FenceTable {
    pub(crate) fn grant(&self, lease: u64, device: u32, generation: u64) {
        self.valid
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(lease, (device, generation));
    }

    pub(crate) fn revoke(&self, lease: u64) {
        self.valid
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lease);
    }

    /// Ok if `lease` with `generation` is valid on `device`.
    pub fn check(&self, device: u32, lease: u64, generation: u64) -> Result<(), GpuError> {
        let current = self
            .valid
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&lease)
            .copied();
        match current {
            Some((d, g)) if d == device && g == generation => Ok(()),
            other => Err(GpuError::StaleGeneration {
                lease,
                device,
                presented: generation,
                current: other.map(|(_, g)| g),
            }),
        }
    }
}

/// Messages of a device actor.
pub enum DeviceMsg {
    /// Admit work presenting `(lease, generation)`.
    Admit(u64, u64, RpcReplyPort<Result<(), GpuError>>),
    /// The last reading (None if the device failed its last poll).
    Sample(RpcReplyPort<Option<DeviceSample>>),
    #[doc(hidden)]
    Poll,
}

#[cfg(feature = "cluster")]
impl ractor::Message for DeviceMsg {}

/// Arguments of a device actor.
pub struct DeviceArgs {
    /// Device index.
    pub index: u32,
    /// Where readings come from.
    pub probe: Arc<dyn GpuProbe>,
    /// Who is told about each reading.
    pub supervisor: ActorRef<GpuMsg>,
    /// How often to read.
    pub poll_interval: Duration,
    /// Valid leases.
    pub fences: Arc<FenceTable>,
}

/// The device actor. See the [module docs](self).
pub struct DeviceActor;

/// State of a device actor.
pub struct DeviceState {
    args: DeviceArgs,
    last: Option<DeviceSample>,
}

impl ractor::Actor for DeviceActor {
    type Msg = DeviceMsg;
    type State = DeviceState;
    type Arguments = DeviceArgs;

    async fn pre_start(
        &self,
        me: ActorRef<DeviceMsg>,
        args: DeviceArgs,
    ) -> Result<DeviceState, ActorProcessingErr> {
        me.send_interval(args.poll_interval, || DeviceMsg::Poll);
        me.cast(DeviceMsg::Poll)?;
        Ok(DeviceState { args, last: None })
    }

    async fn handle(
        &self,
        _me: ActorRef<DeviceMsg>,
        msg: DeviceMsg,
        st: &mut DeviceState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeviceMsg::Admit(lease, generation, reply) => {
                let verdict = st.args.fences.check(st.args.index, lease, generation);
                if verdict.is_err() {
                    metrics::counter!("troupe_gpu_fenced_total", "device" => st.args.index.to_string())
                        .increment(1);
                }
                let _ = reply.send(verdict);
            }
            DeviceMsg::Sample(reply) => {
                let _ = reply.send(st.last.clone());
            }
            DeviceMsg::Poll => {
                let index = st.args.index;
                let reading = st.args.probe.sample(index);
                if let Ok(s) = &reading {
                    let label = index.to_string();
                    if let Some(u) = s.utilization_pct {
                        metrics::gauge!("troupe_gpu_utilization_percent", "device" => label.clone())
                            .set(u as f64);
                    }
                    if let Some(m) = s.memory_used {
                        metrics::gauge!("troupe_gpu_memory_used_bytes", "device" => label.clone())
                            .set(m as f64);
                    }
                    for (field, why) in &s.refused {
                        metrics::counter!("troupe_gpu_fields_refused_total", "device" => label.clone(), "field" => *field)
                            .increment(1);
                        tracing::debug!(device = index, field, reason = %why, "device refused a field");
                    }
                    metrics::gauge!("troupe_gpu_memory_total_bytes", "device" => label.clone())
                        .set(s.memory_total as f64);
                    if let Some(t) = s.temperature_c {
                        metrics::gauge!("troupe_gpu_temperature_celsius", "device" => label.clone())
                            .set(t as f64);
                    }
                    if let Some(p) = s.power_mw {
                        metrics::gauge!("troupe_gpu_power_watts", "device" => label)
                            .set(p as f64 / 1000.0);
                    }
                }
                st.last = reading.as_ref().ok().cloned();
                let report = reading.map_err(|e| e.to_string());
                // The supervisor may be restarting; the next poll reports again.
                let _ = st.args.supervisor.cast(GpuMsg::DeviceReport(index, report));
            }
        }
        Ok(())
    }
}

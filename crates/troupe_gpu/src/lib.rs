//! # troupe_gpu: GPUs as actors
//!
//! | you want | use |
//! |---|---|
//! | read a GPU's utilization, memory, temperature, power | [`probe::GpuProbe`]: [`probe::NvmlProbe`] or [`probe::SimulatedProbe`]; [`probe::detect`] picks |
//! | decide who gets GPU capacity, when, and who is refused | [`scheduler::Scheduler`] (pure, deterministic) |
//! | the same as a supervised, journaled actor | [`GpuSupervisor`] |
//! | one actor per GPU: polling, metrics, fencing | [`device::DeviceActor`] (started by the supervisor) |

#![warn(missing_docs)]

pub mod device;
mod error;
pub mod probe;
pub mod scheduler;
mod supervisor;

pub use error::GpuError;
pub use supervisor::{
    Clock, GpuArgs, GpuConfig, GpuMsg, GpuStart, GpuState, GpuStatus, GpuSupervisor,
    GpuSupervisorHandle, LeaseEvent, LeaseNotice,
};

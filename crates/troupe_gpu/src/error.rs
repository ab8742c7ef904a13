//! The GPU crate's error type.

use std::time::Duration;

/// Everything that can go wrong with probes, leases and admission.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GpuError {
    /// The request cannot be served in time (or its queue is full): retry later.
    #[error("overloaded: retry after {retry_after:?} ({reason})")]
    Overloaded {
        /// When a retry has a fair chance.
        retry_after: Duration,
        /// Why it was refused.
        reason: String,
    },
    /// No device could ever hold the request.
    #[error("no device can hold {memory} bytes and {compute}% compute")]
    TooLarge {
        /// Memory asked for.
        memory: u64,
        /// Compute share asked for.
        compute: u32,
    },
    /// The request waited until its deadline.
    #[error("lease request of `{holder}` expired in the queue")]
    Expired {
        /// Holder.
        holder: String,
    },
    /// Unknown lease id.
    #[error("unknown lease {0}")]
    UnknownLease(u64),
    /// A holder used a lease with an old fencing generation.
    #[error(
        "lease {lease} on device {device}: stale fencing generation {presented} (current {current:?})"
    )]
    StaleGeneration {
        /// Lease id.
        lease: u64,
        /// Device index.
        device: u32,
        /// Generation presented.
        presented: u64,
        /// The lease's current generation, if it is still active.
        current: Option<u64>,
    },
    /// A request that makes no sense.
    #[error("invalid lease request: {0}")]
    Invalid(String),
    /// The device probe failed.
    #[error("probe error on device {device:?}: {message}")]
    Probe {
        /// Device index, if known.
        device: Option<u32>,
        /// What went wrong.
        message: String,
    },
    /// The lease table could not be journaled or recovered.
    #[error("lease journal: {0}")]
    Journal(String),
    /// The GPU supervisor could not start (its probe or its lease journal failed).
    #[error("the GPU supervisor did not start: {0}")]
    Start(String),
    /// The GPU supervisor is not running.
    #[error("the GPU supervisor is not running")]
    Unavailable,
}

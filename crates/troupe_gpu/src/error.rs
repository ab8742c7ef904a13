//! The GPU crate's error type.

use std::sync::Arc;
use std::time::Duration;

use troupe_journal::JournalError;

/// Everything that can go wrong with probes, leases and admission.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// The request waited until it could no longer finish by its deadline
    /// (on the run-time prediction it was admitted on).
    #[error("lease request of `{holder}` can no longer finish by its deadline")]
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
    /// The lease table could not be journaled or recovered (the journal's
    /// error is the source).
    #[error("lease journal: {0}")]
    Journal(#[source] Arc<JournalError>),
    /// The GPU supervisor could not start (its probe or its lease journal failed).
    #[error("the GPU supervisor did not start: {0}")]
    Start(String),
    /// The GPU supervisor is not running.
    #[error("the GPU supervisor is not running")]
    Unavailable,
}

impl From<JournalError> for GpuError {
    fn from(e: JournalError) -> Self {
        GpuError::Journal(Arc::new(e))
    }
}

impl GpuError {
    /// The retry hint of an overload.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GpuError::Overloaded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Whether retrying later may succeed: an overload, a request that
    /// expired in the queue, a supervisor that is restarting, a transient
    /// journal failure.
    pub fn is_transient(&self) -> bool {
        match self {
            GpuError::Overloaded { .. } | GpuError::Expired { .. } | GpuError::Unavailable => true,
            GpuError::Journal(e) => e.is_transient(),
            _ => false,
        }
    }
}

/// Two errors are equal when they are the same variant with the same
/// message (the journal's error, kept as a source, has no `PartialEq`).
impl PartialEq for GpuError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

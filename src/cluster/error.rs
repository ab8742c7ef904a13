//! The cluster's error type.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything that can go wrong between nodes.
///
/// It travels over the wire (a remote node's refusal reaches the caller as
/// the same variant), so every field is plain data. Use
/// [`ClusterError::is_retryable`] to tell a refusal worth retrying (a node
/// down, membership settling, a full mailbox, no GPU capacity now) from a
/// mistake (an unknown agent, a message of the wrong type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum ClusterError {
    /// A configuration value the cluster refuses.
    #[error("invalid cluster configuration: {0}")]
    Config(String),
    /// The node server could not start.
    #[error("could not start node `{node}`: {reason}")]
    Start {
        /// This node's name.
        node: String,
        /// Why.
        reason: String,
    },
    /// No seed could be reached (or authenticated: a wrong cookie or TLS
    /// settings look the same from here) within the join time-out.
    #[error("could not join the cluster through {seeds}: {reason}")]
    Join {
        /// The seeds tried.
        seeds: String,
        /// Why.
        reason: String,
    },
    /// No node exposes an agent under this name.
    #[error("no node of the cluster exposes an agent named `{name}`")]
    UnknownAgent {
        /// The name asked for.
        name: String,
    },
    /// The agent was exposed without this kind of message (`tells` or `asks`).
    #[error("agent `{name}` does not take {what}")]
    NotAccepted {
        /// The agent.
        name: String,
        /// `tells` or `asks`.
        what: String,
    },
    /// No live node hosts this entity kind.
    #[error("no live node hosts entities of kind `{kind}`")]
    NoOwner {
        /// The entity kind.
        kind: String,
    },
    /// The entity's journal is on one node's disk and that node is down.
    #[error(
        "entity `{kind}/{key}` is unavailable: its journal is local to node `{node}`, which is down; it is available again when `{node}` returns (use a shared journal such as PostgreSQL to fail over)"
    )]
    EntityUnavailable {
        /// The entity kind.
        kind: String,
        /// The entity key.
        key: String,
        /// Its home node.
        node: String,
    },
    /// A node left (or its connection broke) with the message in flight:
    /// its outcome is unknown.
    #[error("node `{node}` is unreachable: {reason}")]
    NodeDown {
        /// The node.
        node: String,
        /// What happened.
        reason: String,
    },
    /// A call did not complete in time.
    #[error("`{operation}` on node `{node}` timed out after {after:?}")]
    Timeout {
        /// The node called.
        node: String,
        /// What was asked.
        operation: String,
        /// The time-out.
        after: Duration,
    },
    /// A message could not be encoded or decoded (a type mismatch between
    /// sender and receiver, or a corrupt frame).
    #[error("could not {op} {what} on node `{node}`: {reason}")]
    Codec {
        /// Where.
        node: String,
        /// `encode` or `decode`.
        op: String,
        /// The message (type and target).
        what: String,
        /// The codec's message.
        reason: String,
    },
    /// The target actor refused or failed the message.
    #[error("`{target}` on node `{node}` refused the message: {reason}")]
    Rejected {
        /// The node.
        node: String,
        /// The agent or entity.
        target: String,
        /// Why (the actor error's message).
        reason: String,
        /// Whether a retry may succeed (a full mailbox, a restart, a
        /// transient journal error).
        retryable: bool,
    },
    /// The message went from node to node more than the hop limit allows:
    /// the nodes disagree about membership for a moment.
    #[error("message for `{target}` was forwarded {hops} times while membership settles; retry")]
    Misrouted {
        /// The entity.
        target: String,
        /// Hops taken.
        hops: u8,
    },
    /// A message larger than the frames nodes accept
    /// ([`super::ClusterConfig::max_frame_bytes`]); sending it would cost
    /// the connection.
    #[error("{what} for node `{node}` is {bytes} bytes, over the {limit}-byte frame limit")]
    TooLarge {
        /// The node it was for.
        node: String,
        /// What was sent.
        what: String,
        /// Its encoded size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The node is already serving as many remote calls as it allows.
    #[error("node `{node}` is serving {limit} remote calls already; retry")]
    Overloaded {
        /// The node.
        node: String,
        /// Its limit ([`super::ClusterConfig::max_inflight_calls`]).
        limit: usize,
    },
    /// No node can serve the GPU task in time.
    #[error("no node has GPU capacity for `{kind}` now; retry after {retry_after:?} ({detail})")]
    NoGpuCapacity {
        /// The task kind.
        kind: String,
        /// The soonest hint among the nodes' refusals.
        retry_after: Duration,
        /// Each node's answer.
        detail: String,
    },
    /// The GPU task ran and failed.
    #[error("GPU task `{kind}` failed on node `{node}`: {reason}")]
    GpuTask {
        /// The task kind.
        kind: String,
        /// The node it ran on.
        node: String,
        /// Why.
        reason: String,
    },
}

impl ClusterError {
    /// Whether retrying the same message later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClusterError::NodeDown { .. }
            | ClusterError::Timeout { .. }
            | ClusterError::Misrouted { .. }
            | ClusterError::Overloaded { .. }
            | ClusterError::NoOwner { .. }
            | ClusterError::EntityUnavailable { .. }
            | ClusterError::NoGpuCapacity { .. } => true,
            ClusterError::Rejected { retryable, .. } => *retryable,
            _ => false,
        }
    }
}

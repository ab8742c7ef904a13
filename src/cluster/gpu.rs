//! GPU capacity across nodes: every node's GpuSupervisor keeps its own
//! devices; a task goes to a node that can start it in time, or is refused
//! with the soonest retry hint any node gave.

use std::any::type_name;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use troupe_gpu::scheduler::{Lease, LeaseRequest};
use troupe_gpu::{GpuError, GpuSupervisorHandle};

use super::{ClusterError, ClusterNode, Frame, Wire, decode, encode, read, write};

/// What a GPU task needs: the lease it runs under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuNeed {
    /// Device memory, in bytes.
    pub memory: u64,
    /// Compute share, in percent of one device (1 to 100).
    pub compute: u32,
    /// 0 (lowest) to 3.
    pub priority: u8,
    /// The task must start within this many milliseconds of reaching a
    /// node, or that node refuses it.
    pub start_within_ms: u64,
    /// How long the task is expected to run (for the nodes' wait estimates).
    pub expected_ms: u64,
}

/// One node's GPU capacity as its supervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeGpuCapacity {
    /// The node.
    pub node: String,
    /// Healthy devices.
    pub devices: u32,
    /// Memory not leased, summed over healthy devices.
    pub free_memory: u64,
    /// Compute not leased, summed over healthy devices (percent points).
    pub free_compute: u32,
    /// The largest free memory of one device: what one lease can get.
    pub largest_free_memory: u64,
}

/// A task's result and the node it ran on.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuRun<R> {
    /// The node whose GPU ran it.
    pub node: String,
    /// The task's output.
    pub output: R,
}

type Task =
    Arc<dyn Fn(Lease, Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, String>> + Send + Sync>;

/// This node's GPU supervisor and the tasks it runs.
pub(crate) struct GpuHost {
    supervisor: GpuSupervisorHandle,
    tasks: std::sync::RwLock<HashMap<String, Task>>,
}

impl GpuHost {
    pub(crate) async fn capacity(&self, node: &str) -> Result<NodeGpuCapacity, ClusterError> {
        let status = self
            .supervisor
            .status()
            .await
            .map_err(|e| ClusterError::GpuTask {
                kind: "status".into(),
                node: node.to_owned(),
                reason: e.to_string(),
            })?;
        let mut cap = NodeGpuCapacity {
            node: node.to_owned(),
            devices: 0,
            free_memory: 0,
            free_compute: 0,
            largest_free_memory: 0,
        };
        for s in status.iter().filter(|s| s.device.healthy) {
            let free_memory = s.device.memory.saturating_sub(s.leased.0);
            cap.devices += 1;
            cap.free_memory += free_memory;
            cap.free_compute += s.device.compute.saturating_sub(s.leased.1);
            cap.largest_free_memory = cap.largest_free_memory.max(free_memory);
        }
        Ok(cap)
    }

    /// Takes a lease (refusing if it cannot start in time), runs the task,
    /// gives the lease back.
    pub(crate) async fn run(
        &self,
        node: &str,
        kind: &str,
        need: GpuNeed,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClusterError> {
        let task = read(&self.tasks).get(kind).cloned();
        let Some(task) = task else {
            return Err(ClusterError::NoGpuCapacity {
                kind: kind.to_owned(),
                retry_after: Duration::ZERO,
                detail: format!("node `{node}` runs no task `{kind}`"),
            });
        };
        let now = self.supervisor.now_ms();
        // A peer's work: journaled lease by lease, so a supervisor restarted
        // in another process still sees it.
        let request = LeaseRequest {
            holder: format!("cluster:{kind}"),
            kind: kind.to_owned(),
            memory: need.memory,
            compute: need.compute,
            priority: need.priority,
            deadline_ms: now
                .saturating_add(need.start_within_ms)
                .saturating_add(need.expected_ms),
            ttl_ms: (timeout.as_millis() as u64)
                .max(need.expected_ms)
                .max(1_000),
            estimate_ms: Some(need.expected_ms),
            resumable: false,
            durable: true,
        };
        let lease = match self.supervisor.acquire(request, None, None).await {
            Ok(lease) => lease,
            Err(GpuError::Overloaded {
                retry_after,
                reason,
            }) => {
                return Err(ClusterError::NoGpuCapacity {
                    kind: kind.to_owned(),
                    retry_after,
                    detail: format!("{node}: {reason}"),
                });
            }
            Err(e @ (GpuError::TooLarge { .. } | GpuError::Expired { .. })) => {
                return Err(ClusterError::NoGpuCapacity {
                    kind: kind.to_owned(),
                    retry_after: Duration::ZERO,
                    detail: format!("{node}: {e}"),
                });
            }
            // The task did not run: another node may take it.
            Err(e) => {
                return Err(ClusterError::NoGpuCapacity {
                    kind: kind.to_owned(),
                    retry_after: Duration::ZERO,
                    detail: format!("{node}: no lease: {e}"),
                });
            }
        };
        let out = tokio::time::timeout(timeout, task(lease.clone(), body)).await;
        if let Err(e) = self.supervisor.release(&lease).await {
            tracing::warn!(%node, %kind, lease = lease.id, error = %e, "lease release failed (it expires by its TTL)");
        }
        match out {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(reason)) => Err(ClusterError::GpuTask {
                kind: kind.to_owned(),
                node: node.to_owned(),
                reason,
            }),
            Err(_) => Err(ClusterError::Timeout {
                node: node.to_owned(),
                operation: format!("GPU task `{kind}`"),
                after: timeout,
            }),
        }
    }
}

/// The cluster's GPUs as one pool. Get it from [`ClusterNode::gpu`].
#[derive(Clone, Debug)]
pub struct ClusterGpu {
    node: ClusterNode,
}

impl ClusterNode {
    /// Makes this node's GPUs available to the cluster: `supervisor` leases
    /// them to tasks registered with [`ClusterNode::gpu_task`].
    pub fn host_gpu(&self, supervisor: GpuSupervisorHandle) -> Result<(), ClusterError> {
        let mut gpu = write(&self.inner.gpu);
        if gpu.is_some() {
            return Err(ClusterError::Config(format!(
                "node `{}` already hosts a GPU supervisor",
                self.inner.name
            )));
        }
        *gpu = Some(Arc::new(GpuHost {
            supervisor,
            tasks: std::sync::RwLock::new(HashMap::new()),
        }));
        Ok(())
    }

    /// Registers the GPU task `kind`: `run` gets the lease it runs under and
    /// the input, and returns the output or why it failed. Needs
    /// [`ClusterNode::host_gpu`] first.
    pub fn gpu_task<Q, R, F, Fut>(
        &self,
        kind: impl Into<String>,
        run: F,
    ) -> Result<(), ClusterError>
    where
        Q: Wire,
        R: Wire,
        F: Fn(Lease, Q) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, String>> + Send + 'static,
    {
        let kind = kind.into();
        let host = read(&self.inner.gpu).clone().ok_or_else(|| {
            ClusterError::Config(format!(
                "node `{}` registers GPU task `{kind}` without a GPU supervisor (call host_gpu)",
                self.inner.name
            ))
        })?;
        let run = Arc::new(run);
        let name = self.inner.name.clone();
        let k = kind.clone();
        let task: Task = Arc::new(move |lease, body| {
            let (run, name, k) = (run.clone(), name.clone(), k.clone());
            async move {
                let input: Q = decode(&name, &format!("input of GPU task `{k}`"), &body)
                    .map_err(|e| e.to_string())?;
                let out = run(lease, input).await?;
                encode(&name, &format!("output of GPU task `{k}`"), &out).map_err(|e| e.to_string())
            }
            .boxed()
        });
        {
            let mut tasks = write(&host.tasks);
            if tasks.contains_key(&kind) {
                return Err(ClusterError::Config(format!(
                    "GPU task `{kind}` is already registered on node `{}`",
                    self.inner.name
                )));
            }
            tasks.insert(kind.clone(), task);
        }
        self.inner.join_group(format!("gpu:{kind}"));
        self.inner.refresh();
        Ok(())
    }

    /// The cluster's GPU pool.
    pub fn gpu(&self) -> ClusterGpu {
        ClusterGpu { node: self.clone() }
    }
}

impl ClusterGpu {
    /// Each live node's GPU capacity (nodes without GPUs, or not answering
    /// within the call time-out, are left out).
    pub async fn capacity(&self) -> Vec<NodeGpuCapacity> {
        self.capacity_of(None).await
    }

    /// The capacity of this node and the peers in `only` (all if None).
    async fn capacity_of(&self, only: Option<&[String]>) -> Vec<NodeGpuCapacity> {
        let inner = &self.node.inner;
        let here = async {
            let host = read(&inner.gpu).clone();
            match host {
                Some(h) if only.is_none_or(|o| o.contains(&inner.name)) => {
                    h.capacity(&inner.name).await.ok()
                }
                _ => None,
            }
        };
        let timeout = inner.config.call_timeout;
        let (here, peers) = futures::join!(
            here,
            inner.call_peers(only, &Frame::GpuCapacity, "GPU capacity", timeout)
        );
        let peers = peers.into_iter().filter_map(|(_, answer)| {
            decode::<Option<NodeGpuCapacity>>(&inner.name, "GPU capacity", &answer.ok()?).ok()?
        });
        here.into_iter().chain(peers).collect()
    }

    /// Runs GPU task `kind` on a node that can start it in time: the nodes
    /// running `kind` are tried from the most free compute down; the first
    /// that grants a lease runs it. When every node refuses, the error is
    /// [`ClusterError::NoGpuCapacity`] with the soonest retry hint. A task
    /// that ran and failed is not retried elsewhere.
    pub async fn run<Q: Wire + Clone, R: Wire>(
        &self,
        kind: &str,
        need: GpuNeed,
        input: Q,
        timeout: Duration,
    ) -> Result<GpuRun<R>, ClusterError> {
        let inner = &self.node.inner;
        let hosts = inner.view.load().gpu.get(kind).cloned().unwrap_or_default();
        if hosts.is_empty() {
            return Err(ClusterError::NoGpuCapacity {
                kind: kind.to_owned(),
                retry_after: Duration::ZERO,
                detail: "no live node runs this task".into(),
            });
        }
        let mut order: Vec<(String, i64)> = self
            .capacity_of(Some(&hosts))
            .await
            .into_iter()
            .filter(|c| hosts.contains(&c.node))
            .map(|c| {
                let fits = c.largest_free_memory >= need.memory && c.free_compute >= need.compute;
                // Nodes where it fits now first, then by free compute; this
                // node first among equals (no network hop).
                let score = (fits as i64) << 40
                    | (c.free_compute as i64) << 1
                    | (c.node == inner.name) as i64;
                (c.node, score)
            })
            .collect();
        // Hosts that did not report capacity still get a try, last.
        for h in &hosts {
            if !order.iter().any(|(n, _)| n == h) {
                order.push((h.clone(), -1));
            }
        }
        order.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let body = encode(
            &inner.name,
            &format!("input of GPU task `{kind}` ({})", type_name::<Q>()),
            &input,
        )?;
        let mut refusals = Vec::new();
        let mut soonest: Option<Duration> = None;
        for (node, _) in order {
            let out = if node == inner.name {
                let host = read(&inner.gpu).clone();
                match host {
                    Some(h) => {
                        h.run(&node, kind, need.clone(), body.clone(), timeout)
                            .await
                    }
                    None => continue,
                }
            } else {
                let Some(cell) = inner.node_cell(&node) else {
                    continue;
                };
                let frame = Frame::GpuRun {
                    kind: kind.to_owned(),
                    need: need.clone(),
                    body: serde_bytes::ByteBuf::from(body.clone()),
                    timeout_ms: timeout.as_millis() as u64,
                };
                let wait =
                    timeout + Duration::from_millis(need.start_within_ms) + Duration::from_secs(1);
                inner
                    .call(&node, &cell, &frame, &format!("GPU task {kind}"), wait)
                    .await
            };
            match out {
                Ok(bytes) => {
                    let output =
                        decode(&inner.name, &format!("output of GPU task `{kind}`"), &bytes)?;
                    metrics::counter!("troupe_cluster_gpu_tasks_total", "node" => node.clone())
                        .increment(1);
                    return Ok(GpuRun { node, output });
                }
                Err(ClusterError::NoGpuCapacity {
                    retry_after,
                    detail,
                    ..
                }) => {
                    if !retry_after.is_zero() {
                        soonest = Some(soonest.map_or(retry_after, |s| s.min(retry_after)));
                    }
                    refusals.push(detail);
                }
                Err(e @ (ClusterError::NodeDown { .. } | ClusterError::Overloaded { .. })) => {
                    refusals.push(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        metrics::counter!("troupe_cluster_gpu_refusals_total").increment(1);
        Err(ClusterError::NoGpuCapacity {
            kind: kind.to_owned(),
            retry_after: soonest.unwrap_or(Duration::from_millis(need.expected_ms.max(100))),
            detail: refusals.join("; "),
        })
    }
}

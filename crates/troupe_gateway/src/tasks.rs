//! Tasks: accepted work, journaled before it is acknowledged, run by a
//! bounded pool of workers, resumed after a crash.
//!
//! A task is a durable entity (`task/<id>`): `submitted`, then per attempt
//! `started`, then one of `succeeded`, `failed`, `refused` (with a retry
//! hint) or `cancelled`. The queue between acceptance and the workers is
//! bounded ([`crate::GatewayConfig::task_queue`]): a full queue refuses new
//! work with 429 *before* anything is journaled. On start-up every task
//! that was submitted or running is queued again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use ractor::RpcReplyPort;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use troupe_actor::{Effect, Entities, EntityConfig, EventSourced};
use troupe_agent::{
    AgentError, AgentSystem, ChatMessage, ChatRequest, Chunk, Holder, Inference, LeaseSpec,
};
use troupe_journal::{Journal, PersistenceId, Schema, now_ms};
use troupe_runtime::Troupe;

use crate::error::GatewayError;

/// What a task does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskKind {
    /// One inference: a prompt, answered by the configured model under a lease.
    Inference {
        /// The prompt.
        prompt: String,
        /// GPU priority (0 to 3).
        priority: u8,
        /// Most tokens to generate.
        max_tokens: Option<u32>,
    },
    /// Answer a turn of a session.
    SessionTurn {
        /// Session id.
        session: String,
        /// The turn.
        turn: u32,
    },
}

/// Where a task is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum TaskStatus {
    /// Accepted, waiting for a worker.
    Queued,
    /// A worker runs it.
    Running {
        /// Attempt (more than 1 after a crash).
        attempt: u32,
    },
    /// Done.
    Succeeded {
        /// The result.
        result: Value,
    },
    /// Failed for good.
    Failed {
        /// Why.
        error: String,
    },
    /// Refused for overload; may be submitted again after the hint.
    Refused {
        /// Why.
        reason: String,
        /// Retry hint.
        retry_after_ms: u64,
    },
    /// Cancelled by its tenant.
    Cancelled,
}

impl TaskStatus {
    /// Whether the task is finished.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, TaskStatus::Queued | TaskStatus::Running { .. })
    }
}

/// Journaled task events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskEvent {
    /// Accepted.
    Submitted {
        /// Owning tenant.
        tenant: String,
        /// What to do.
        task: TaskKind,
        /// When.
        at_ms: u64,
    },
    /// An attempt started.
    Started {
        /// Attempt.
        attempt: u32,
    },
    /// Ended.
    Ended {
        /// How (a terminal status).
        status: TaskStatus,
        /// When.
        at_ms: u64,
    },
}

impl Schema for TaskEvent {
    const TYPE_NAME: &'static str = "gateway.TaskEvent";
}

/// A task's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    /// Owning tenant ("" if never submitted).
    pub tenant: String,
    /// What it does.
    pub task: Option<TaskKind>,
    /// Where it is.
    pub status: Option<TaskStatus>,
    /// Attempts started.
    pub attempts: u32,
    /// Accepted at.
    pub submitted_ms: u64,
    /// Ended at.
    pub ended_ms: Option<u64>,
}

impl Schema for TaskState {
    const TYPE_NAME: &'static str = "gateway.TaskState";
}

type Reply<T> = RpcReplyPort<Result<T, GatewayError>>;

/// Commands of a task entity.
pub enum TaskCommand {
    /// Accept; answers false when the task exists already (an
    /// `Idempotency-Key` retry, or a race with one).
    Submit(String, TaskKind, Reply<bool>),
    /// Start an attempt (refused once ended).
    Start(Reply<u32>),
    /// End the attempt with a terminal status (ignored once ended).
    End(TaskStatus, Reply<bool>),
    /// Read.
    Get(Reply<TaskState>),
}

#[cfg(feature = "cluster")]
impl ractor::Message for TaskCommand {}

/// The task entity.
pub struct TaskEntity;

impl EventSourced for TaskEntity {
    type Command = TaskCommand;
    type Event = TaskEvent;
    type State = TaskState;
    const KIND: &'static str = "task";

    fn handle(&self, state: &TaskState, command: TaskCommand) -> Effect<Self> {
        let ended = state.status.as_ref().is_some_and(TaskStatus::is_terminal);
        match command {
            TaskCommand::Submit(tenant, task, reply) => {
                if state.status.is_some() {
                    let _ = reply.send(Ok(false));
                    return Effect::none();
                }
                Effect::persist_one(TaskEvent::Submitted {
                    tenant,
                    task,
                    at_ms: now_ms(),
                })
                .reply_result(reply, |_| Ok(true))
            }
            TaskCommand::Start(reply) => {
                if ended || state.status.is_none() {
                    let _ = reply.send(Err(GatewayError::Conflict("task has ended".into())));
                    return Effect::none();
                }
                let attempt = state.attempts + 1;
                Effect::persist_one(TaskEvent::Started { attempt })
                    .reply_result(reply, move |_| Ok(attempt))
            }
            TaskCommand::End(status, reply) => {
                if ended || state.status.is_none() || !status.is_terminal() {
                    let _ = reply.send(Ok(false));
                    return Effect::none();
                }
                Effect::persist_one(TaskEvent::Ended {
                    status,
                    at_ms: now_ms(),
                })
                .reply_result(reply, |_| Ok(true))
            }
            TaskCommand::Get(reply) => {
                let _ = reply.send(Ok(state.clone()));
                Effect::none()
            }
        }
    }

    fn apply(state: &mut TaskState, event: &TaskEvent) {
        match event {
            TaskEvent::Submitted {
                tenant,
                task,
                at_ms,
            } => {
                state.tenant = tenant.clone();
                state.task = Some(task.clone());
                state.status = Some(TaskStatus::Queued);
                state.submitted_ms = *at_ms;
            }
            TaskEvent::Started { attempt } => {
                state.attempts = *attempt;
                state.status = Some(TaskStatus::Running { attempt: *attempt });
            }
            TaskEvent::Ended { status, at_ms } => {
                state.status = Some(status.clone());
                state.ended_ms = Some(*at_ms);
            }
        }
    }
}

/// Accepts, runs and cancels tasks. Cheap to clone.
#[derive(Clone)]
pub struct Tasks {
    entities: Entities<TaskEntity>,
    journal: Arc<dyn Journal>,
    queue: mpsc::Sender<String>,
    /// Tasks accepted and not ended, per tenant (`quota.max_tasks`).
    per_tenant: crate::api::Counts,
    /// The count each such task holds, by task id.
    held: Arc<Mutex<HashMap<String, crate::api::CountGuard>>>,
    running: Arc<Mutex<HashMap<String, tokio::task::AbortHandle>>>,
    /// The worker loops (each holds a clone of this, queue sender
    /// included, so they end only when stopped).
    workers: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    ask_timeout: Duration,
}

/// How workers run tasks.
#[derive(Clone)]
pub struct Runner {
    /// Models and leases.
    pub inference: Inference,
    /// The agents (a session turn is answered by the session's agent).
    pub agents: AgentSystem,
    /// Backend name and model for inference tasks.
    pub backend: (String, String),
    /// Lease of one inference (priority set per task).
    pub lease: LeaseSpec,
    /// Longest lease hold of each tenant's tasks (`quota.max_lease_hold_ms`).
    pub holds: Arc<HashMap<String, Duration>>,
}

impl Tasks {
    /// Tasks journaled in `troupe`'s journal, queue of `queue` slots,
    /// `workers` at once. Their entities are the system's: its shutdown
    /// passivates them, so none holds the journal after it.
    pub fn start(troupe: &Troupe, queue: usize, workers: usize, runner: Runner) -> Self {
        let config = EntityConfig {
            idle_timeout: Some(Duration::from_secs(30)),
            ..EntityConfig::default()
        };
        let (tx, rx) = mpsc::channel(queue);
        let tasks = Self {
            entities: troupe.entities(TaskEntity, config),
            journal: troupe.journal(),
            queue: tx,
            per_tenant: crate::api::Counts::default(),
            held: Arc::new(Mutex::new(HashMap::new())),
            running: Arc::new(Mutex::new(HashMap::new())),
            workers: Arc::new(Mutex::new(Vec::new())),
            ask_timeout: Duration::from_secs(10),
        };
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tasks, rx, runner) = (tasks.clone(), rx.clone(), runner.clone());
            let worker = tokio::spawn(async move {
                loop {
                    let Some(id) = rx.lock().await.recv().await else {
                        return;
                    };
                    tasks.run_one(&id, &runner).await;
                }
            });
            handles.push(worker.abort_handle());
        }
        *tasks.workers.lock().unwrap_or_else(|p| p.into_inner()) = handles;
        tasks
    }

    /// Stops the workers and the tasks they run (their journal states stay
    /// as they are: a restart resumes them). Called on shutdown; without it
    /// the workers would keep the journal open.
    pub fn stop(&self) {
        for w in self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            w.abort();
        }
        for (_, t) in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            t.abort();
        }
    }

    async fn ask<T: Send + 'static>(
        &self,
        id: &str,
        build: impl FnOnce(Reply<T>) -> TaskCommand,
    ) -> Result<T, GatewayError> {
        self.entities.ask(id, build, self.ask_timeout).await?
    }

    /// A slot in the queue, or 429 when it is full: take it before
    /// journaling anything the task depends on.
    pub fn reserve(&self) -> Result<mpsc::Permit<'_, String>, GatewayError> {
        self.queue.try_reserve().map_err(|_| {
            metrics::counter!("troupe_gateway_refused_total", "reason" => "queue_full")
                .increment(1);
            GatewayError::Overloaded {
                reason: format!("task queue full ({} waiting)", self.queue.max_capacity()),
                retry_after: Duration::from_secs(1),
            }
        })
    }

    /// Journals a new task of `tenant` (under `id`, or a fresh one) and
    /// queues it in the reserved slot. A tenant with `max_tasks` tasks not
    /// ended is refused (429). An `id` that exists already (a retry) is
    /// not queued again: the same request answers with it, another one is
    /// refused ([`GatewayError::KeyReused`]).
    pub async fn submit(
        &self,
        permit: mpsc::Permit<'_, String>,
        tenant: &str,
        max_tasks: usize,
        id: Option<String>,
        task: TaskKind,
    ) -> Result<String, GatewayError> {
        let (id, created) = self.journal_with(tenant, max_tasks, id, task).await?;
        if created {
            permit.send(id.clone());
        }
        Ok(id)
    }

    /// Journals a new task without queueing it: for work that must be
    /// journaled before something else is (see [`Tasks::enqueue`],
    /// [`Tasks::abandon`]).
    /// `id` names it (a fresh id when `None`); returns the id and whether
    /// it was journaled now (false: task `id` exists as this same request).
    pub async fn journal_new(
        &self,
        tenant: &str,
        max_tasks: usize,
        id: Option<String>,
        task: TaskKind,
    ) -> Result<(String, bool), GatewayError> {
        self.journal_with(tenant, max_tasks, id, task).await
    }

    async fn journal_with(
        &self,
        tenant: &str,
        max_tasks: usize,
        id: Option<String>,
        task: TaskKind,
    ) -> Result<(String, bool), GatewayError> {
        let id = id.unwrap_or_else(|| format!("{:024x}", rand::random::<u128>() >> 32));
        let Some(count) = self.per_tenant.take(tenant, max_tasks) else {
            metrics::counter!("troupe_gateway_refused_total", "reason" => "tenant_tasks")
                .increment(1);
            return Err(GatewayError::Overloaded {
                reason: format!(
                    "tenant `{tenant}` has {max_tasks} tasks not yet ended (quota.max_tasks)"
                ),
                retry_after: Duration::from_secs(1),
            });
        };
        let owner = tenant.to_owned();
        let again = task.clone();
        let created = self
            .ask(&id, |r| TaskCommand::Submit(owner, task, r))
            .await?;
        if !created {
            drop(count);
            return if self.same_request(tenant, &id, &again).await? {
                Ok((id, false))
            } else {
                Err(GatewayError::KeyReused(format!(
                    "task `{id}` exists: its `Idempotency-Key` was used for another request"
                )))
            };
        }
        self.lock_held().insert(id.clone(), count);
        metrics::counter!("troupe_gateway_tasks_accepted_total").increment(1);
        Ok((id, true))
    }

    /// Whether task `id` exists as `tenant`'s `task` (a retry); false when
    /// it does not exist (read from the journal: no entity is activated
    /// for an unknown id); [`GatewayError::KeyReused`] when it is another
    /// request.
    pub async fn same_request(
        &self,
        tenant: &str,
        id: &str,
        task: &TaskKind,
    ) -> Result<bool, GatewayError> {
        let pid = PersistenceId::new("task", id)?;
        if self.journal.highest_seq(&pid).await? == 0 {
            return Ok(false);
        }
        let state = self.ask(id, TaskCommand::Get).await?;
        if state.tenant == tenant && state.task.as_ref() == Some(task) {
            Ok(true)
        } else {
            Err(GatewayError::KeyReused(format!(
                "this `Idempotency-Key` was used for another request (task `{id}`)"
            )))
        }
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<String, crate::api::CountGuard>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The task has ended: its tenant's count is given back.
    fn release(&self, id: &str) {
        self.lock_held().remove(id);
    }

    /// Task entities in memory now.
    pub fn active_count(&self) -> usize {
        self.entities.active_count()
    }

    /// Queues a task journaled with [`Tasks::journal_new`].
    pub fn enqueue(&self, permit: mpsc::Permit<'_, String>, id: String) {
        permit.send(id);
    }

    /// Ends a journaled task that will not run, with `error`.
    pub async fn abandon(&self, id: &str, error: String) -> Result<(), GatewayError> {
        let r = self
            .ask(id, |r| TaskCommand::End(TaskStatus::Failed { error }, r))
            .await
            .map(drop);
        self.release(id);
        r
    }

    /// The task `id` if `tenant` owns it (404 otherwise).
    pub async fn get(&self, tenant: &str, id: &str) -> Result<TaskState, GatewayError> {
        let not_found = || GatewayError::NotFound {
            kind: "task",
            id: id.to_owned(),
        };
        let Ok(pid) = PersistenceId::new("task", id) else {
            return Err(not_found());
        };
        // Unknown ids are answered from the journal, activating nothing
        // (an active one is known: no read).
        if !self.entities.is_active(id) && self.journal.highest_seq(&pid).await? == 0 {
            return Err(not_found());
        }
        let state = self.ask(id, TaskCommand::Get).await?;
        if state.status.is_none() || state.tenant != tenant {
            return Err(not_found());
        }
        Ok(state)
    }

    /// Tasks of `tenant` accepted and not yet ended.
    pub fn tenant_count(&self, tenant: &str) -> usize {
        self.per_tenant.get(tenant)
    }

    /// What task `id` of `tenant` does, if it exists (read from the
    /// journal for an id not active: nothing is activated for an unknown one).
    pub async fn kind_of(&self, tenant: &str, id: &str) -> Result<Option<TaskKind>, GatewayError> {
        match self.get(tenant, id).await {
            Ok(state) => Ok(state.task),
            Err(GatewayError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Cancels a task of `tenant`: journaled, then its run (and lease) is
    /// dropped; a session turn is stopped and journaled as failed, so the
    /// session takes the next message. Returns the final state.
    pub async fn cancel(
        &self,
        tenant: &str,
        id: &str,
        agents: &AgentSystem,
    ) -> Result<TaskState, GatewayError> {
        let state = self.get(tenant, id).await?;
        let ended = self
            .ask(id, |r| TaskCommand::End(TaskStatus::Cancelled, r))
            .await?;
        if let Some(run) = self.lock_running().remove(id) {
            run.abort();
        }
        self.release(id);
        if ended && let Some(TaskKind::SessionTurn { session, .. }) = &state.task {
            agents.cancel_turn(session).await?;
        }
        self.get(tenant, id).await
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::AbortHandle>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues again every task that was submitted or running (after a
    /// restart), reading each task's events from the journal (finished
    /// tasks are not activated). Returns how many.
    pub async fn resume(&self, journal: &dyn Journal) -> Result<usize, GatewayError> {
        let mut after = PersistenceId::new("task", "\u{1}")?;
        let upcasters = troupe_journal::Upcasters::none();
        let mut n = 0;
        loop {
            let page = journal.persistence_ids(Some(&after), 1_000).await?;
            let Some(last) = page.last().cloned() else {
                break;
            };
            for pid in page.iter().filter(|p| p.kind() == "task") {
                // One unreadable task is reported and skipped: the others
                // still resume, and the server still starts.
                let state = match troupe_actor::recover::<TaskEntity>(journal, pid, upcasters).await
                {
                    Ok((state, _)) => state,
                    Err(e) if e.is_transient() => return Err(e.into()),
                    Err(e) => {
                        tracing::error!(task = %pid, error = %e, "task record cannot be read; not resumed");
                        metrics::counter!("troupe_gateway_tasks_unreadable_total").increment(1);
                        continue;
                    }
                };
                if state.status.as_ref().is_some_and(|s| !s.is_terminal()) {
                    // Counted against its tenant, past the quota if need
                    // be: it was accepted.
                    if let Some(c) = self.per_tenant.take(&state.tenant, usize::MAX) {
                        self.lock_held().insert(pid.key().to_owned(), c);
                    }
                    self.queue
                        .send(pid.key().to_owned())
                        .await
                        .map_err(|_| GatewayError::unavailable("task queue closed"))?;
                    n += 1;
                }
            }
            if last.kind() != "task" {
                break;
            }
            after = last;
        }
        Ok(n)
    }

    async fn run_one(&self, id: &str, runner: &Runner) {
        let Ok(attempt) = self.ask(id, TaskCommand::Start).await else {
            self.release(id);
            return; // cancelled while queued
        };
        let Ok(state) = self.ask(id, TaskCommand::Get).await else {
            self.release(id);
            return;
        };
        let Some(task) = state.task else {
            self.release(id);
            return;
        };
        let work = {
            let runner = runner.clone();
            let holder = format!("task/{id}#{attempt}");
            let tenant = state.tenant.clone();
            tokio::spawn(async move { execute(&runner, &holder, &tenant, task).await })
        };
        self.lock_running()
            .insert(id.to_owned(), work.abort_handle());
        let status = match work.await {
            Ok(Ok(result)) => TaskStatus::Succeeded { result },
            Ok(Err(AgentError::Overloaded {
                retry_after,
                reason,
            })) => TaskStatus::Refused {
                reason,
                retry_after_ms: retry_after.as_millis() as u64,
            },
            Ok(Err(e)) => TaskStatus::Failed {
                error: e.to_string(),
            },
            Err(_) => {
                // Aborted: `cancel` journaled the end already.
                self.lock_running().remove(id);
                return;
            }
        };
        self.lock_running().remove(id);
        let outcome = match &status {
            TaskStatus::Succeeded { .. } => "succeeded",
            TaskStatus::Refused { .. } => "refused",
            _ => "failed",
        };
        metrics::counter!("troupe_gateway_tasks_total", "outcome" => outcome).increment(1);
        if let Err(e) = self.ask(id, |r| TaskCommand::End(status, r)).await {
            tracing::warn!(task = id, error = %e, "could not journal a task's end");
        }
        self.release(id);
    }
}

async fn execute(
    runner: &Runner,
    holder: &str,
    tenant: &str,
    task: TaskKind,
) -> Result<Value, AgentError> {
    match task {
        TaskKind::Inference {
            prompt,
            priority,
            max_tokens,
        } => {
            let mut request =
                ChatRequest::new(runner.backend.1.clone(), vec![ChatMessage::user(prompt)]);
            request.max_tokens = max_tokens;
            let hold = runner
                .holds
                .get(tenant)
                .copied()
                .unwrap_or(runner.lease.max_hold);
            let lease = LeaseSpec {
                priority,
                max_hold: hold.min(runner.lease.max_hold),
                ..runner.lease.clone()
            };
            let holder = Holder {
                name: holder.to_owned(),
                actor: None,
            };
            let mut stream = runner
                .inference
                .stream(&runner.backend.0, request, &lease, &holder)
                .await?;
            let mut text = String::new();
            let mut finish = None;
            while let Some(chunk) = stream.next().await {
                match chunk? {
                    Chunk::Text(t) => text.push_str(&t),
                    Chunk::ToolCall(_) => {}
                    Chunk::Done {
                        finish_reason,
                        usage,
                    } => finish = Some((finish_reason, usage)),
                }
            }
            let (finish_reason, usage) = finish.ok_or_else(|| AgentError::StreamClosed {
                backend: runner.backend.0.clone(),
                chunks: 0,
            })?;
            Ok(json!({ "text": text, "finish_reason": finish_reason, "usage": usage }))
        }
        TaskKind::SessionTurn { session, turn } => {
            let outcome = match runner.agents.answer(&session, turn).await {
                Ok(o) => o,
                // Answered (or failed) before a restart lost the task's end.
                Err(AgentError::NothingToAnswer(_)) => {
                    return Ok(
                        json!({ "session": session, "turn": turn, "answered_before_restart": true }),
                    );
                }
                Err(e) => return Err(e),
            };
            Ok(json!({
                "session": session,
                "turn": outcome.turn.turn,
                "attempt": outcome.turn.attempt,
                "text": outcome.text,
                "seq": outcome.seq,
            }))
        }
    }
}

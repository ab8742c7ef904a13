//! The agent system: agent kinds by name, the sessions they answer, the
//! models, topics and timers they share.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use troupe_actor::{Timer, Timers};
use troupe_journal::PersistenceId;

use crate::agent::{Agent, AgentKey, AgentKind, AgentOptions, TurnOutcome};
use crate::error::AgentError;
use crate::inference::Inference;
use crate::session::{SESSION_KIND, SessionEntity, Sessions, TurnDispatch};
use crate::topic::Topics;

type Done = tokio::sync::oneshot::Sender<Result<TurnOutcome, AgentError>>;

/// One registered kind, whatever its agent type.
pub(crate) trait KindDyn: Send + Sync + 'static {
    fn as_any(&self) -> &dyn Any;
    /// Sends a turn job to `session`'s instance; a job that cannot be sent
    /// fails the turn in the session (and `done`).
    fn dispatch_turn(&self, session: String, turn: u32, done: Option<Done>) -> BoxFuture<'_, ()>;
    fn cancel(&self, key: &str) -> bool;
    fn passivate_all(&self) -> BoxFuture<'_, ()>;
    fn active_count(&self) -> usize;
    fn deliver_timer(&self, timer: Timer) -> BoxFuture<'_, Result<(), String>>;
}

impl<A: Agent> KindDyn for AgentKind<A> {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn dispatch_turn(&self, session: String, turn: u32, done: Option<Done>) -> BoxFuture<'_, ()> {
        async move {
            // `dispatch` answers `done` itself when the job is refused.
            if let Err(e) = self.dispatch(&session, turn, done).await
                && let Some(system) = self.core.system.upgrade()
            {
                tracing::warn!(agent = self.name(), session, error = %e, "cannot dispatch a turn");
                let _ = system.sessions.fail_pending(&session, turn, &e).await;
            }
        }
        .boxed()
    }

    fn cancel(&self, key: &str) -> bool {
        AgentKind::cancel(self, key)
    }

    fn passivate_all(&self) -> BoxFuture<'_, ()> {
        AgentKind::passivate_all(self).boxed()
    }

    fn active_count(&self) -> usize {
        AgentKind::active_count(self)
    }

    fn deliver_timer(&self, timer: Timer) -> BoxFuture<'_, Result<(), String>> {
        AgentKind::deliver_timer(self, timer).boxed()
    }
}

pub(crate) struct SystemInner {
    kinds: RwLock<HashMap<String, Arc<dyn KindDyn>>>,
    pub(crate) sessions: Sessions,
    inference: Inference,
    topics: Topics,
    timers: Option<Timers>,
    ask_timeout: Duration,
    lease_hold: RwLock<Option<LeaseHoldLimit>>,
    blobs: Option<troupe_journal::BlobStore>,
}

/// The longest a session's turn may hold a GPU lease, by the tenant that
/// owns the session (`None`: no limit beyond the agent's own), as set with
/// [`AgentSystem::set_tenant_lease_hold`].
pub type LeaseHoldLimit = Arc<dyn Fn(&str) -> Option<Duration> + Send + Sync>;

impl TurnDispatch for SystemInner {
    fn dispatch(&self, session: String, agent: String, turn: u32) -> BoxFuture<'static, ()> {
        let kind = self.kind(&agent);
        let sessions = self.sessions.clone();
        async move {
            match kind {
                Ok(k) => k.dispatch_turn(session, turn, None).await,
                Err(e) => {
                    let _ = sessions.fail_pending(&session, turn, &e).await;
                }
            }
        }
        .boxed()
    }
}

impl SystemInner {
    fn kind(&self, name: &str) -> Result<Arc<dyn KindDyn>, AgentError> {
        self.kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::UnknownAgent(name.to_owned()))
    }
}

/// Settings of an [`AgentSystem`].
#[derive(Clone, Default)]
pub struct SystemConfig {
    /// Durable timers for [`crate::Context::schedule_at`] (none: agents
    /// cannot schedule timers).
    pub timers: Option<Timers>,
    /// Default time-out of `send` and `ask` on agent handles (30 s if
    /// unset).
    pub ask_timeout: Option<Duration>,
    /// Where attachments' bytes are read from, for backends that take them
    /// as content parts ([`crate::ModelBackend::accepts`]).
    pub blobs: Option<troupe_journal::BlobStore>,
}

/// Agent kinds by name, with the sessions, models, topics and timers they
/// share. Cheap to clone. [`Troupe::builder`](https://docs.rs/troupe)
/// builds one; tests may build one directly with [`AgentSystem::new`].
#[derive(Clone)]
pub struct AgentSystem {
    inner: Arc<SystemInner>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl AgentSystem {
    /// A system over these sessions and models, without timers. Posting a
    /// turn to one of its sessions dispatches it to the session's agent.
    pub fn new(sessions: Sessions, inference: Inference) -> Self {
        Self::with_config(sessions, inference, SystemConfig::default())
    }

    /// A system with these settings.
    pub fn with_config(sessions: Sessions, inference: Inference, config: SystemConfig) -> Self {
        let inner = Arc::new(SystemInner {
            kinds: RwLock::new(HashMap::new()),
            sessions,
            inference,
            topics: Topics::new(),
            timers: config.timers,
            ask_timeout: config.ask_timeout.unwrap_or(Duration::from_secs(30)),
            lease_hold: RwLock::new(None),
            blobs: config.blobs,
        });
        let weak: Weak<dyn TurnDispatch> = Arc::downgrade(&inner) as Weak<dyn TurnDispatch>;
        inner.sessions.set_dispatcher(weak);
        if let Some(timers) = &inner.timers {
            // Approval deadlines: the rejection is journaled at the deadline,
            // whether or not the waiting turn is running.
            let weak = Arc::downgrade(&inner);
            timers.register(crate::turn::APPROVAL_TIMER, move |timer: Timer| {
                let weak = weak.clone();
                async move {
                    let inner = weak.upgrade().ok_or("the agent system is gone")?;
                    let Ok(t) =
                        serde_json::from_slice::<crate::turn::ApprovalTimer>(&timer.payload)
                    else {
                        tracing::warn!(
                            timer = timer.id,
                            "an approval timer with a payload this version cannot read: dropped"
                        );
                        return Ok(());
                    };
                    let decision = crate::session::Decision::deadline();
                    match inner
                        .sessions
                        .decide(&timer.target.key, &t.call_id, decision)
                        .await
                    {
                        Ok(_)
                        | Err(AgentError::AlreadyDecided { .. })
                        | Err(AgentError::UnknownApproval { .. })
                        | Err(AgentError::UnknownSession(_))
                        | Err(AgentError::SessionClosed(_)) => Ok(()),
                        Err(e) => Err(format!("turn {} of `{}`: {e}", t.turn, timer.target.key)),
                    }
                }
                .boxed()
            });
        }
        Self { inner }
    }

    pub(crate) fn from_inner(inner: Arc<SystemInner>) -> Self {
        Self { inner }
    }

    /// Caps the lease hold of the turns of each tenant's sessions: a turn
    /// of a session owned by `t` holds its GPU lease at most `limit(t)`
    /// (or its agent's [`crate::LeaseSpec::max_hold`], whichever is
    /// shorter), then fails with `lease_lost` and frees it. A server with
    /// per-tenant quotas sets it; turns that begin afterwards follow it.
    pub fn set_tenant_lease_hold(
        &self,
        limit: impl Fn(&str) -> Option<Duration> + Send + Sync + 'static,
    ) {
        *self
            .inner
            .lease_hold
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(limit));
    }

    /// The lease a turn of a session owned by `tenant` takes: `lease`,
    /// its hold capped by [`AgentSystem::set_tenant_lease_hold`].
    pub fn lease_for(&self, tenant: Option<&str>, lease: &crate::LeaseSpec) -> crate::LeaseSpec {
        let mut lease = lease.clone();
        let limit = self
            .inner
            .lease_hold
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let (Some(limit), Some(tenant)) = (limit, tenant)
            && let Some(max) = limit(tenant)
        {
            lease.max_hold = lease.max_hold.min(max);
        }
        lease
    }

    /// The default time-out of `send` and `ask`.
    pub fn ask_timeout(&self) -> Duration {
        self.inner.ask_timeout
    }

    /// The sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    /// The blob store attachments are read from, if any.
    pub fn blobs(&self) -> Option<&troupe_journal::BlobStore> {
        self.inner.blobs.as_ref()
    }

    /// The topics.
    pub fn topics(&self) -> &Topics {
        &self.inner.topics
    }

    /// The models.
    pub fn inference(&self) -> &Inference {
        &self.inner.inference
    }

    /// The durable timers, if the system has them.
    pub fn timers(&self) -> Option<&Timers> {
        self.inner.timers.as_ref()
    }

    /// Registers agent kind `key` with the value its instances share and
    /// their options. Names are unique.
    pub async fn register<A: Agent>(
        &self,
        key: &AgentKey<A>,
        agent: A,
        options: AgentOptions,
    ) -> Result<AgentKind<A>, AgentError> {
        let name = key.name();
        if !valid_name(name) {
            return Err(AgentError::Invalid {
                what: "agent name".into(),
                message: format!("`{name}`: 1 to 64 letters, digits, `-`, `_` or `.`"),
            });
        }
        let kind = {
            let mut kinds = self.inner.kinds.write().unwrap_or_else(|p| p.into_inner());
            if kinds.contains_key(name) {
                return Err(AgentError::DuplicateAgent(name.to_owned()));
            }
            let kind = AgentKind::new(
                name,
                agent,
                options,
                Arc::downgrade(&self.inner),
                self.inner.ask_timeout,
            );
            kinds.insert(name.to_owned(), Arc::new(kind.clone()));
            kind
        };
        if let Some(timers) = &self.inner.timers {
            let weak = Arc::downgrade(&self.inner);
            let kind_name = name.to_owned();
            timers.register(&format!("agent.{name}"), move |timer: Timer| {
                let weak = weak.clone();
                let kind_name = kind_name.clone();
                async move {
                    let inner = weak.upgrade().ok_or("the agent system is gone")?;
                    let kind = inner.kind(&kind_name).map_err(|e| e.to_string())?;
                    kind.deliver_timer(timer).await
                }
                .boxed()
            });
        }
        Ok(kind)
    }

    /// The kind registered under `key`.
    pub fn agent<A: Agent>(&self, key: &AgentKey<A>) -> Result<AgentKind<A>, AgentError> {
        self.agent_named(key.name())
    }

    pub(crate) fn agent_named<A: Agent>(&self, name: &str) -> Result<AgentKind<A>, AgentError> {
        let kind = self.inner.kind(name)?;
        kind.as_any()
            .downcast_ref::<AgentKind<A>>()
            .cloned()
            .ok_or_else(|| AgentError::WrongAgentType {
                name: name.to_owned(),
                expected: std::any::type_name::<A>(),
            })
    }

    pub(crate) fn kind_dyn(&self, name: &str) -> Result<Arc<dyn KindDyn>, AgentError> {
        self.inner.kind(name)
    }

    /// Names of the registered kinds, sorted.
    pub fn agents(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Instances in memory now, all kinds together.
    pub fn active_instances(&self) -> usize {
        self.all_kinds().iter().map(|k| k.active_count()).sum()
    }

    fn all_kinds(&self) -> Vec<Arc<dyn KindDyn>> {
        self.inner
            .kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Has the session's agent (the one the turn was handed to, if any)
    /// answer pending turn `turn` of `session`, and waits for the outcome.
    /// A turn already ended is [`AgentError::NothingToAnswer`].
    pub async fn answer(&self, session: &str, turn: u32) -> Result<TurnOutcome, AgentError> {
        let pending = self.sessions().pending(session).await?;
        let Some(pending) = pending.filter(|p| p.turn == turn) else {
            return Err(AgentError::NothingToAnswer(session.to_owned()));
        };
        let kind = self.kind_dyn(&pending.agent)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        kind.dispatch_turn(session.to_owned(), turn, Some(tx)).await;
        match rx.await {
            Ok(r) => r,
            // The instance died with the turn (it is answered again by a
            // new attempt), or handed it on: wait for its end in the session.
            Err(_) => self.wait_turn_end(session, turn).await,
        }
    }

    /// Waits for turn `turn` of `session` to end, reading the session: its
    /// outcome as journaled (the last attempt's text), or its failure.
    pub async fn wait_turn_end(&self, session: &str, turn: u32) -> Result<TurnOutcome, AgentError> {
        use crate::session::{SessionEvent, SessionItem, TurnRef};
        use futures::StreamExt;
        let mut events = self.sessions().subscribe(session, 0).await?;
        let mut outcome = TurnOutcome {
            turn: TurnRef { turn, attempt: 0 },
            text: String::new(),
            tool_calls: 0,
            chunks: 0,
            seq: 0,
            usage: None,
        };
        while let Some(item) = events.next().await {
            let SessionItem::Event(rec) = item? else {
                continue;
            };
            match &rec.event {
                SessionEvent::TurnStarted {
                    turn: t, attempt, ..
                } if *t == turn => {
                    outcome.turn.attempt = *attempt;
                    outcome.text.clear();
                    outcome.chunks = 0;
                }
                SessionEvent::ModelChunk { turn: t, text } if *t == turn => {
                    outcome.text.push_str(text);
                    outcome.chunks += 1;
                }
                SessionEvent::ToolCalled { turn: t, .. } if *t == turn => {
                    outcome.text.clear();
                    outcome.tool_calls += 1;
                }
                SessionEvent::AnswerRejected { turn: t, .. } if *t == turn => {
                    outcome.text.clear();
                }
                SessionEvent::TurnCompleted { turn: t, usage, .. } if *t == turn => {
                    outcome.seq = rec.seq;
                    outcome.usage = *usage;
                    return Ok(outcome);
                }
                SessionEvent::TurnFailed {
                    turn: t,
                    error,
                    retry_after_ms,
                } if *t == turn => {
                    return Err(AgentError::TurnFailed {
                        session: session.to_owned(),
                        turn,
                        error: error.clone(),
                        retry_after: retry_after_ms.map(Duration::from_millis),
                    });
                }
                SessionEvent::Closed { .. } => {
                    return Err(AgentError::SessionClosed(session.to_owned()));
                }
                _ => {}
            }
        }
        Err(AgentError::StreamClosed {
            backend: "session".into(),
            chunks: outcome.chunks,
        })
    }

    /// Cancels the turn in progress of `session`: a turn being answered is
    /// stopped (its lease freed), and the turn is journaled as failed, so
    /// the session takes the next message. Returns whether a turn was
    /// pending.
    pub async fn cancel_turn(&self, session: &str) -> Result<bool, AgentError> {
        let view = self.sessions().view(session).await?;
        let Some(pending) = view.pending else {
            return Ok(false);
        };
        let cancelled = AgentError::Failed {
            agent: view.answering_agent().to_owned(),
            message: "the turn was cancelled".into(),
        };
        if let Ok(kind) = self.kind_dyn(view.answering_agent()) {
            kind.cancel(session);
        }
        // Whether or not it was running here, the turn ends as failed.
        self.sessions()
            .fail_pending(session, pending.turn, &cancelled)
            .await?;
        Ok(true)
    }

    /// Dispatches every turn left pending by an earlier run (a crash, a
    /// restart) to its agent; returns how many. Reads each session's
    /// journal once, so it costs a scan of the sessions at start.
    pub async fn resume_turns(&self) -> Result<usize, AgentError> {
        let journal = self.sessions().journal().clone();
        let upcasters = troupe_journal::Upcasters::none();
        let mut after = PersistenceId::new(SESSION_KIND, "\u{1}")?;
        let mut n = 0;
        loop {
            let page = journal.persistence_ids(Some(&after), 1_000).await?;
            let Some(last) = page.last().cloned() else {
                break;
            };
            for pid in page.iter().filter(|p| p.kind() == SESSION_KIND) {
                let (state, _) =
                    troupe_actor::recover::<SessionEntity>(&*journal, pid, upcasters).await?;
                let Some(pending) = state.pending_turn() else {
                    continue;
                };
                let agent = pending.1.unwrap_or(state.agent.clone());
                let session = pid.key().to_owned();
                match self.kind_dyn(&agent) {
                    Ok(k) => k.dispatch_turn(session, pending.0, None).await,
                    Err(e) => {
                        self.sessions()
                            .fail_pending(&session, pending.0, &e)
                            .await?;
                    }
                }
                n += 1;
            }
            if last.kind() != SESSION_KIND {
                break;
            }
            after = last;
        }
        Ok(n)
    }

    /// Passivates every agent instance (draining their mailboxes) and waits.
    pub async fn passivate_all(&self) {
        let kinds = self.all_kinds();
        futures::future::join_all(kinds.iter().map(|k| k.passivate_all())).await;
    }

    /// Passivates every instance (their turns finish first).
    pub async fn stop(&self) {
        self.passivate_all().await;
    }
}

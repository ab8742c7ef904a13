//! Event-sourced actors: decide, persist, apply, reply.
//!
//! A user type implements [`EventSourced`]: [`handle`](EventSourced::handle)
//! looks at a command and the current state and returns an [`Effect`]
//! (events to persist and what to do once they are); [`apply`](EventSourced::apply)
//! folds one event into the state. The runtime ([`DurableActor`]):
//!
//! 1. appends the effect's events to the journal (optimistically, at the
//!    sequence it knows; group commit makes this cheap under load);
//! 2. only then applies them to the in-memory state;
//! 3. only then runs the effect's reply.
//!
//! So a reply never runs ahead of the journal and the state never holds an
//! event the journal does not. On start the actor recovers: the latest
//! snapshot, then a streamed replay of the events after it.
//!
//! ## When an append fails
//!
//! | [`AppendFailure`] | what happens | pick it when |
//! |---|---|---|
//! | `Stop` (default) | the actor fails; its supervisor restarts it and it recovers from the journal | a supervisor is in charge |
//! | `Retry { attempts, backoff }` | the same append is retried with backoff; still failing, the actor fails as with `Stop` | the journal has short hiccups |
//!
//! A retry that meets a `SeqConflict` means the first attempt was in fact
//! written (its acknowledgement was lost) or another incarnation wrote: the
//! actor fails and recovers rather than guess. In every failure case a
//! port answered with [`Effect::reply_result`] gets the journal's error
//! ([`ActorError::Journal`](crate::ActorError::Journal), which says whether
//! it is transient), and one answered with [`Effect::reply`] is dropped,
//! so its caller gets [`ActorError::NoReply`](crate::ActorError::NoReply).
//! Either way the outcome is unknown (an append whose acknowledgement was
//! lost may have been written): the recovered state says what happened.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ractor::{ActorProcessingErr, ActorRef};
use troupe_journal::{
    Journal, JournalError, NewEvent, NewSnapshot, PersistenceId, Schema, Upcasters,
};

use crate::error::ActorError;

/// A durable, event-sourced entity. See the [module docs](self).
pub trait EventSourced: Send + Sync + 'static {
    /// What callers send. Commands that want an answer carry a
    /// [`ractor::RpcReplyPort`]. Every `Send + 'static` type is a
    /// [`ractor::Message`], unless ractor is built with its `cluster`
    /// feature (Troupe's `cluster` feature), where the command type needs
    /// an (empty) `impl ractor::Message for MyCommand {}`.
    type Command: ractor::Message;
    /// What is journaled.
    type Event: Schema + Send + Sync + 'static;
    /// What the events fold into; also the snapshot payload.
    type State: Schema + Default + Send + Sync + 'static;

    /// The kind part of this entity's persistence ids (`kind/key`).
    const KIND: &'static str;

    /// Decides what a command does. Must not mutate anything: effects go in
    /// the returned [`Effect`].
    fn handle(&self, state: &Self::State, command: Self::Command) -> Effect<Self>;

    /// Folds one event into the state. Must be deterministic: it runs again
    /// on every recovery.
    fn apply(state: &mut Self::State, event: &Self::Event);

    /// Blobs an event refers to. They are declared with the event
    /// ([`NewEvent::with_blob`]), so the blob store keeps them as long as
    /// the event exists and a tiered journal refuses the event if one is
    /// missing. None by default.
    fn blobs(_event: &Self::Event) -> Vec<troupe_journal::BlobRef> {
        Vec::new()
    }
}

type After<E> = Box<dyn FnOnce(&<E as EventSourced>::State) + Send>;
type Publish<E> =
    Box<dyn FnOnce(&<E as EventSourced>::State, &[<E as EventSourced>::Event]) + Send>;
type OnFailure = Box<dyn FnOnce(ActorError) + Send>;

/// The outcome of a command: events to persist, then what to run.
pub struct Effect<E: EventSourced + ?Sized> {
    events: Vec<E::Event>,
    after: Vec<After<E>>,
    publish: Vec<Publish<E>>,
    failed: Vec<OnFailure>,
    stop: bool,
}

impl<E: EventSourced + ?Sized> Effect<E> {
    /// Persist nothing.
    pub fn none() -> Self {
        Self {
            events: Vec::new(),
            after: Vec::new(),
            publish: Vec::new(),
            failed: Vec::new(),
            stop: false,
        }
    }

    /// Persist these events, in order.
    pub fn persist(events: impl IntoIterator<Item = E::Event>) -> Self {
        Self {
            events: events.into_iter().collect(),
            after: Vec::new(),
            publish: Vec::new(),
            failed: Vec::new(),
            stop: false,
        }
    }

    /// Persist one event.
    pub fn persist_one(event: E::Event) -> Self {
        Self::persist([event])
    }

    /// Once the events are persisted and applied, answer `port` with
    /// `f(&new_state)`. If persisting fails the port is dropped unanswered.
    pub fn reply<R: Send + 'static>(
        mut self,
        port: ractor::RpcReplyPort<R>,
        f: impl FnOnce(&E::State) -> R + Send + 'static,
    ) -> Self {
        self.after.push(Box::new(move |s| {
            let _ = port.send(f(s));
        }));
        self
    }

    /// Like [`Effect::reply`], for a port that takes a `Result`: if
    /// persisting fails, the port is answered with the journal's error
    /// (its kind and source kept, so the caller can tell a transient
    /// failure) instead of being dropped.
    pub fn reply_result<T, Er>(
        mut self,
        port: ractor::RpcReplyPort<Result<T, Er>>,
        f: impl FnOnce(&E::State) -> Result<T, Er> + Send + 'static,
    ) -> Self
    where
        T: Send + 'static,
        Er: From<ActorError> + Send + 'static,
    {
        let port = Arc::new(std::sync::Mutex::new(Some(port)));
        let on_fail = port.clone();
        self.after.push(Box::new(move |s| {
            if let Some(p) = port.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = p.send(f(s));
            }
        }));
        self.failed.push(Box::new(move |e| {
            if let Some(p) = on_fail.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = p.send(Err(Er::from(e)));
            }
        }));
        self
    }

    /// Once persisted and applied, and before any reply, run `f` with the
    /// new state and the events just persisted: to publish them to live
    /// readers. Deciding there, after the commit, whether anyone listens
    /// means a reader that starts listening later finds the events in the
    /// journal, and one that listened before receives them here.
    pub fn publish(mut self, f: impl FnOnce(&E::State, &[E::Event]) + Send + 'static) -> Self {
        self.publish.push(Box::new(f));
        self
    }

    /// Once persisted and applied, run `f` with the new state.
    pub fn then(mut self, f: impl FnOnce(&E::State) + Send + 'static) -> Self {
        self.after.push(Box::new(f));
        self
    }

    /// Stop the actor after this command (it is passivated, not failed).
    pub fn stop(mut self) -> Self {
        self.stop = true;
        self
    }
}

/// What a durable actor does when an append fails (see the [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AppendFailure {
    /// Fail the actor at once.
    Stop,
    /// Retry up to `attempts` more times, waiting `backoff * 2^n` between tries.
    Retry {
        /// Further attempts.
        attempts: u32,
        /// First wait.
        backoff: Duration,
    },
}

/// Per-entity-type settings of durable actors.
#[derive(Clone)]
pub struct DurableConfig {
    /// Save a snapshot every this many events (None: never).
    pub snapshot_every: Option<u64>,
    /// Delete the events a saved snapshot covers.
    pub delete_covered_events: bool,
    /// On a failed append.
    pub on_append_failure: AppendFailure,
    /// Upcasters for old event and snapshot versions.
    pub upcasters: Arc<Upcasters>,
}

impl Default for DurableConfig {
    fn default() -> Self {
        Self {
            snapshot_every: None,
            delete_covered_events: false,
            on_append_failure: AppendFailure::Stop,
            upcasters: Arc::new(Upcasters::default()),
        }
    }
}

impl DurableConfig {
    /// Snapshot every `n` events.
    pub fn snapshot_every(mut self, n: u64) -> Self {
        self.snapshot_every = Some(n.max(1));
        self
    }

    /// Retry failed appends.
    pub fn retry_appends(mut self, attempts: u32, backoff: Duration) -> Self {
        self.on_append_failure = AppendFailure::Retry { attempts, backoff };
        self
    }
}

/// Arguments of a [`DurableActor`].
pub struct DurableArgs {
    /// The entity's persistence id.
    pub id: PersistenceId,
    /// Where its events live.
    pub journal: Arc<dyn Journal>,
    /// Settings.
    pub config: DurableConfig,
}

/// The running state of a durable actor.
pub struct DurableState<E: EventSourced> {
    /// The entity's state.
    pub state: E::State,
    /// Highest persisted sequence.
    pub seq: u64,
    since_snapshot: u64,
    args: DurableArgs,
}

/// The ractor actor that runs an [`EventSourced`] entity.
pub struct DurableActor<E>(pub Arc<E>);

/// Recovers an entity's state and sequence: snapshot, then replay.
pub async fn recover<E: EventSourced>(
    journal: &dyn Journal,
    id: &PersistenceId,
    upcasters: &Upcasters,
) -> Result<(E::State, u64), JournalError> {
    let (mut state, from) = match journal.load_snapshot(id).await? {
        Some(s) => (upcasters.decode_snapshot::<E::State>(&s)?, s.seq),
        None => (E::State::default(), 0),
    };
    let mut seq = from;
    let mut replay = journal.replay(id, from + 1, u64::MAX);
    while let Some(batch) = replay.next().await {
        for ev in batch? {
            let event: E::Event = upcasters.decode(&ev)?;
            E::apply(&mut state, &event);
            seq = ev.seq;
        }
    }
    // Events may have been deleted past the snapshot; the journal's highest
    // sequence is the truth for the next append.
    let highest = journal.highest_seq(id).await?;
    Ok((state, seq.max(highest)))
}

impl<E: EventSourced> ractor::Actor for DurableActor<E> {
    type Msg = E::Command;
    type State = DurableState<E>;
    type Arguments = DurableArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: DurableArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let started = std::time::Instant::now();
        let (state, seq) = recover::<E>(&*args.journal, &args.id, &args.config.upcasters)
            .await
            .map_err(|e| Box::new(ActorError::journal(args.id.as_str(), e)))?;
        metrics::histogram!("troupe_actor_recovery_seconds", "kind" => E::KIND)
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(id = %args.id, seq, "recovered");
        Ok(DurableState {
            state,
            seq,
            since_snapshot: 0,
            args,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let effect = self.0.handle(&st.state, msg);
        if !effect.events.is_empty() {
            let persisted = match encode::<E>(&st.args.id, &effect.events) {
                Ok(new) => append_with_policy(&st.args, st.seq, new).await,
                Err(e) => Err(e),
            };
            let out = match persisted {
                Ok(n) => n,
                Err(e) => {
                    // Tell the callers that can hear why, then fail: the
                    // restarted incarnation recovers what was written.
                    for f in effect.failed {
                        f(e.clone());
                    }
                    return Err(Box::new(e));
                }
            };
            for ev in &effect.events {
                E::apply(&mut st.state, ev);
            }
            st.since_snapshot += out;
            st.seq += out;
            if let Some(every) = st.args.config.snapshot_every
                && st.since_snapshot >= every
            {
                snapshot(st).await;
            }
        }
        for f in effect.publish {
            f(&st.state, &effect.events);
        }
        for f in effect.after {
            f(&st.state);
        }
        if effect.stop {
            myself.stop(None);
        }
        Ok(())
    }
}

fn encode<E: EventSourced>(
    id: &PersistenceId,
    events: &[E::Event],
) -> Result<Vec<NewEvent>, ActorError> {
    let mut new = Vec::with_capacity(events.len());
    for ev in events {
        let journal_err = |e: JournalError| ActorError::journal(id.as_str(), e);
        let mut event = NewEvent::new(ev).map_err(journal_err)?;
        for blob in E::blobs(ev) {
            event = event.with_blob(&blob).map_err(journal_err)?;
        }
        new.push(event);
    }
    Ok(new)
}

async fn append_with_policy(
    args: &DurableArgs,
    seq: u64,
    events: Vec<NewEvent>,
) -> Result<u64, ActorError> {
    let n = events.len() as u64;
    let (attempts, backoff) = match args.config.on_append_failure {
        AppendFailure::Stop => (0, Duration::ZERO),
        AppendFailure::Retry { attempts, backoff } => (attempts, backoff),
    };
    let mut attempt = 0u32;
    let mut pending = events;
    loop {
        let last_try = attempt >= attempts;
        // Clone only while a retry may still need the events.
        let batch = if last_try {
            std::mem::take(&mut pending)
        } else {
            pending.clone()
        };
        match args.journal.append(&args.id, seq, batch).await {
            Ok(_) => return Ok(n),
            Err(e) if !last_try && e.is_transient() => {
                tracing::warn!(id = %args.id, attempt, error = %e, "append failed; retrying");
                tokio::time::sleep(backoff.saturating_mul(1 << attempt.min(16))).await;
                attempt += 1;
            }
            Err(e) => {
                metrics::counter!("troupe_actor_append_failures_total").increment(1);
                return Err(ActorError::journal(args.id.as_str(), e));
            }
        }
    }
}

/// Saves a snapshot; a failure is logged and retried at the next interval,
/// never fatal (the events are all in the journal).
async fn snapshot<E: EventSourced>(st: &mut DurableState<E>) {
    let snap = match NewSnapshot::new(st.seq, &st.state) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(id = %st.args.id, error = %e, "cannot encode snapshot");
            return;
        }
    };
    match st.args.journal.save_snapshot(&st.args.id, snap).await {
        Ok(()) => {
            st.since_snapshot = 0;
            if st.args.config.delete_covered_events
                && let Err(e) = st.args.journal.delete_events_to(&st.args.id, st.seq).await
            {
                tracing::warn!(id = %st.args.id, error = %e, "cannot delete events covered by a snapshot");
            }
        }
        Err(e) => tracing::warn!(id = %st.args.id, error = %e, "cannot save snapshot"),
    }
}

//! The durable Saga actor: one per instance.
//!
//! Every transition is journaled (under `saga/<id>`) before it is acted on.
//! Ready steps start at once, so a slow step delays only its dependents.
//! When a step fails for good, each completed step is compensated once all
//! the completed steps that depend on it have been (reverse dependency
//! order; independent compensations run concurrently), each exactly once.
//! A compensation that keeps failing parks the saga as `NeedsAttention`.
//!
//! After a restart the saga replays its journal and carries on. An attempt
//! whose start was journaled but whose outcome was not is run again with
//! the same attempt number, so its idempotency key `(saga, step, attempt)`
//! is the same and the participant can deduplicate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use troupe_journal::{Journal, NewEvent, PersistenceId, Schema, now_ms};

use crate::definition::SagaDefinition;
use crate::error::{SagaError, StepError};
use crate::handler::{Handlers, StepContext};

/// What the saga journal records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SagaEvent {
    /// The instance began.
    Started {
        /// Workflow name.
        definition: String,
        /// Its input.
        input: Value,
    },
    /// An attempt of a step's action began.
    StepStarted {
        /// Step index.
        step: usize,
        /// Attempt, from 1.
        attempt: u32,
        /// For a step that waits for a signal: when it stops waiting, in ms
        /// since the Unix epoch (absent in 0.1 journals: the event's own
        /// time plus the step's time-out is used).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_ms: Option<u64>,
        /// The durable timer that fires at that deadline, if one was set.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timer: Option<u64>,
    },
    /// The action succeeded.
    StepSucceeded {
        /// Step index.
        step: usize,
        /// Attempt.
        attempt: u32,
        /// Its output.
        output: Value,
    },
    /// The action failed; `last` when no retry follows.
    StepFailed {
        /// Step index.
        step: usize,
        /// Attempt.
        attempt: u32,
        /// Why.
        error: String,
        /// No retry follows.
        last: bool,
    },
    /// An attempt of a compensation began.
    CompensationStarted {
        /// Step index.
        step: usize,
        /// Attempt.
        attempt: u32,
    },
    /// The step was compensated (attempt 0: it had nothing to undo).
    Compensated {
        /// Step index.
        step: usize,
        /// Attempt.
        attempt: u32,
    },
    /// The compensation failed and will be retried.
    CompensationFailed {
        /// Step index.
        step: usize,
        /// Attempt.
        attempt: u32,
        /// Why.
        error: String,
    },
    /// A compensation failed past its retries: operators must look.
    NeedsAttention {
        /// Step index.
        step: usize,
        /// Last error.
        error: String,
    },
    /// Every step succeeded.
    Completed,
    /// Every completed step was compensated.
    Aborted,
}

impl Schema for SagaEvent {
    const TYPE_NAME: &'static str = "saga.Event";
}

/// Where a saga stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Running steps forward.
    Running,
    /// A step failed for good; undoing completed steps.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// Every completed step was undone.
    Aborted,
    /// A compensation failed past its retries.
    NeedsAttention,
}

impl Phase {
    /// Completed, Aborted or NeedsAttention.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Completed | Phase::Aborted | Phase::NeedsAttention
        )
    }
}

/// Where a step stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StepState {
    /// Not started.
    Pending,
    /// Attempt running.
    Running(u32),
    /// Attempt failed; waiting to retry.
    Retrying(u32),
    /// Done, with its output.
    Succeeded(Value),
    /// Failed for good.
    Failed(String),
    /// Compensation attempt running.
    Compensating(u32),
    /// Compensation attempt failed; waiting to retry.
    RetryingCompensation(u32),
    /// Undone.
    Compensated,
}

/// A saga's status, for operators and the HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaStatus {
    /// Instance id.
    pub id: String,
    /// Workflow name.
    pub definition: String,
    /// Phase.
    pub phase: Phase,
    /// `(step name, state)` in definition order.
    pub steps: Vec<(String, StepState)>,
    /// Why it is compensating, aborted or parked.
    pub error: Option<String>,
}

/// Messages of a saga actor.
pub enum SagaMsg {
    #[doc(hidden)]
    Done {
        step: usize,
        attempt: u32,
        compensation: bool,
        result: Result<Value, StepError>,
    },
    #[doc(hidden)]
    Retry {
        step: usize,
        attempt: u32,
        compensation: bool,
    },
    #[doc(hidden)]
    SignalDeadline { step: usize, attempt: u32 },
    #[doc(hidden)]
    Flush,
    /// Delivers an external signal; answers whether a step was waiting for it.
    Signal(String, Value, RpcReplyPort<bool>),
    /// Current status.
    Status(RpcReplyPort<SagaStatus>),
}

#[cfg(feature = "cluster")]
impl ractor::Message for SagaMsg {}

/// Arguments of a saga actor.
pub struct SagaArgs {
    /// Instance id.
    pub id: String,
    /// Its workflow.
    pub definition: Arc<SagaDefinition>,
    /// Registered handlers.
    pub handlers: Arc<Handlers>,
    /// Its journal.
    pub journal: Arc<dyn Journal>,
    /// Told the final status when the saga ends.
    pub on_end: Option<tokio::sync::mpsc::UnboundedSender<SagaStatus>>,
    /// Durable timers for signal deadlines (without: timers in memory,
    /// armed for what is left of the journaled deadline).
    pub timers: Option<troupe_actor::Timers>,
}

/// The saga actor. See the [module docs](self).
pub struct SagaActor;

/// Running state of a saga.
pub struct SagaRun {
    args: SagaArgs,
    pid: PersistenceId,
    seq: u64,
    input: Value,
    /// Outputs of succeeded actions, kept for their compensations.
    outputs: Vec<Option<Value>>,
    steps: Vec<StepState>,
    phase: Phase,
    error: Option<String>,
    started: Vec<Option<Instant>>,
    /// Signal deadlines (ms since the Unix epoch) of the steps waiting.
    deadlines: Vec<Option<u64>>,
    /// Whether a durable timer covers that deadline.
    timed: Vec<bool>,
    /// Successes received but not yet journaled (see `flush`).
    pending: Vec<(usize, u32, Value)>,
    flush_scheduled: bool,
    /// Events already applied in memory, written with the next append.
    unwritten: Vec<SagaEvent>,
}

fn jerr(e: troupe_journal::JournalError) -> SagaError {
    SagaError::from(e)
}

/// Folds a journal into (input, step states, phase, error, seq).
/// A saga's journal, folded.
pub(crate) struct Replayed {
    pub definition: String,
    pub input: Value,
    pub steps: Vec<StepState>,
    /// Outputs of every action that succeeded (kept for compensations).
    pub outputs: Vec<Option<Value>>,
    pub phase: Phase,
    /// Set by `NeedsAttention` (see [`Replayed::error_for`]).
    pub error: Option<String>,
    /// The first step that failed for good, and why.
    pub first_failure: Option<(usize, String)>,
    pub seq: u64,
    /// Per step: the journaled deadline of its latest start, or that
    /// start's write time (0.1 journals), and its durable timer.
    pub deadlines: Vec<(Option<u64>, u64, Option<u64>)>,
}

pub(crate) async fn replay(
    journal: &dyn Journal,
    pid: &PersistenceId,
    steps: usize,
) -> Result<Option<Replayed>, SagaError> {
    let mut st = vec![StepState::Pending; steps];
    let set = |st: &mut Vec<StepState>, step: usize, v: StepState| -> Result<(), SagaError> {
        let slot = st.get_mut(step).ok_or_else(|| SagaError::Corrupt {
            id: pid.to_string(),
            message: format!("names step {step}, but its workflow has {steps} steps"),
        })?;
        *slot = v;
        Ok(())
    };
    let (mut def, mut input, mut phase, mut error, mut seq) =
        (None, Value::Null, Phase::Running, None, 0);
    let mut outputs: Vec<Option<Value>> = vec![None; steps];
    let mut deadlines = vec![(None, 0, None); steps];
    let mut first_failure: Option<(usize, String)> = None;
    let mut r = journal.replay(pid, 1, u64::MAX);
    while let Some(batch) = r.next().await {
        for ev in batch.map_err(jerr)? {
            seq = ev.seq;
            let written = ev.timestamp_ms;
            match ev.decode::<SagaEvent>().map_err(jerr)? {
                SagaEvent::Started {
                    definition,
                    input: i,
                } => {
                    def = Some(definition);
                    input = i;
                }
                SagaEvent::StepStarted {
                    step,
                    attempt,
                    deadline_ms,
                    timer,
                } => {
                    set(&mut st, step, StepState::Running(attempt))?;
                    deadlines[step] = (deadline_ms, written, timer);
                }
                SagaEvent::StepSucceeded { step, output, .. } => {
                    if let Some(o) = outputs.get_mut(step) {
                        *o = Some(output.clone());
                    }
                    set(&mut st, step, StepState::Succeeded(output))?
                }
                SagaEvent::StepFailed {
                    step,
                    attempt,
                    error: e,
                    last,
                } => {
                    if last {
                        set(&mut st, step, StepState::Failed(e.clone()))?;
                        phase = Phase::Compensating;
                        first_failure.get_or_insert((step, e.clone()));
                    } else {
                        set(&mut st, step, StepState::Retrying(attempt))?;
                    }
                }
                SagaEvent::CompensationStarted { step, attempt } => {
                    set(&mut st, step, StepState::Compensating(attempt))?
                }
                SagaEvent::Compensated { step, .. } => set(&mut st, step, StepState::Compensated)?,
                SagaEvent::CompensationFailed { step, attempt, .. } => {
                    set(&mut st, step, StepState::RetryingCompensation(attempt))?
                }
                SagaEvent::NeedsAttention { error: e, .. } => {
                    phase = Phase::NeedsAttention;
                    error = Some(e);
                }
                SagaEvent::Completed => phase = Phase::Completed,
                SagaEvent::Aborted => phase = Phase::Aborted,
            }
        }
    }
    Ok(def.map(|definition| Replayed {
        definition,
        input,
        steps: st,
        outputs,
        phase,
        error,
        first_failure,
        seq,
        deadlines,
    }))
}

impl Replayed {
    /// Why the saga is compensating, aborted or parked, naming the step as
    /// the running saga does.
    pub fn error_for(&self, def: &SagaDefinition) -> Option<String> {
        self.error.clone().or_else(|| {
            self.first_failure.as_ref().map(|(step, e)| {
                let name = def.steps().get(*step).map_or("?", |s| s.name.as_str());
                format!("step `{name}` failed: {e}")
            })
        })
    }
}

impl SagaRun {
    /// The `StepStarted` of attempt `attempt` of step `i`. A step that
    /// waits for a signal gets an absolute deadline, journaled with it, and
    /// a durable timer for it when the saga has timers.
    async fn start_event(&mut self, i: usize, attempt: u32) -> SagaEvent {
        let def = &self.args.definition.steps()[i];
        let (mut deadline_ms, mut timer) = (None, None);
        if def.signal.is_some() {
            let at = now_ms() + def.timeout.as_millis() as u64;
            deadline_ms = Some(at);
            if let Some(timers) = &self.args.timers {
                let payload =
                    serde_json::to_vec(&serde_json::json!({"step": i, "attempt": attempt}))
                        .unwrap_or_default();
                let target = troupe_actor::TimerTarget::new("saga", self.args.id.clone());
                match timers
                    .schedule(target, "signal_deadline", payload, at)
                    .await
                {
                    Ok(id) => timer = Some(id),
                    Err(e) => {
                        tracing::warn!(saga = %self.args.id, error = %e, "no durable timer for a signal deadline; one in memory instead")
                    }
                }
            }
            self.deadlines[i] = deadline_ms;
            self.timed[i] = timer.is_some();
        }
        SagaEvent::StepStarted {
            step: i,
            attempt,
            deadline_ms,
            timer,
        }
    }

    async fn journal(&mut self, events: Vec<SagaEvent>) -> Result<(), ActorProcessingErr> {
        // Successes applied in memory but not yet written go first, in the
        // same append (see `SagaMsg::Flush`).
        let mut all = std::mem::take(&mut self.unwritten);
        all.extend(events);
        if all.is_empty() {
            return Ok(());
        }
        let new: Vec<NewEvent> = all.iter().map(NewEvent::new).collect::<Result<_, _>>()?;
        let n = new.len() as u64;
        self.args.journal.append(&self.pid, self.seq, new).await?;
        self.seq += n;
        Ok(())
    }

    /// Journals buffered successes in one append, then applies them.
    /// Concurrent steps tend to finish together: their successes queue up
    /// in the mailbox behind one `Flush`, and share one write.
    async fn flush(&mut self) -> Result<(), ActorProcessingErr> {
        self.apply_pending();
        self.journal(Vec::new()).await
    }

    /// Applies the buffered successes in memory; the next append writes
    /// them, ahead of whatever it carries.
    fn apply_pending(&mut self) {
        for (step, attempt, output) in std::mem::take(&mut self.pending) {
            self.unwritten.push(SagaEvent::StepSucceeded {
                step,
                attempt,
                output: output.clone(),
            });
            self.outputs[step] = Some(output.clone());
            self.steps[step] = StepState::Succeeded(output);
        }
    }

    fn status(&self) -> SagaStatus {
        SagaStatus {
            id: self.args.id.clone(),
            definition: self.args.definition.name().to_owned(),
            phase: self.phase,
            steps: self
                .args
                .definition
                .steps()
                .iter()
                .map(|s| s.name.clone())
                .zip(self.steps.iter().cloned())
                .collect(),
            error: self.error.clone(),
        }
    }

    fn context(&self, i: usize, attempt: u32, output: Option<Value>) -> StepContext {
        let mut input = Map::new();
        input.insert("input".into(), self.input.clone());
        for d in self.args.definition.deps(i) {
            if let StepState::Succeeded(out) = &self.steps[d] {
                input.insert(self.args.definition.steps()[d].name.clone(), out.clone());
            }
        }
        StepContext {
            saga: self.args.id.clone(),
            step: self.args.definition.steps()[i].name.clone(),
            attempt,
            input: Value::Object(input),
            output,
        }
    }

    /// Runs attempt `attempt` (already journaled) of step `i`.
    fn launch(&mut self, me: &ActorRef<SagaMsg>, i: usize, attempt: u32, compensation: bool) {
        let def = &self.args.definition.steps()[i];
        self.started[i] = Some(Instant::now());
        if !compensation && let Some(signal) = &def.signal {
            tracing::debug!(saga = %self.args.id, step = %def.name, signal, "waiting for signal");
            // A durable timer fires at the deadline even across restarts;
            // without one, a timer in memory for what is left of it.
            if !self.timed[i] {
                let deadline =
                    self.deadlines[i].unwrap_or_else(|| now_ms() + def.timeout.as_millis() as u64);
                let left = Duration::from_millis(deadline.saturating_sub(now_ms()));
                me.send_after(left, move || SagaMsg::SignalDeadline { step: i, attempt });
            }
            return;
        }
        let name = if compensation {
            def.compensation.clone()
        } else {
            Some(def.action.clone())
        };
        let handler = name.as_deref().and_then(|n| self.args.handlers.get(n));
        let output = if compensation {
            self.outputs_for_compensation(i)
        } else {
            None
        };
        let ctx = self.context(i, attempt, output);
        let timeout = def.timeout;
        let me = me.clone();
        tokio::spawn(async move {
            let result = match handler {
                None => Err(StepError::permanent(format!(
                    "handler `{}` is not registered",
                    name.unwrap_or_default()
                ))),
                // Run in a task of its own: a panicking handler fails its
                // attempt instead of leaving the step running forever.
                Some(h) => match tokio::spawn(tokio::time::timeout(timeout, h.run(ctx))).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Err(StepError::retryable(format!("timed out after {timeout:?}"))),
                    Err(e) => Err(StepError::retryable(format!("handler panicked: {e}"))),
                },
            };
            let _ = me.cast(SagaMsg::Done {
                step: i,
                attempt,
                compensation,
                result,
            });
        });
    }

    fn outputs_for_compensation(&self, i: usize) -> Option<Value> {
        self.outputs.get(i).cloned().flatten()
    }

    /// Starts whatever can start now, and ends the saga when nothing is left.
    async fn drive(&mut self, me: &ActorRef<SagaMsg>) -> Result<(), ActorProcessingErr> {
        let def = self.args.definition.clone();
        match self.phase {
            Phase::Running => {
                if self
                    .steps
                    .iter()
                    .all(|s| matches!(s, StepState::Succeeded(_)))
                {
                    self.journal(vec![SagaEvent::Completed]).await?;
                    self.phase = Phase::Completed;
                    metrics::counter!("troupe_sagas_completed_total").increment(1);
                    return self.finish(me);
                }
                // Every ready step starts now; their starts share one append.
                let ready: Vec<usize> = def
                    .order()
                    .iter()
                    .copied()
                    .filter(|&i| {
                        matches!(self.steps[i], StepState::Pending)
                            && def
                                .deps(i)
                                .iter()
                                .all(|&d| matches!(self.steps[d], StepState::Succeeded(_)))
                    })
                    .collect();
                if !ready.is_empty() {
                    let mut starts = Vec::with_capacity(ready.len());
                    for &i in &ready {
                        starts.push(self.start_event(i, 1).await);
                    }
                    self.journal(starts).await?;
                    for &i in &ready {
                        self.steps[i] = StepState::Running(1);
                        self.launch(me, i, 1, false);
                    }
                }
            }
            Phase::Compensating => {
                // Forward attempts still running finish first: their
                // outcome decides whether they need undoing.
                if self
                    .steps
                    .iter()
                    .any(|s| matches!(s, StepState::Running(_)))
                {
                    return Ok(());
                }
                // Undo every completed step whose completed dependents are
                // undone. A step with nothing to undo is done at once and may
                // free its own dependencies: go round until nothing changes.
                // Everything decided here is written in one append.
                let mut events = Vec::new();
                let mut to_launch = Vec::new();
                loop {
                    let mut changed = false;
                    for i in 0..self.steps.len() {
                        let StepState::Succeeded(out) = &self.steps[i] else {
                            continue;
                        };
                        let dependents_done = def.dependents(i).iter().all(|&d| {
                            !matches!(
                                self.steps[d],
                                StepState::Succeeded(_)
                                    | StepState::Compensating(_)
                                    | StepState::RetryingCompensation(_)
                            )
                        });
                        if !dependents_done {
                            continue;
                        }
                        self.outputs[i] = Some(out.clone());
                        if def.steps()[i].compensation.is_none() {
                            events.push(SagaEvent::Compensated {
                                step: i,
                                attempt: 0,
                            });
                            self.steps[i] = StepState::Compensated;
                            changed = true;
                        } else {
                            events.push(SagaEvent::CompensationStarted {
                                step: i,
                                attempt: 1,
                            });
                            self.steps[i] = StepState::Compensating(1);
                            to_launch.push(i);
                        }
                    }
                    if !changed {
                        break;
                    }
                }
                self.journal(events).await?;
                for i in to_launch {
                    metrics::counter!("troupe_saga_compensations_total").increment(1);
                    self.launch(me, i, 1, true);
                }
                let busy = self.steps.iter().any(|s| {
                    matches!(
                        s,
                        StepState::Succeeded(_)
                            | StepState::Compensating(_)
                            | StepState::RetryingCompensation(_)
                    )
                });
                if !busy {
                    self.journal(vec![SagaEvent::Aborted]).await?;
                    self.phase = Phase::Aborted;
                    metrics::counter!("troupe_sagas_aborted_total").increment(1);
                    return self.finish(me);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(&mut self, me: &ActorRef<SagaMsg>) -> Result<(), ActorProcessingErr> {
        if let Some(tx) = &self.args.on_end {
            let _ = tx.send(self.status());
        }
        me.stop(None);
        Ok(())
    }

    async fn fail_for_good(
        &mut self,
        i: usize,
        attempt: u32,
        error: String,
    ) -> Result<(), ActorProcessingErr> {
        self.journal(vec![SagaEvent::StepFailed {
            step: i,
            attempt,
            error: error.clone(),
            last: true,
        }])
        .await?;
        self.steps[i] = StepState::Failed(error.clone());
        if self.phase == Phase::Running {
            self.phase = Phase::Compensating;
            self.error = Some(format!(
                "step `{}` failed: {error}",
                self.args.definition.steps()[i].name
            ));
        }
        // Steps waiting to retry, or waiting for a signal, never did
        // anything: nothing to undo.
        let def = self.args.definition.clone();
        for (j, s) in self.steps.iter_mut().enumerate() {
            let waiting_signal =
                def.steps()[j].signal.is_some() && matches!(s, StepState::Running(_));
            if matches!(s, StepState::Retrying(_)) || waiting_signal {
                *s = StepState::Pending;
            }
        }
        Ok(())
    }
}

impl ractor::Actor for SagaActor {
    type Msg = SagaMsg;
    type State = SagaRun;
    type Arguments = SagaArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<SagaMsg>,
        args: SagaArgs,
    ) -> Result<SagaRun, ActorProcessingErr> {
        let pid = PersistenceId::new("saga", &args.id)?;
        let n = args.definition.steps().len();
        let Some(replayed) = replay(&*args.journal, &pid, n).await? else {
            return Err(Box::new(SagaError::UnknownSaga(args.id.clone())));
        };
        let error = replayed.error_for(&args.definition);
        let Replayed {
            input,
            steps,
            outputs,
            phase,
            seq,
            deadlines: journaled,
            ..
        } = replayed;
        let mut deadlines = vec![None; n];
        let mut timed = vec![false; n];
        for (i, (deadline, written, timer)) in journaled.into_iter().enumerate() {
            let timeout = args.definition.steps()[i].timeout.as_millis() as u64;
            deadlines[i] = deadline.or((written > 0).then(|| written + timeout));
            timed[i] = timer.is_some() && args.timers.is_some();
        }
        Ok(SagaRun {
            deadlines,
            timed,
            args,
            pid,
            seq,
            input,
            outputs,
            steps,
            phase,
            error,
            started: vec![None; n],
            pending: Vec::new(),
            flush_scheduled: false,
            unwritten: Vec::new(),
        })
    }

    async fn post_start(
        &self,
        me: ActorRef<SagaMsg>,
        run: &mut SagaRun,
    ) -> Result<(), ActorProcessingErr> {
        if run.phase.is_final() {
            return run.finish(&me);
        }
        // Resume: re-run attempts whose outcome was lost, with the same
        // attempt number (and so the same idempotency key).
        for i in 0..run.steps.len() {
            match run.steps[i].clone() {
                StepState::Running(a) => {
                    if run.phase == Phase::Compensating
                        && run.args.definition.steps()[i].signal.is_some()
                    {
                        run.steps[i] = StepState::Pending;
                    } else {
                        run.launch(&me, i, a, false);
                    }
                }
                StepState::Retrying(a) => {
                    me.cast(SagaMsg::Retry {
                        step: i,
                        attempt: a,
                        compensation: false,
                    })?;
                }
                StepState::Compensating(a) => run.launch(&me, i, a, true),
                StepState::RetryingCompensation(a) => {
                    me.cast(SagaMsg::Retry {
                        step: i,
                        attempt: a,
                        compensation: true,
                    })?;
                }
                StepState::Succeeded(out) => run.outputs[i] = Some(out),
                _ => {}
            }
        }
        run.drive(&me).await
    }

    async fn handle(
        &self,
        me: ActorRef<SagaMsg>,
        msg: SagaMsg,
        run: &mut SagaRun,
    ) -> Result<(), ActorProcessingErr> {
        // Anything but another success settles the buffered successes
        // first, so the journal keeps the order things happened in.
        // (`Flush` itself writes them together with the starts they enable.)
        let keeps_buffer = matches!(
            &msg,
            SagaMsg::Done {
                compensation: false,
                result: Ok(_),
                ..
            } | SagaMsg::Status(_)
                | SagaMsg::Flush
        );
        if !keeps_buffer {
            run.flush().await?;
        }
        match msg {
            SagaMsg::Flush => {
                // The buffered successes and the starts they make ready are
                // written in one append: applied here, written by `drive`
                // (or just below if it writes nothing).
                run.flush_scheduled = false;
                run.apply_pending();
                run.drive(&me).await?;
                return run.journal(Vec::new()).await;
            }
            SagaMsg::Status(reply) => {
                let _ = reply.send(run.status());
                return Ok(());
            }
            SagaMsg::Signal(name, payload, reply) => {
                let def = run.args.definition.clone();
                let waiting = (0..run.steps.len()).find(|&i| {
                    def.steps()[i].signal.as_deref() == Some(name.as_str())
                        && matches!(run.steps[i], StepState::Running(_))
                });
                let Some((i, StepState::Running(attempt))) =
                    waiting.map(|i| (i, run.steps[i].clone()))
                else {
                    let _ = reply.send(false);
                    return Ok(());
                };
                // Journaled before it is acknowledged: a crash after the
                // answer cannot lose the signal, and the step is settled
                // before the next message, so a second signal of the
                // same name finds nobody waiting.
                run.pending.push((i, attempt, payload));
                run.apply_pending();
                run.drive(&me).await?;
                run.journal(Vec::new()).await?;
                let _ = reply.send(true);
                return Ok(());
            }
            SagaMsg::SignalDeadline { step, attempt } => {
                let due = run.deadlines.get(step).copied().flatten();
                if run.steps[step] == StepState::Running(attempt)
                    && let Some(at) = due
                    && now_ms() < at
                {
                    // Early (a timer from an earlier start, a clock that
                    // moved): wait for what is left.
                    let left = Duration::from_millis(at - now_ms());
                    me.send_after(left, move || SagaMsg::SignalDeadline { step, attempt });
                } else if run.steps[step] == StepState::Running(attempt) {
                    let signal = run.args.definition.steps()[step]
                        .signal
                        .clone()
                        .unwrap_or_default();
                    run.fail_for_good(
                        step,
                        attempt,
                        format!("signal `{signal}` did not arrive before its deadline"),
                    )
                    .await?;
                }
            }
            SagaMsg::Retry {
                step,
                attempt,
                compensation: false,
            } => {
                if run.steps[step] == StepState::Retrying(attempt) && run.phase == Phase::Running {
                    let next = attempt + 1;
                    let start = run.start_event(step, next).await;
                    run.journal(vec![start]).await?;
                    run.steps[step] = StepState::Running(next);
                    run.launch(&me, step, next, false);
                }
            }
            SagaMsg::Retry {
                step,
                attempt,
                compensation: true,
            } => {
                if run.steps[step] == StepState::RetryingCompensation(attempt) {
                    let next = attempt + 1;
                    run.journal(vec![SagaEvent::CompensationStarted {
                        step,
                        attempt: next,
                    }])
                    .await?;
                    run.steps[step] = StepState::Compensating(next);
                    run.launch(&me, step, next, true);
                }
            }
            SagaMsg::Done {
                step,
                attempt,
                compensation: false,
                result,
            } => {
                if run.steps[step] != StepState::Running(attempt) {
                    return Ok(()); // a late answer for an attempt already settled
                }
                if let Some(t) = run.started[step] {
                    metrics::histogram!("troupe_saga_step_seconds")
                        .record(t.elapsed().as_secs_f64());
                }
                let policy = run.args.definition.steps()[step].retry;
                match result {
                    Ok(output) => {
                        if run.pending.iter().any(|(s, _, _)| *s == step) {
                            return Ok(());
                        }
                        run.pending.push((step, attempt, output));
                        if !run.flush_scheduled {
                            run.flush_scheduled = true;
                            me.cast(SagaMsg::Flush)?;
                        }
                        return Ok(());
                    }
                    Err(e)
                        if e.retryable
                            && attempt < policy.max_attempts
                            && run.phase == Phase::Running =>
                    {
                        run.journal(vec![SagaEvent::StepFailed {
                            step,
                            attempt,
                            error: e.message.clone(),
                            last: false,
                        }])
                        .await?;
                        run.steps[step] = StepState::Retrying(attempt);
                        let delay = policy.backoff(attempt);
                        me.send_after(delay, move || SagaMsg::Retry {
                            step,
                            attempt,
                            compensation: false,
                        });
                    }
                    Err(e) => run.fail_for_good(step, attempt, e.message).await?,
                }
            }
            SagaMsg::Done {
                step,
                attempt,
                compensation: true,
                result,
            } => {
                if run.steps[step] != StepState::Compensating(attempt) {
                    return Ok(());
                }
                let policy = run.args.definition.steps()[step].compensation_retry;
                match result {
                    Ok(_) => {
                        run.journal(vec![SagaEvent::Compensated { step, attempt }])
                            .await?;
                        run.steps[step] = StepState::Compensated;
                    }
                    Err(e) if attempt < policy.max_attempts => {
                        run.journal(vec![SagaEvent::CompensationFailed {
                            step,
                            attempt,
                            error: e.message,
                        }])
                        .await?;
                        run.steps[step] = StepState::RetryingCompensation(attempt);
                        let delay = policy.backoff(attempt);
                        me.send_after(delay, move || SagaMsg::Retry {
                            step,
                            attempt,
                            compensation: true,
                        });
                    }
                    Err(e) => {
                        let error = format!(
                            "compensation of `{}` failed {attempt} times: {}",
                            run.args.definition.steps()[step].name,
                            e.message
                        );
                        run.journal(vec![SagaEvent::NeedsAttention {
                            step,
                            error: error.clone(),
                        }])
                        .await?;
                        run.phase = Phase::NeedsAttention;
                        run.error = Some(error);
                        metrics::counter!("troupe_sagas_parked_total").increment(1);
                        tracing::error!(saga = %run.args.id, "saga parked: needs attention");
                        return run.finish(&me);
                    }
                }
            }
        }
        run.drive(&me).await
    }
}

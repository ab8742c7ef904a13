//! One whole turn: the model's answer streamed into the session, its tool
//! calls run and journaled, rounds until the model answers in text.
//!
//! Run by [`Context::reply`](crate::Context::reply). An attempt starts with
//! `turn_started`; a new attempt of an interrupted turn first settles the
//! calls the interrupted one left without a journaled result (see the
//! [`tool`](crate::tool) module), then asks the model again with every
//! journaled result in its context, so no tool whose result was journaled
//! ever runs twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::AgentError;
use crate::inference::{Holder, Inference};
use crate::model::{ChatMessage, ChatRequest, Chunk, Role, ToolCall};
use crate::session::{
    Approval, Decided, Decision, OpenCall, SessionEvent, SessionItem, SessionView, Sessions,
    TurnRef,
};
use crate::tool::ToolCallInfo;
use crate::{AgentOptions, TurnOutcome};

/// The timer kind of approval deadlines (the key is the session id).
pub(crate) const APPROVAL_TIMER: &str = "session.approval";

/// What an approval deadline's timer carries.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct ApprovalTimer {
    pub turn: u32,
    pub call_id: String,
}

/// The turn slot of an agent kind ([`AgentOptions::max_concurrent_turns`])
/// held by one turn: given back while the turn waits for approvals, taken
/// again before it goes on.
pub(crate) struct TurnPermit {
    turns: Arc<Semaphore>,
    held: Mutex<Option<OwnedSemaphorePermit>>,
}

impl TurnPermit {
    pub fn new(turns: Arc<Semaphore>, permit: OwnedSemaphorePermit) -> Self {
        Self {
            turns,
            held: Mutex::new(Some(permit)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<OwnedSemaphorePermit>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self) {
        drop(self.lock().take());
    }

    async fn reacquire(&self) {
        if self.lock().is_some() {
            return;
        }
        // The turn was admitted already: it queues for a slot, however long.
        if let Ok(p) = self.turns.clone().acquire_owned().await {
            *self.lock() = Some(p);
        }
    }
}

/// Counts a turn waiting for approvals until dropped (a turn cancelled
/// while it waits included).
struct Waiting(metrics::Gauge);

impl Waiting {
    fn new() -> Self {
        let g = metrics::gauge!("troupe_tool_approvals_waiting");
        g.increment(1.0);
        Self(g)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// What the model is told of a call that was not approved.
fn rejected(d: &Decided) -> String {
    if d.timed_out {
        return "not run: the call needed a person's approval and none came before its deadline"
            .into();
    }
    let mut m = String::from("not run: the call was rejected");
    if let Some(by) = &d.by {
        m.push_str(&format!(" by {by}"));
    }
    if let Some(why) = &d.reason {
        m.push_str(&format!(": {why}"));
    }
    m
}

/// What a turn needs: where it is journaled, the models, who holds the
/// lease, and the agent's settings.
pub(crate) struct ReplyRun<'a> {
    pub sessions: &'a Sessions,
    pub inference: &'a Inference,
    pub session: &'a str,
    pub options: &'a AgentOptions,
    pub holder: Holder,
    pub system: crate::AgentSystem,
    /// The turn slot, given back while the turn waits for approvals.
    pub permit: Option<Arc<TurnPermit>>,
}

/// The error journaled for a call that must not run twice.
pub const INTERRUPTED: &str = "interrupted, not retried: the tool must not run twice and \
     its first run's result was not journaled";

impl ReplyRun<'_> {
    /// Begins an attempt at the pending turn and answers it. A failure is
    /// journaled as `turn_failed` (with the retry hint of an overload) and
    /// returned.
    pub async fn run(&self) -> Result<TurnOutcome, AgentError> {
        let (turn, view) = self
            .sessions
            .begin_turn(self.session, &self.options.backend)
            .await?;
        match self.answer(turn, view).await {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                let stale = matches!(
                    e,
                    AgentError::StaleTurn { .. }
                        | AgentError::UnknownSession(_)
                        | AgentError::SessionClosed(_)
                );
                if !stale
                    && let Err(j) = self
                        .sessions
                        .append(self.session, turn, vec![failed_event(turn.turn, &e)])
                        .await
                {
                    tracing::warn!(session = self.session, error = %j, "could not journal a failed turn");
                }
                Err(e)
            }
        }
    }

    fn info(&self, turn: TurnRef, round: u32, index: u32) -> ToolCallInfo {
        ToolCallInfo {
            session: self.session.to_owned(),
            turn: turn.turn,
            round,
            index,
            attempt: turn.attempt,
        }
    }

    /// Runs the calls of one round and journals their results; returns the
    /// events (in journal order) and the last sequence. Calls with an entry
    /// in `approvals` wait for their decision (see [tool
    /// approvals](crate::session#tool-approvals)); the others run at once,
    /// concurrently, and are journaled in one append before any wait.
    /// Calls `left_open` by an interrupted attempt may have run already:
    /// those of tools that must not run twice are failed instead. `after`
    /// is a sequence at or after the round's `tool_called` events.
    async fn run_calls(
        &self,
        turn: TurnRef,
        calls: &[OpenCall],
        left_open: bool,
        approvals: &[Approval],
        after: u64,
    ) -> Result<(Vec<SessionEvent>, u64), AgentError> {
        let gated = |c: &OpenCall| approvals.iter().any(|a| a.call_id == c.call.id);
        let (waiting, free): (Vec<OpenCall>, Vec<OpenCall>) =
            calls.iter().cloned().partition(|c| gated(c));
        let mut events = Vec::new();
        let mut seq = after;
        if !free.is_empty() {
            let may_have_run = vec![left_open; free.len()];
            let batch = self.results(turn, &free, &may_have_run).await;
            seq = self
                .sessions
                .append(self.session, turn, batch.clone())
                .await?;
            events.extend(batch);
        }
        if waiting.is_empty() {
            return Ok((events, seq));
        }
        let decided = self.await_decisions(turn, approvals, seq).await?;
        let mut run = Vec::new();
        let mut may_have_run = Vec::new();
        let mut refused = Vec::new();
        for c in &waiting {
            let Some(d) = decided.get(&c.call.id) else {
                continue;
            };
            let outcome = match (d.approved, d.timed_out) {
                (true, _) => "approved",
                (false, true) => "timed_out",
                (false, false) => "rejected",
            };
            metrics::counter!("troupe_tool_approvals_total", "tool" => c.call.name.clone(), "outcome" => outcome)
                .increment(1);
            if d.approved {
                run.push(c.clone());
                // Only a `tool_started` says an earlier attempt ran it.
                let started = approvals
                    .iter()
                    .any(|a| a.call_id == c.call.id && a.started);
                may_have_run.push(left_open && started);
            } else {
                refused.push(SessionEvent::ToolResult {
                    turn: turn.turn,
                    call_id: c.call.id.clone(),
                    ok: false,
                    output: rejected(d),
                });
            }
        }
        // Calls that must not run twice say so before they run.
        let starting: Vec<SessionEvent> = run
            .iter()
            .zip(&may_have_run)
            .filter(|(c, ran)| {
                !**ran
                    && self
                        .options
                        .tools
                        .find(&c.call.name)
                        .is_some_and(|t| !t.is_repeatable())
            })
            .map(|(c, _)| SessionEvent::ToolStarted {
                turn: turn.turn,
                call_id: c.call.id.clone(),
            })
            .collect();
        if !starting.is_empty() {
            seq = self
                .sessions
                .append(self.session, turn, starting.clone())
                .await?;
            events.extend(starting);
        }
        let mut batch = self.results(turn, &run, &may_have_run).await;
        batch.extend(refused);
        if !batch.is_empty() {
            seq = self
                .sessions
                .append(self.session, turn, batch.clone())
                .await?;
            events.extend(batch);
        }
        Ok((events, seq))
    }

    /// Runs `calls` concurrently: their `tool_result` events, in order.
    async fn results(
        &self,
        turn: TurnRef,
        calls: &[OpenCall],
        may_have_run: &[bool],
    ) -> Vec<SessionEvent> {
        let tools = &self.options.tools;
        let results = futures::future::join_all(calls.iter().zip(may_have_run).map(|(c, &ran)| {
            let info = self.info(turn, c.round, c.index);
            async move {
                match tools.find(&c.call.name) {
                    Some(t) if ran && !t.is_repeatable() => Err(INTERRUPTED.to_owned()),
                    Some(t) => t
                        .call_with(&c.call.arguments, info)
                        .await
                        .map_err(|e| e.to_string()),
                    None => Err(AgentError::UnknownTool(c.call.name.clone()).to_string()),
                }
            }
        }))
        .await;
        calls
            .iter()
            .zip(results)
            .map(|(c, r)| {
                let (ok, output) = match r {
                    Ok(out) => (true, out),
                    Err(e) => (false, e),
                };
                SessionEvent::ToolResult {
                    turn: turn.turn,
                    call_id: c.call.id.clone(),
                    ok,
                    output,
                }
            })
            .collect()
    }

    /// Waits until every call of `approvals` is decided, holding no lease
    /// and no turn slot: by a person ([`Sessions::decide`]) or by its
    /// deadline, through a durable timer (and, should the timer be late or
    /// missing, by this turn itself shortly after the deadline). Reads the
    /// decisions from the session, so those journaled before (by an
    /// earlier attempt's wait, or while the process was down) count.
    async fn await_decisions(
        &self,
        turn: TurnRef,
        approvals: &[Approval],
        after: u64,
    ) -> Result<HashMap<String, Decided>, AgentError> {
        let mut decided: HashMap<String, Decided> = approvals
            .iter()
            .filter_map(|a| a.decision.clone().map(|d| (a.call_id.clone(), d)))
            .collect();
        if decided.len() == approvals.len() {
            return Ok(decided);
        }
        // Listen before reading the state, so no decision falls in between;
        // with no room for one more subscriber, read it every second.
        let mut events = self.sessions.subscribe(self.session, after).await.ok();
        let mut timers = Vec::new();
        let grace = match self.system.timers() {
            Some(t) => {
                for a in approvals.iter().filter(|a| a.decision.is_none()) {
                    let payload = serde_json::to_vec(&ApprovalTimer {
                        turn: turn.turn,
                        call_id: a.call_id.clone(),
                    })
                    .unwrap_or_default();
                    let target = troupe_actor::TimerTarget::new(APPROVAL_TIMER, self.session);
                    match t.schedule(target, "deadline", payload, a.deadline_ms).await {
                        Ok(id) => timers.push(id),
                        Err(e) => {
                            tracing::warn!(session = self.session, call = %a.call_id, error = %e,
                            "no durable timer for an approval deadline; the turn enforces it")
                        }
                    }
                }
                if timers.is_empty() { 0 } else { 2_000 }
            }
            None => 0,
        };
        if let Some(p) = &self.permit {
            p.release();
        }
        let waiting = Waiting::new();
        let result = async {
            let mut check = true;
            let mut enforce_at = approvals
                .iter()
                .filter(|a| a.decision.is_none())
                .map(|a| a.deadline_ms)
                .min()
                .unwrap_or(0)
                .saturating_add(grace);
            loop {
                if check {
                    let view = self.sessions.view(self.session).await?;
                    if view.pending != Some(turn) {
                        return Err(AgentError::StaleTurn {
                            session: self.session.to_owned(),
                            turn: turn.turn,
                            attempt: turn.attempt,
                        });
                    }
                    for a in &view.approvals {
                        if let Some(d) = &a.decision
                            && approvals.iter().any(|w| w.call_id == a.call_id)
                        {
                            decided.insert(a.call_id.clone(), d.clone());
                        }
                    }
                    if decided.len() == approvals.len() {
                        return Ok(());
                    }
                    check = false;
                }
                let now = troupe_journal::now_ms();
                if now >= enforce_at {
                    for a in approvals.iter().filter(|a| !decided.contains_key(&a.call_id)) {
                        if now >= a.deadline_ms {
                            match self.sessions.decide(self.session, &a.call_id, Decision::deadline()).await {
                                Ok(_) | Err(AgentError::AlreadyDecided { .. }) => {}
                                Err(e) => tracing::warn!(session = self.session, call = %a.call_id, error = %e,
                                    "could not journal an approval deadline; trying again"),
                            }
                        }
                    }
                    enforce_at = now + 1_000;
                    check = true;
                    continue;
                }
                let until = Duration::from_millis(enforce_at - now);
                match events.as_mut() {
                    Some(stream) => tokio::select! {
                        item = stream.next() => match item {
                            Some(Ok(SessionItem::Event(rec))) => {
                                check = matches!(
                                    rec.event,
                                    SessionEvent::ApprovalDecided { .. }
                                        | SessionEvent::TurnStarted { .. }
                                        | SessionEvent::TurnCompleted { .. }
                                        | SessionEvent::TurnFailed { .. }
                                        | SessionEvent::Closed { .. }
                                );
                            }
                            Some(Ok(SessionItem::Heartbeat)) => {}
                            Some(Err(_)) | None => {
                                events = None;
                                check = true;
                            }
                        },
                        _ = tokio::time::sleep(until) => {}
                    },
                    None => {
                        tokio::time::sleep(until.min(Duration::from_secs(1))).await;
                        check = true;
                    }
                }
            }
        }
        .await;
        drop(waiting);
        drop(events);
        if let Some(t) = self.system.timers() {
            for id in timers {
                let _ = t.cancel(id).await;
            }
        }
        if let Some(p) = &self.permit {
            p.reacquire().await;
        }
        result.map(|()| decided)
    }

    /// Reads the bytes of the attachments the backend takes as content
    /// parts, newest first, at most [`AgentOptions::max_attachment_bytes`]
    /// in all: older ones past the bound stay references in the text (the
    /// line naming each one), as do those of media types the backend does
    /// not take. Attachments of the turn being answered that alone pass
    /// the bound fail the turn with [`AgentError::TooLarge`].
    async fn load_attachments(
        &self,
        turn: u32,
        messages: &mut [ChatMessage],
    ) -> Result<(), AgentError> {
        let opts = self.options;
        let backend = self.inference.backend(&opts.backend)?;
        let current = messages.iter().rposition(|m| m.role == Role::User);
        let mut total = 0u64;
        for (i, m) in messages.iter_mut().enumerate().rev() {
            for a in m.attachments.iter_mut() {
                if a.data.is_some() || !backend.accepts(&a.blob.media_type) {
                    continue;
                }
                total = total.saturating_add(a.blob.size);
                if total > opts.max_attachment_bytes {
                    if Some(i) == current {
                        return Err(AgentError::TooLarge {
                            what: format!(
                                "attachment bytes of turn {turn} of session `{}` sent to `{}`",
                                self.session, opts.backend
                            ),
                            limit: opts.max_attachment_bytes as usize,
                        });
                    }
                    return Ok(());
                }
                let blobs = self.system.blobs().ok_or_else(|| AgentError::Invalid {
                    what: "attachment".into(),
                    message: format!(
                        "backend `{}` takes {} as content, but this system has no blob \
                         store to read {} from",
                        opts.backend, a.blob.media_type, a.blob.hash
                    ),
                })?;
                let bytes = blobs.get_bytes(&a.blob, a.blob.size).await?;
                a.data = Some(bytes.into());
            }
        }
        Ok(())
    }

    async fn answer(&self, turn: TurnRef, view: SessionView) -> Result<TurnOutcome, AgentError> {
        let opts = self.options;
        let session = self.session;
        let mut view = view;
        let mut outcome = TurnOutcome {
            turn,
            text: String::new(),
            tool_calls: 0,
            chunks: 0,
            seq: view.seq,
            usage: None,
        };
        // Typed answers rejected so far in this turn (earlier attempts too).
        let mut repairs = view.repairs;
        // Settle what an interrupted attempt left open, then read the
        // context again with those results in it.
        if !view.open_calls.is_empty() {
            let open = std::mem::take(&mut view.open_calls);
            let (_, seq) = self
                .run_calls(turn, &open, true, &view.approvals, view.seq)
                .await?;
            outcome.tool_calls += open.len() as u32;
            outcome.seq = seq;
            view = self.sessions.view(session).await?;
        }
        let mut messages: Vec<ChatMessage> = opts
            .system_prompt
            .iter()
            .map(|p| ChatMessage::system(p.clone()))
            .collect();
        messages.extend(view.messages);
        self.load_attachments(turn.turn, &mut messages).await?;
        let mut round = view.rounds;
        // The session's tenant may hold a lease for less than the agent would.
        let lease = self.system.lease_for(view.tenant.as_deref(), &opts.lease);
        loop {
            let mut request = ChatRequest::new(opts.model.clone(), messages.clone());
            request.tools = opts.tools.specs();
            request.response_format = opts.output.as_ref().map(|o| o.response_format());
            let mut repair: Option<String> = None;
            let mut stream = self
                .inference
                .stream(&opts.backend, request, &lease, &self.holder)
                .await?;
            outcome.text.clear();
            let mut calls: Vec<ToolCall> = Vec::new();
            let mut approvals: Vec<Approval> = Vec::new();
            let mut finished: Option<SessionEvent> = None;
            while finished.is_none() {
                // Wait for one chunk, then take whatever else is ready, so
                // chunks that arrive during an append share the next one.
                let mut batch = Vec::new();
                let mut next = Some(stream.next().await);
                while let Some(item) = next.take() {
                    let chunk = match item {
                        None => Err(AgentError::StreamClosed {
                            backend: opts.backend.clone(),
                            chunks: outcome.chunks,
                        }),
                        Some(r) => r,
                    };
                    match chunk {
                        Ok(Chunk::Text(text)) => {
                            outcome.text.push_str(&text);
                            outcome.chunks += 1;
                            batch.push(SessionEvent::ModelChunk {
                                turn: turn.turn,
                                text,
                            });
                        }
                        Ok(Chunk::ToolCall(call)) => calls.push(call),
                        Ok(Chunk::Done {
                            finish_reason,
                            usage,
                        }) => {
                            outcome.usage = match (outcome.usage, usage) {
                                (Some(a), Some(b)) => Some(a + b),
                                (a, b) => a.or(b),
                            };
                            finished = Some(SessionEvent::TurnCompleted {
                                turn: turn.turn,
                                finish_reason,
                                usage: outcome.usage,
                            });
                        }
                        Err(e) => {
                            if !batch.is_empty() {
                                self.sessions.append(session, turn, batch).await?;
                            }
                            return Err(e);
                        }
                    }
                    if finished.is_none() && batch.len() < opts.chunk_batch {
                        next = stream.next().now_or_never();
                    }
                }
                if finished.is_some() && !calls.is_empty() {
                    if calls.len() > opts.max_tool_calls {
                        return Err(AgentError::TooLarge {
                            what: format!(
                                "tool calls in one answer (turn {} of `{session}`)",
                                turn.turn
                            ),
                            limit: opts.max_tool_calls,
                        });
                    }
                    if round >= opts.max_tool_rounds {
                        return Err(AgentError::TooLarge {
                            what: format!(
                                "tool rounds of turn {} in session `{session}`",
                                turn.turn
                            ),
                            limit: opts.max_tool_rounds as usize,
                        });
                    }
                    // The calls are journaled before any of them runs,
                    // with the approvals they wait for, in one append.
                    batch.extend(calls.iter().map(|c| SessionEvent::ToolCalled {
                        turn: turn.turn,
                        call: c.clone(),
                    }));
                    let now = troupe_journal::now_ms();
                    approvals = calls
                        .iter()
                        .filter_map(|c| {
                            let wait = opts.tools.approval_for(&c.name)?;
                            Some(Approval {
                                call_id: c.id.clone(),
                                tool: c.name.clone(),
                                arguments: c.arguments.clone(),
                                deadline_ms: now.saturating_add(wait.as_millis() as u64),
                                decision: None,
                                started: false,
                            })
                        })
                        .collect();
                    batch.extend(approvals.iter().map(|a| SessionEvent::ApprovalRequested {
                        turn: turn.turn,
                        call_id: a.call_id.clone(),
                        tool: a.tool.clone(),
                        deadline_ms: a.deadline_ms,
                    }));
                } else if let Some(done) = finished.clone() {
                    // A typed answer is checked before the turn may end.
                    match opts.output.as_ref().map(|o| (o, o.validate(&outcome.text))) {
                        Some((schema, Err(m))) if repairs >= opts.max_repairs => {
                            if !batch.is_empty() {
                                self.sessions.append(session, turn, batch).await?;
                            }
                            return Err(AgentError::InvalidAnswer {
                                session: session.to_owned(),
                                turn: turn.turn,
                                schema: schema.name().to_owned(),
                                field: m.field,
                                message: m.message,
                                attempts: repairs + 1,
                            });
                        }
                        Some((schema, Err(m))) => {
                            let prompt = schema.repair_prompt(&m);
                            batch.push(SessionEvent::AnswerRejected {
                                turn: turn.turn,
                                field: m.field,
                                error: m.message,
                                repair: prompt.clone(),
                            });
                            repair = Some(prompt);
                        }
                        _ => batch.push(done),
                    }
                }
                if !batch.is_empty() {
                    outcome.seq = self.sessions.append(session, turn, batch).await?;
                }
            }
            drop(stream);
            if let Some(prompt) = repair.take() {
                // As the session's own fold does with `answer_rejected`.
                messages.push(ChatMessage::assistant(std::mem::take(&mut outcome.text)));
                messages.push(ChatMessage::user(prompt));
                repairs += 1;
                metrics::counter!("troupe_answers_rejected_total", "backend" => opts.backend.clone())
                    .increment(1);
                continue;
            }
            if calls.is_empty() {
                return Ok(outcome);
            }
            round += 1;
            let open: Vec<OpenCall> = calls
                .iter()
                .enumerate()
                .map(|(i, c)| OpenCall {
                    call: c.clone(),
                    round,
                    index: i as u32,
                })
                .collect();
            outcome.tool_calls += calls.len() as u32;
            let (events, seq) = self
                .run_calls(turn, &open, false, &approvals, outcome.seq)
                .await?;
            outcome.seq = seq;
            messages.push(ChatMessage {
                role: Role::Assistant,
                content: std::mem::take(&mut outcome.text),
                tool_calls: calls.clone(),
                tool_call_id: None,
                attachments: Vec::new(),
            });
            for e in events {
                if let SessionEvent::ToolResult {
                    call_id,
                    ok,
                    output,
                    ..
                } = e
                {
                    messages.push(ChatMessage {
                        role: Role::Tool,
                        content: if ok {
                            output
                        } else {
                            format!("error: {output}")
                        },
                        tool_calls: Vec::new(),
                        tool_call_id: Some(call_id),
                        attachments: Vec::new(),
                    });
                }
            }
        }
    }
}

pub(crate) fn failed_event(turn: u32, error: &AgentError) -> SessionEvent {
    SessionEvent::TurnFailed {
        turn,
        error: error.to_string(),
        retry_after_ms: error.retry_after().map(|d| d.as_millis() as u64),
    }
}

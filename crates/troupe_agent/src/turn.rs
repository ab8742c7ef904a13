//! One whole turn: the model's answer streamed into the session, its tool
//! calls run and journaled, rounds until the model answers in text.
//!
//! Run by [`Context::reply`](crate::Context::reply). An attempt starts with
//! `turn_started`; a new attempt of an interrupted turn first settles the
//! calls the interrupted one left without a journaled result (see the
//! [`tool`](crate::tool) module), then asks the model again with every
//! journaled result in its context, so no tool whose result was journaled
//! ever runs twice.

use futures::{FutureExt, StreamExt};

use crate::error::AgentError;
use crate::inference::{Holder, Inference};
use crate::model::{ChatMessage, ChatRequest, Chunk, Role, ToolCall};
use crate::session::{OpenCall, SessionEvent, SessionView, Sessions, TurnRef};
use crate::tool::ToolCallInfo;
use crate::{AgentOptions, TurnOutcome};

/// What a turn needs: where it is journaled, the models, who holds the
/// lease, and the agent's settings.
pub(crate) struct ReplyRun<'a> {
    pub sessions: &'a Sessions,
    pub inference: &'a Inference,
    pub session: &'a str,
    pub options: &'a AgentOptions,
    pub holder: Holder,
    pub system: crate::AgentSystem,
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

    /// Runs the calls of one round concurrently and journals every result
    /// in one append; returns the events and the last sequence. Calls
    /// `left_open` by an interrupted attempt may have run already: those of
    /// tools that must not run twice are failed instead.
    async fn run_calls(
        &self,
        turn: TurnRef,
        calls: &[OpenCall],
        left_open: bool,
    ) -> Result<(Vec<SessionEvent>, u64), AgentError> {
        let tools = &self.options.tools;
        let results = futures::future::join_all(calls.iter().map(|c| {
            let info = self.info(turn, c.round, c.index);
            async move {
                match tools.find(&c.call.name) {
                    Some(t) if left_open && !t.is_repeatable() => Err(INTERRUPTED.to_owned()),
                    Some(t) => t
                        .call_with(&c.call.arguments, info)
                        .await
                        .map_err(|e| e.to_string()),
                    None => Err(AgentError::UnknownTool(c.call.name.clone()).to_string()),
                }
            }
        }))
        .await;
        let events: Vec<SessionEvent> = calls
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
            .collect();
        let seq = self
            .sessions
            .append(self.session, turn, events.clone())
            .await?;
        Ok((events, seq))
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
            let (_, seq) = self.run_calls(turn, &open, true).await?;
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
                    // The calls are journaled before any of them runs.
                    batch.extend(calls.iter().map(|c| SessionEvent::ToolCalled {
                        turn: turn.turn,
                        call: c.clone(),
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
            let (events, seq) = self.run_calls(turn, &open, false).await?;
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

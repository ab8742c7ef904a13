//! Agents: typed actors with a context for models, tools, other agents,
//! topics and sessions.
//!
//! ```
//! use troupe_agent::{Agent, AgentContext, AgentError};
//!
//! /// Answers every session it is told about.
//! struct Echo;
//!
//! #[async_trait::async_trait]
//! impl Agent for Echo {
//!     type Msg = String; // a session id
//!     async fn handle(&mut self, ctx: &AgentContext, session: String) -> Result<(), AgentError> {
//!         let outcome = ctx.reply(&session).await?;
//!         ctx.publish("answered", outcome.turn).await?;
//!         Ok(())
//!     }
//! }
//! ```
//!
//! An agent handles one message at a time, like any actor. Returning an
//! error fails the agent: its supervisor restarts it with a fresh value
//! from its factory (the durable part of its work lives in sessions, which
//! survive). Register agents with [`AgentSystem::agent`], which gives a
//! [`ChildSpec`] for any supervisor and a restart-stable handle; agents
//! then reach each other by name with [`AgentContext::send`] and
//! [`AgentContext::ask`].
//!
//! [`AgentContext::reply`] runs one whole turn of a session: it starts an
//! attempt, streams the model's answer under a GPU lease, journals the
//! chunks (coalescing those that arrive while an append is in flight),
//! runs the tools the model calls and journals each call and result, and
//! ends the turn with `turn_completed` or `turn_failed`.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use ractor::{ActorCell, ActorProcessingErr, ActorRef, Message};
use troupe_actor::{ActorHandle, ChildSpec, Restart, SupervisorHandle, SupervisorSpec};

use crate::error::AgentError;
use crate::inference::{Holder, Inference, InferenceStream, LeaseSpec};
use crate::model::{ChatMessage, ChatRequest, Chunk, Role, ToolCall};
use crate::session::{SessionEvent, Sessions, TurnRef};
use crate::tool::Tools;
use crate::topic::{Published, Topics};

/// An agent. See the [module docs](self).
#[async_trait::async_trait]
pub trait Agent: Send + 'static {
    /// What it is sent. Requests that want an answer carry a
    /// [`ractor::RpcReplyPort`].
    type Msg: Message;

    /// Runs once per incarnation, before the first message.
    async fn started(&mut self, _ctx: &AgentContext) -> Result<(), AgentError> {
        Ok(())
    }

    /// Handles one message. An error fails the agent (its supervisor
    /// restarts it).
    async fn handle(&mut self, ctx: &AgentContext, msg: Self::Msg) -> Result<(), AgentError>;
}

/// How an agent runs and answers.
#[derive(Clone)]
pub struct AgentOptions {
    /// Restart policy under its supervisor.
    pub restart: Restart,
    /// Mailbox capacity.
    pub mailbox: usize,
    /// Tools the model may call.
    pub tools: Tools,
    /// Backend name (see [`Inference`]).
    pub backend: String,
    /// Model name, as the backend knows it.
    pub model: String,
    /// System prompt put before the session's messages.
    pub system_prompt: Option<String>,
    /// What each inference asks of the GPUs.
    pub lease: LeaseSpec,
    /// Most model calls in one turn that end in tool calls.
    pub max_tool_rounds: u32,
    /// Most tool calls in one model answer.
    pub max_tool_calls: usize,
    /// Most chunks journaled in one append.
    pub chunk_batch: usize,
}

impl Default for AgentOptions {
    /// Permanent, 1,024 messages, no tools, the `local` backend, default
    /// lease, 4 tool rounds of at most 16 calls, 64 chunks per append.
    fn default() -> Self {
        Self {
            restart: Restart::Permanent,
            mailbox: 1024,
            tools: Tools::new(),
            backend: "local".into(),
            model: "local".into(),
            system_prompt: None,
            lease: LeaseSpec::default(),
            max_tool_rounds: 4,
            max_tool_calls: 16,
            chunk_batch: 64,
        }
    }
}

impl AgentOptions {
    /// Sets the tools.
    pub fn tools(mut self, tools: Tools) -> Self {
        self.tools = tools;
        self
    }

    /// Sets the system prompt.
    pub fn system_prompt(mut self, prompt: impl Into<String>) -> Self {
        self.system_prompt = Some(prompt.into());
        self
    }

    /// Sets the lease each inference takes.
    pub fn lease(mut self, lease: LeaseSpec) -> Self {
        self.lease = lease;
        self
    }

    /// Sets the backend and model.
    pub fn model(mut self, backend: impl Into<String>, model: impl Into<String>) -> Self {
        self.backend = backend.into();
        self.model = model.into();
        self
    }
}

/// A registered agent: its handle (typed) and its options.
struct Registered {
    handle: Box<dyn Any + Send + Sync>,
    options: Arc<AgentOptions>,
}

struct SystemInner {
    directory: Mutex<HashMap<String, Registered>>,
    topics: Topics,
    sessions: Sessions,
    inference: Inference,
}

/// Agents by name, with the sessions, topics and models they share. Cheap
/// to clone.
#[derive(Clone)]
pub struct AgentSystem {
    inner: Arc<SystemInner>,
}

impl AgentSystem {
    /// A system over these sessions and models.
    pub fn new(sessions: Sessions, inference: Inference) -> Self {
        Self {
            inner: Arc::new(SystemInner {
                directory: Mutex::new(HashMap::new()),
                topics: Topics::new(),
                sessions,
                inference,
            }),
        }
    }

    /// The sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.inner.sessions
    }

    /// The topics.
    pub fn topics(&self) -> &Topics {
        &self.inner.topics
    }

    /// The models.
    pub fn inference(&self) -> &Inference {
        &self.inner.inference
    }

    /// Registers agent `name`: returns the child spec to put under a
    /// supervisor (each incarnation is a fresh `make()`) and a handle that
    /// stays valid across restarts. Names are unique.
    pub fn agent<A, F>(
        &self,
        name: &str,
        options: AgentOptions,
        make: F,
    ) -> Result<(ChildSpec, ActorHandle<A::Msg>), AgentError>
    where
        A: Agent,
        F: Fn() -> A + Send + Sync + 'static,
    {
        let mut dir = self
            .inner
            .directory
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if dir.contains_key(name) {
            return Err(AgentError::DuplicateAgent(name.to_owned()));
        }
        let shared = Arc::new(options.clone());
        let template = AgentContext {
            name: Arc::from(name),
            myself: None,
            system: self.clone(),
            options: shared.clone(),
        };
        let make: Arc<dyn Fn() -> A + Send + Sync> = Arc::new(make);
        let (spec, handle) = ChildSpec::actor(name, options.restart, options.mailbox, move || {
            (
                AgentActor {
                    make: make.clone(),
                    template: template.clone(),
                },
                (),
            )
        });
        dir.insert(
            name.to_owned(),
            Registered {
                handle: Box::new(handle.clone()),
                options: shared,
            },
        );
        Ok((spec, handle))
    }

    /// Registers agent `name` and starts it under a supervisor of its own
    /// (one-for-one, OTP's default intensity).
    pub async fn spawn<A, F>(
        &self,
        name: &str,
        options: AgentOptions,
        make: F,
    ) -> Result<(ActorHandle<A::Msg>, SupervisorHandle), AgentError>
    where
        A: Agent,
        F: Fn() -> A + Send + Sync + 'static,
    {
        let (child, handle) = self.agent(name, options, make)?;
        let sup = SupervisorHandle::spawn(SupervisorSpec::new(format!("{name}-sup")).child(child))
            .await?;
        Ok((handle, sup))
    }

    fn registered<T>(&self, name: &str, f: impl FnOnce(&Registered) -> T) -> Result<T, AgentError> {
        let dir = self
            .inner
            .directory
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        dir.get(name)
            .map(f)
            .ok_or_else(|| AgentError::UnknownAgent(name.to_owned()))
    }

    /// The handle of agent `name`, if it takes messages of type `M`.
    pub fn handle<M: Message>(&self, name: &str) -> Result<ActorHandle<M>, AgentError> {
        self.registered(name, |r| r.handle.downcast_ref::<ActorHandle<M>>().cloned())?
            .ok_or_else(|| AgentError::WrongMessageType {
                name: format!("agent `{name}`"),
                expected: std::any::type_name::<M>(),
            })
    }

    /// A context of agent `name` outside its actor: for work that belongs
    /// to the agent (its tools, model, lease) but runs in the caller's task,
    /// such as a gateway worker answering a session turn. Leases taken
    /// through it are held by the caller's task and freed when it drops
    /// them (no actor is watched).
    pub fn context(&self, name: &str) -> Result<AgentContext, AgentError> {
        let options = self.registered(name, |r| r.options.clone())?;
        Ok(AgentContext {
            name: Arc::from(name),
            myself: None,
            system: self.clone(),
            options,
        })
    }

    /// Names of the registered agents, sorted.
    pub fn agents(&self) -> Vec<String> {
        let dir = self
            .inner
            .directory
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = dir.keys().cloned().collect();
        names.sort();
        names
    }
}

/// What an agent works through. Cheap to clone (for tasks an agent spawns).
#[derive(Clone)]
pub struct AgentContext {
    name: Arc<str>,
    myself: Option<ActorCell>,
    system: AgentSystem,
    options: Arc<AgentOptions>,
}

/// The outcome of one turn run by [`AgentContext::reply`].
#[derive(Debug, Clone, PartialEq)]
pub struct TurnOutcome {
    /// The turn and attempt answered.
    pub turn: TurnRef,
    /// The reply's text (of the last model call).
    pub text: String,
    /// Tool calls made.
    pub tool_calls: u32,
    /// Chunks journaled.
    pub chunks: u32,
    /// Sequence of the `turn_completed` event.
    pub seq: u64,
}

impl AgentContext {
    /// This agent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The system it belongs to.
    pub fn system(&self) -> &AgentSystem {
        &self.system
    }

    /// The sessions.
    pub fn sessions(&self) -> &Sessions {
        self.system.sessions()
    }

    /// This agent's options.
    pub fn options(&self) -> &AgentOptions {
        &self.options
    }

    /// Sends `msg` to agent `agent`; fails at once if its mailbox is full.
    pub fn send<M: Message>(&self, agent: &str, msg: M) -> Result<(), AgentError> {
        self.system
            .handle::<M>(agent)?
            .tell(msg)
            .map_err(|r| r.error.into())
    }

    /// Sends `msg` to agent `agent`, waiting up to `timeout` for room.
    pub async fn send_timeout<M: Message>(
        &self,
        agent: &str,
        msg: M,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        self.system
            .handle::<M>(agent)?
            .send(msg, timeout)
            .await
            .map_err(|r| r.error.into())
    }

    /// Asks agent `agent` and waits for the answer (`timeout` bounds it all).
    pub async fn ask<M: Message, R: Send + 'static>(
        &self,
        agent: &str,
        build: impl FnOnce(ractor::RpcReplyPort<R>) -> M,
        timeout: Duration,
    ) -> Result<R, AgentError> {
        Ok(self.system.handle::<M>(agent)?.ask(build, timeout).await?)
    }

    /// Publishes `msg` on topic `topic` (see [`Topics::publish`]).
    pub async fn publish<M: Clone + Message>(
        &self,
        topic: &str,
        msg: M,
    ) -> Result<Published, AgentError> {
        self.system.topics().publish(topic, msg).await
    }

    /// Calls one of this agent's tools.
    pub async fn call_tool(&self, name: &str, arguments: &str) -> Result<String, AgentError> {
        self.options.tools.call(name, arguments).await
    }

    /// Streams a model answer under a lease held by this agent (freed if
    /// the agent dies).
    pub async fn infer(&self, request: ChatRequest) -> Result<InferenceStream, AgentError> {
        let holder = Holder {
            name: self.name.to_string(),
            actor: self.myself.clone(),
        };
        self.system
            .inference()
            .stream(&self.options.backend, request, &self.options.lease, &holder)
            .await
    }

    /// Ends the pending turn of `session` as failed with `error` (and its
    /// retry hint): for an agent that cannot answer (its own model call
    /// failed, it routes nowhere) so the client is not left waiting.
    pub async fn fail_turn(&self, session: &str, error: &AgentError) -> Result<u64, AgentError> {
        let sessions = self.sessions();
        let turn = sessions.begin(session, &self.options.backend).await?;
        sessions
            .append(session, turn, vec![failed_event(turn, error)])
            .await
    }

    /// Answers the pending user turn of `session` (see the [module docs](self)).
    /// A failure is journaled as `turn_failed` (with the retry hint of an
    /// overload) and returned.
    pub async fn reply(&self, session: &str) -> Result<TurnOutcome, AgentError> {
        let sessions = self.sessions();
        let turn = sessions.begin(session, &self.options.backend).await?;
        match self.answer(session, turn).await {
            Ok(outcome) => Ok(outcome),
            Err(e) => {
                let stale = matches!(
                    e,
                    AgentError::StaleTurn { .. }
                        | AgentError::UnknownSession(_)
                        | AgentError::SessionClosed(_)
                );
                if !stale
                    && let Err(j) = sessions
                        .append(session, turn, vec![failed_event(turn, &e)])
                        .await
                {
                    tracing::warn!(session, error = %j, "could not journal a failed turn");
                }
                Err(e)
            }
        }
    }

    async fn answer(&self, session: &str, turn: TurnRef) -> Result<TurnOutcome, AgentError> {
        let sessions = self.sessions();
        let opts = &self.options;
        let view = sessions.view(session).await?;
        let mut messages: Vec<ChatMessage> = opts
            .system_prompt
            .iter()
            .map(|p| ChatMessage::system(p.clone()))
            .collect();
        messages.extend(view.messages);
        let holder = Holder {
            name: format!("{}/{session}", self.name),
            actor: self.myself.clone(),
        };
        let mut outcome = TurnOutcome {
            turn,
            text: String::new(),
            tool_calls: 0,
            chunks: 0,
            seq: 0,
        };
        for _round in 0..=opts.max_tool_rounds {
            let mut request = ChatRequest::new(opts.model.clone(), messages.clone());
            request.tools = opts.tools.specs();
            let mut stream = self
                .system
                .inference()
                .stream(&opts.backend, request, &opts.lease, &holder)
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
                            finished = Some(SessionEvent::TurnCompleted {
                                turn: turn.turn,
                                finish_reason,
                                usage,
                            });
                        }
                        Err(e) => {
                            if !batch.is_empty() {
                                sessions.append(session, turn, batch).await?;
                            }
                            return Err(e);
                        }
                    }
                    if finished.is_none() && batch.len() < opts.chunk_batch {
                        next = stream.next().now_or_never();
                    }
                }
                if finished.is_some() && calls.is_empty() {
                    batch.extend(finished.clone());
                } else if finished.is_some() {
                    batch.extend(calls.iter().map(|c| SessionEvent::ToolCalled {
                        turn: turn.turn,
                        call: c.clone(),
                    }));
                }
                if !batch.is_empty() {
                    outcome.seq = sessions.append(session, turn, batch).await?;
                }
            }
            drop(stream);
            if calls.is_empty() {
                return Ok(outcome);
            }
            if calls.len() > opts.max_tool_calls {
                return Err(AgentError::TooLarge {
                    what: format!(
                        "tool calls in one answer (turn {} of `{session}`)",
                        turn.turn
                    ),
                    limit: opts.max_tool_calls,
                });
            }
            // Run the calls concurrently; journal every result in one append.
            outcome.tool_calls += calls.len() as u32;
            let results = futures::future::join_all(
                calls.iter().map(|c| opts.tools.call(&c.name, &c.arguments)),
            )
            .await;
            messages.push(ChatMessage {
                role: Role::Assistant,
                content: std::mem::take(&mut outcome.text),
                tool_calls: calls.clone(),
                tool_call_id: None,
            });
            let mut events = Vec::with_capacity(calls.len());
            for (call, result) in calls.iter().zip(results) {
                let (ok, output) = match result {
                    Ok(out) => (true, out),
                    Err(e) => (false, e.to_string()),
                };
                messages.push(ChatMessage {
                    role: Role::Tool,
                    content: if ok {
                        output.clone()
                    } else {
                        format!("error: {output}")
                    },
                    tool_calls: Vec::new(),
                    tool_call_id: Some(call.id.clone()),
                });
                events.push(SessionEvent::ToolResult {
                    turn: turn.turn,
                    call_id: call.id.clone(),
                    ok,
                    output,
                });
            }
            outcome.seq = sessions.append(session, turn, events).await?;
        }
        Err(AgentError::TooLarge {
            what: format!("tool rounds of turn {} in session `{session}`", turn.turn),
            limit: opts.max_tool_rounds as usize,
        })
    }
}

fn failed_event(turn: TurnRef, error: &AgentError) -> SessionEvent {
    SessionEvent::TurnFailed {
        turn: turn.turn,
        error: error.to_string(),
        retry_after_ms: error.retry_after().map(|d| d.as_millis() as u64),
    }
}

/// The ractor actor that runs an [`Agent`].
pub struct AgentActor<A: Agent> {
    make: Arc<dyn Fn() -> A + Send + Sync>,
    template: AgentContext,
}

impl<A: Agent> ractor::Actor for AgentActor<A> {
    type Msg = A::Msg;
    type State = (A, AgentContext);
    type Arguments = ();

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        _: (),
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut ctx = self.template.clone();
        ctx.myself = Some(myself.get_cell());
        let mut agent = (self.make)();
        agent.started(&ctx).await?;
        Ok((agent, ctx))
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (agent, ctx) = state;
        agent.handle(ctx, msg).await.map_err(|e| {
            tracing::warn!(agent = %ctx.name, error = %e, "agent failed");
            Box::new(e) as ActorProcessingErr
        })
    }
}

//! Agents reachable by name from any node.

use std::any::{Any, type_name};
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use ractor::RpcReplyPort;
use troupe_actor::{ActorHandle, Rejected};

use super::{ClusterError, ClusterNode, Frame, Route, Wire, decode, encode, rejected, write};

type LocalTell = Box<dyn Fn(Box<dyn Any + Send>) -> Result<(), ClusterError> + Send + Sync>;
type RemoteTell = Box<dyn Fn(&str, &[u8]) -> Result<(), ClusterError> + Send + Sync>;
type LocalAsk = Box<
    dyn Fn(
            Box<dyn Any + Send>,
            Duration,
        ) -> BoxFuture<'static, Result<Box<dyn Any + Send>, ClusterError>>
        + Send
        + Sync,
>;
type RemoteAsk = Box<
    dyn Fn(String, Vec<u8>, Duration) -> BoxFuture<'static, Result<Vec<u8>, ClusterError>>
        + Send
        + Sync,
>;

/// An agent exposed on this node: how to turn its wire messages into the
/// actor's own.
pub(crate) struct Exposed {
    name: String,
    tell: Option<(&'static str, LocalTell, RemoteTell)>,
    ask: Option<(&'static str, LocalAsk, RemoteAsk)>,
}

fn mismatch(node: &str, agent: &str, expected: &str, what: &str) -> ClusterError {
    ClusterError::Codec {
        node: node.to_owned(),
        op: "decode".into(),
        what: format!("{what} for agent `{agent}`"),
        reason: format!("the agent takes `{expected}`"),
    }
}

impl Exposed {
    pub(crate) fn tell_remote(&self, node: &str, body: &[u8]) -> Result<(), ClusterError> {
        match &self.tell {
            Some((_, _, remote)) => remote(node, body),
            None => Err(ClusterError::NotAccepted {
                name: self.name.clone(),
                what: "tells".into(),
            }),
        }
    }

    pub(crate) async fn ask_remote(
        &self,
        node: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClusterError> {
        match &self.ask {
            Some((_, _, remote)) => remote(node.to_owned(), body, timeout).await,
            None => Err(ClusterError::NotAccepted {
                name: self.name.clone(),
                what: "asks".into(),
            }),
        }
    }
}

/// Builder returned by [`ClusterNode::expose`]: say which wire messages the
/// agent takes, then [`Expose::register`].
#[must_use = "an agent is reachable only once registered"]
pub struct Expose<M: ractor::Message> {
    node: ClusterNode,
    name: String,
    handle: ActorHandle<M>,
    tell: Option<(&'static str, LocalTell, RemoteTell)>,
    ask: Option<(&'static str, LocalAsk, RemoteAsk)>,
}

impl<M: ractor::Message> Expose<M> {
    /// The agent takes tells of `T` (one type: make it an enum for several),
    /// each turned into the actor's message by `wrap`. A tell that finds the
    /// mailbox full is dropped (fail fast, as a local `tell`); remote drops
    /// are counted in `troupe_cluster_tells_dropped_total`.
    pub fn tells<T: Wire>(mut self, wrap: impl Fn(T) -> M + Send + Sync + 'static) -> Self {
        let wrap = Arc::new(wrap);
        let (h1, h2) = (self.handle.clone(), self.handle.clone());
        let (w1, w2) = (wrap.clone(), wrap);
        let (n1, n2) = (self.name.clone(), self.name.clone());
        let me1 = self.node.inner.name.clone();
        let local: LocalTell = Box::new(move |msg| {
            let msg = msg
                .downcast::<T>()
                .map_err(|_| mismatch(&me1, &n1, type_name::<T>(), "a tell"))?;
            h1.tell(w1(*msg))
                .map_err(|Rejected { error, .. }| rejected(&me1, &n1, &error))
        });
        let remote: RemoteTell = Box::new(move |node, body| {
            let msg: T = decode(node, &format!("tell for `{n2}`"), body)?;
            h2.tell(w2(msg))
                .map_err(|Rejected { error, .. }| rejected(node, &n2, &error))
        });
        self.tell = Some((type_name::<T>(), local, remote));
        self
    }

    /// The agent answers asks of `Q` with `R`: `wrap` builds the actor's
    /// message around the question and a reply port.
    pub fn asks<Q: Wire, R: Wire>(
        mut self,
        wrap: impl Fn(Q, RpcReplyPort<R>) -> M + Send + Sync + 'static,
    ) -> Self {
        let wrap = Arc::new(wrap);
        let (h1, h2) = (self.handle.clone(), self.handle.clone());
        let (w1, w2) = (wrap.clone(), wrap);
        let (n1, n2) = (self.name.clone(), self.name.clone());
        let me1 = self.node.inner.name.clone();
        let local: LocalAsk = Box::new(move |q, timeout| {
            let (h, w, n, me) = (h1.clone(), w1.clone(), n1.clone(), me1.clone());
            async move {
                let q = q
                    .downcast::<Q>()
                    .map_err(|_| mismatch(&me, &n, type_name::<Q>(), "an ask"))?;
                let r: R = h
                    .ask(|port| w(*q, port), timeout)
                    .await
                    .map_err(|e| rejected(&me, &n, &e))?;
                Ok(Box::new(r) as Box<dyn Any + Send>)
            }
            .boxed()
        });
        let remote: RemoteAsk = Box::new(move |node, body, timeout| {
            let (h, w, n) = (h2.clone(), w2.clone(), n2.clone());
            async move {
                let q: Q = decode(&node, &format!("ask for `{n}`"), &body)?;
                let r: R = h
                    .ask(|port| w(q, port), timeout)
                    .await
                    .map_err(|e| rejected(&node, &n, &e))?;
                encode(&node, &format!("reply of `{n}`"), &r)
            }
            .boxed()
        });
        self.ask = Some((type_name::<Q>(), local, remote));
        self
    }

    /// Makes the agent reachable from every node under its name. Several
    /// nodes may expose one name: callers use their own node's, or take
    /// the others in turn.
    pub fn register(self) -> Result<(), ClusterError> {
        if self.tell.is_none() && self.ask.is_none() {
            return Err(ClusterError::Config(format!(
                "agent `{}` exposed without `tells` or `asks`",
                self.name
            )));
        }
        let inner = &self.node.inner;
        {
            let mut agents = write(&inner.agents);
            if agents.contains_key(&self.name) {
                return Err(ClusterError::Config(format!(
                    "agent `{}` is already exposed on node `{}`",
                    self.name, inner.name
                )));
            }
            agents.insert(
                self.name.clone(),
                Arc::new(Exposed {
                    name: self.name.clone(),
                    tell: self.tell,
                    ask: self.ask,
                }),
            );
        }
        inner.join_group(format!("agent:{}", self.name));
        inner.refresh();
        Ok(())
    }
}

/// A name that reaches an agent wherever it runs. Resolved at every
/// message, so it follows the agent if its node changes.
#[derive(Clone, Debug)]
pub struct AgentRef {
    node: ClusterNode,
    name: String,
}

impl AgentRef {
    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node that would get a message now (this node if it exposes the
    /// agent).
    pub fn location(&self) -> Result<String, ClusterError> {
        match self.node.inner.route_agent(&self.name)? {
            Route::Local => Ok(self.node.inner.name.clone()),
            Route::Remote(n, _) => Ok(n),
        }
    }

    /// Sends `msg` one way. Errors say what is known at the sending end
    /// (unknown agent, the local mailbox full, the connection closed); a
    /// remote drop is not reported back: use [`AgentRef::ask`] when the
    /// sender must know. Tells from one node to one agent arrive in order.
    pub fn tell<T: Wire>(&self, msg: T) -> Result<(), ClusterError> {
        let inner = &self.node.inner;
        match inner.route_agent(&self.name)? {
            Route::Local => {
                let exposed = super::read(&inner.agents).get(&self.name).cloned();
                match exposed.as_ref().and_then(|e| e.tell.as_ref()) {
                    Some((_, local, _)) => local(Box::new(msg)),
                    None => Err(ClusterError::NotAccepted {
                        name: self.name.clone(),
                        what: "tells".into(),
                    }),
                }
            }
            Route::Remote(node, cell) => {
                let body = encode(&inner.name, &format!("tell for `{}`", self.name), &msg)?;
                let frame = Frame::Tell {
                    agent: self.name.clone(),
                    body: serde_bytes::ByteBuf::from(body),
                };
                inner.cast(&node, &cell, &frame)
            }
        }
    }

    /// Asks the agent and waits up to `timeout` for its answer.
    pub async fn ask<Q: Wire, R: Wire>(
        &self,
        question: Q,
        timeout: Duration,
    ) -> Result<R, ClusterError> {
        let inner = &self.node.inner;
        match inner.route_agent(&self.name)? {
            Route::Local => {
                let exposed = super::read(&inner.agents).get(&self.name).cloned();
                let Some((_, local, _)) = exposed.as_ref().and_then(|e| e.ask.as_ref()) else {
                    return Err(ClusterError::NotAccepted {
                        name: self.name.clone(),
                        what: "asks".into(),
                    });
                };
                let r = local(Box::new(question), timeout).await?;
                r.downcast::<R>()
                    .map(|r| *r)
                    .map_err(|_| mismatch(&inner.name, &self.name, "another reply type", "a reply"))
            }
            Route::Remote(node, cell) => {
                let body = encode(&inner.name, &format!("ask for `{}`", self.name), &question)?;
                let frame = Frame::Ask {
                    agent: self.name.clone(),
                    body: serde_bytes::ByteBuf::from(body),
                    timeout_ms: timeout.as_millis() as u64,
                };
                // A little longer than the agent's own time-out, so that its
                // answer (a time-out included) gets back.
                let wait = timeout + Duration::from_millis(500);
                let reply = inner
                    .call(&node, &cell, &frame, &format!("ask {}", self.name), wait)
                    .await?;
                decode(&inner.name, &format!("reply of `{}`", self.name), &reply)
            }
        }
    }
}

impl ClusterNode {
    /// Starts exposing the actor behind `handle` under `name`: chain
    /// [`Expose::tells`] and/or [`Expose::asks`], then
    /// [`Expose::register`].
    pub fn expose<M: ractor::Message>(
        &self,
        name: impl Into<String>,
        handle: ActorHandle<M>,
    ) -> Expose<M> {
        Expose {
            node: self.clone(),
            name: name.into(),
            handle,
            tell: None,
            ask: None,
        }
    }

    /// A reference to the agent named `name`, wherever it runs.
    pub fn agent(&self, name: impl Into<String>) -> AgentRef {
        AgentRef {
            node: self.clone(),
            name: name.into(),
        }
    }
}

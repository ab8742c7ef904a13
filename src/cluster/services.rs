//! Keyed services: anything addressed by a key (a session, a saga, your
//! own kind) placed on the ring and reached from any node.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use troupe_agent::{AgentError, Posted, SessionView, Sessions};
use troupe_saga::{SagaError, SagaStatus, Sagas};

use super::{
    ClusterError, ClusterNode, HashRing, KindDispatch, Rebalance, Route, Wire, decode, encode,
};

type Local<Q, R> =
    Arc<dyn Fn(String, Q, Duration) -> BoxFuture<'static, Result<R, ClusterError>> + Send + Sync>;

/// Requests of type `Q` answered with `R`, for keys of one kind, served by
/// the node that owns each key. Get one from [`ClusterNode::host_keyed`]
/// (a node that serves the kind) or [`ClusterNode::keyed`] (one that only
/// calls). Cheap to clone.
pub struct Keyed<Q, R> {
    node: ClusterNode,
    kind: String,
    local: Option<Local<Q, R>>,
    _types: PhantomData<fn(Q) -> R>,
}

impl<Q, R> Clone for Keyed<Q, R> {
    fn clone(&self) -> Self {
        Self {
            node: self.node.clone(),
            kind: self.kind.clone(),
            local: self.local.clone(),
            _types: PhantomData,
        }
    }
}

impl<Q: Wire, R: Wire> Keyed<Q, R> {
    /// Sends `request` for `key` to the node that owns it (this one: no
    /// serialization) and waits up to `timeout` for the answer.
    pub async fn ask(&self, key: &str, request: Q, timeout: Duration) -> Result<R, ClusterError> {
        let inner = &self.node.inner;
        match (inner.route_entity(&self.kind, key)?, &self.local) {
            (Route::Local, Some(local)) => {
                match tokio::time::timeout(timeout, local(key.to_owned(), request, timeout)).await {
                    Ok(r) => r,
                    Err(_) => Err(ClusterError::Timeout {
                        node: inner.name.clone(),
                        operation: format!("{}/{key}", self.kind),
                        after: timeout,
                    }),
                }
            }
            // Remote, or served here through a handle that does not host the
            // kind (the registered server answers it, encoded).
            _ => {
                let what = format!("request for {}/{key}", self.kind);
                let body = encode(&inner.name, &what, &request)?;
                let reply = inner
                    .clone()
                    .serve_entity(self.kind.clone(), key.to_owned(), body, 0, timeout)
                    .await?;
                decode(
                    &inner.name,
                    &format!("reply of {}/{key}", self.kind),
                    &reply,
                )
            }
        }
    }

    /// The node that owns `key` now.
    pub fn owner(&self, key: &str) -> Result<String, ClusterError> {
        self.node.owner_of(&self.kind, key)
    }
}

impl ClusterNode {
    /// Serves kind `kind` on this node: `serve(key, request, timeout)`
    /// answers the requests for the keys this node owns, and
    /// `on_change(ring, this_node)` runs after every membership change (hand
    /// over what moved: stop or passivate what this node no longer owns,
    /// resume what it now owns) and returns how many keys it moved.
    pub fn host_keyed<Q, R, F, Fut, C, CFut>(
        &self,
        kind: &str,
        serve: F,
        on_change: C,
    ) -> Result<Keyed<Q, R>, ClusterError>
    where
        Q: Wire,
        R: Wire,
        F: Fn(String, Q, Duration) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, ClusterError>> + Send + 'static,
        C: Fn(Arc<HashRing>, String) -> CFut + Send + Sync + 'static,
        CFut: Future<Output = usize> + Send + 'static,
    {
        let serve = Arc::new(serve);
        let s = serve.clone();
        let local: Local<Q, R> = Arc::new(move |key, q, timeout| s(key, q, timeout).boxed());
        let name = self.inner.name.clone();
        let k = kind.to_owned();
        let dispatch: KindDispatch =
            Arc::new(move |key: String, body: Vec<u8>, timeout: Duration| {
                let (serve, name, k) = (serve.clone(), name.clone(), k.clone());
                async move {
                    let q: Q = decode(&name, &format!("request for {k}/{key}"), &body)?;
                    let what = format!("reply of {k}/{key}");
                    let r =
                        match tokio::time::timeout(timeout, serve(key.clone(), q, timeout)).await {
                            Ok(r) => r?,
                            Err(_) => {
                                return Err(ClusterError::Timeout {
                                    node: name,
                                    operation: format!("{k}/{key}"),
                                    after: timeout,
                                });
                            }
                        };
                    encode(&name, &what, &r).map(serde_bytes::ByteBuf::from)
                }
                .boxed()
            });
        let rebalance: Rebalance = Arc::new(move |ring, me| on_change(ring, me).boxed());
        self.inner.register_kind(kind, dispatch, rebalance)?;
        Ok(Keyed {
            node: self.clone(),
            kind: kind.to_owned(),
            local: Some(local),
            _types: PhantomData,
        })
    }

    /// Calls kind `kind` served on other nodes, without serving it here.
    pub fn keyed<Q: Wire, R: Wire>(&self, kind: &str) -> Keyed<Q, R> {
        Keyed {
            node: self.clone(),
            kind: kind.to_owned(),
            local: None,
            _types: PhantomData,
        }
    }
}

fn agent_error(node: &str, target: &str, e: AgentError) -> ClusterError {
    ClusterError::Rejected {
        node: node.to_owned(),
        target: target.to_owned(),
        retryable: e.is_transient(),
        reason: e.to_string(),
    }
}

fn saga_error(node: &str, target: &str, e: SagaError) -> ClusterError {
    ClusterError::Rejected {
        node: node.to_owned(),
        target: target.to_owned(),
        // NotRunning: the saga may be resuming on a new owner right now.
        retryable: matches!(
            e,
            SagaError::Overloaded { .. } | SagaError::Journal(_) | SagaError::NotRunning(_)
        ),
        reason: e.to_string(),
    }
}

// ---------------------------------------------------------------- sessions

/// A session operation, as it crosses nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SessionRequest {
    /// Create the session (idempotent for the same agent and tenant).
    Open {
        /// The agent that answers it.
        agent: String,
        /// Its tenant.
        tenant: Option<String>,
    },
    /// Journal a user turn.
    Post {
        /// The text.
        text: String,
    },
    /// Read the session's state.
    View,
    /// Close the session.
    Close {
        /// Why.
        reason: String,
    },
}

/// The answer to a [`SessionRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SessionReply {
    /// Opened.
    Opened,
    /// The posted turn.
    Posted(Posted),
    /// The session's state.
    View(Box<SessionView>),
    /// Closed at this sequence.
    Closed(u64),
}

/// Durable sessions spread over the nodes: each session is served by the
/// node that owns its id, and moves (recovering from the shared journal)
/// when members change. Subscriptions stay local: subscribe on the owner
/// ([`ClusterSessions::owner`]) or replay the shared journal.
#[derive(Clone)]
pub struct ClusterSessions {
    keyed: Keyed<SessionRequest, SessionReply>,
}

/// The keyed kind of sessions.
const SESSION_KIND: &str = "session";

async fn serve_session(
    sessions: Sessions,
    node: String,
    id: String,
    request: SessionRequest,
) -> Result<SessionReply, ClusterError> {
    let target = format!("session/{id}");
    let r = match request {
        SessionRequest::Open { agent, tenant } => sessions
            .open(&id, &agent, tenant.as_deref())
            .await
            .map(|()| SessionReply::Opened),
        SessionRequest::Post { text } => sessions.post(&id, &text).await.map(SessionReply::Posted),
        SessionRequest::View => sessions
            .view(&id)
            .await
            .map(|v| SessionReply::View(Box::new(v))),
        SessionRequest::Close { reason } => {
            sessions.close(&id, &reason).await.map(SessionReply::Closed)
        }
    };
    r.map_err(|e| agent_error(&node, &target, e))
}

impl ClusterNode {
    /// Serves sessions on this node (journaling into `sessions`' journal,
    /// which every node serving sessions must share).
    pub fn host_sessions(&self, sessions: Sessions) -> Result<ClusterSessions, ClusterError> {
        let (serving, moving) = (sessions.clone(), sessions);
        let node = self.inner.name.clone();
        let keyed = self.host_keyed(
            SESSION_KIND,
            move |id, request, _timeout| serve_session(serving.clone(), node.clone(), id, request),
            move |ring: Arc<HashRing>, me: String| {
                let sessions = moving.clone();
                async move {
                    sessions
                        .passivate_where(|id| ring.owner(id).is_some_and(|o| o != me))
                        .await
                }
            },
        )?;
        Ok(ClusterSessions { keyed })
    }

    /// Calls sessions served on other nodes.
    pub fn session_client(&self) -> ClusterSessions {
        ClusterSessions {
            keyed: self.keyed(SESSION_KIND),
        }
    }
}

impl ClusterSessions {
    /// Creates session `id` on the node that owns it (idempotent for the
    /// same agent and tenant: retry it freely).
    pub async fn open(
        &self,
        id: &str,
        agent: &str,
        tenant: Option<&str>,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let request = SessionRequest::Open {
            agent: agent.to_owned(),
            tenant: tenant.map(str::to_owned),
        };
        self.keyed.ask(id, request, timeout).await.map(drop)
    }

    /// Creates a session with a fresh random id on the node that owns it.
    /// A retry after a time-out may create a second session: to retry
    /// safely, pick the id yourself and call [`ClusterSessions::open`].
    pub async fn create(
        &self,
        agent: &str,
        tenant: Option<&str>,
        timeout: Duration,
    ) -> Result<String, ClusterError> {
        let id = format!("{:032x}", rand::random::<u128>());
        let request = SessionRequest::Open {
            agent: agent.to_owned(),
            tenant: tenant.map(str::to_owned),
        };
        self.keyed.ask(&id, request, timeout).await?;
        Ok(id)
    }

    /// Sends one operation to session `id`.
    pub async fn ask(
        &self,
        id: &str,
        request: SessionRequest,
        timeout: Duration,
    ) -> Result<SessionReply, ClusterError> {
        self.keyed.ask(id, request, timeout).await
    }

    /// Journals a user turn.
    pub async fn post(
        &self,
        id: &str,
        text: &str,
        timeout: Duration,
    ) -> Result<Posted, ClusterError> {
        match self
            .ask(
                id,
                SessionRequest::Post {
                    text: text.to_owned(),
                },
                timeout,
            )
            .await?
        {
            SessionReply::Posted(p) => Ok(p),
            other => Err(unexpected("post", &other)),
        }
    }

    /// The session's state.
    pub async fn view(&self, id: &str, timeout: Duration) -> Result<SessionView, ClusterError> {
        match self.ask(id, SessionRequest::View, timeout).await? {
            SessionReply::View(v) => Ok(*v),
            other => Err(unexpected("view", &other)),
        }
    }

    /// The node serving session `id` now.
    pub fn owner(&self, id: &str) -> Result<String, ClusterError> {
        self.keyed.owner(id)
    }
}

fn unexpected(op: &str, reply: &impl std::fmt::Debug) -> ClusterError {
    ClusterError::Codec {
        node: String::new(),
        op: "decode".into(),
        what: format!("reply to `{op}`"),
        reason: format!("unexpected {reply:?}"),
    }
}

// ---------------------------------------------------------------- sagas

/// A saga operation, as it crosses nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SagaRequest {
    /// Start an instance of `definition` under the key.
    Start {
        /// The workflow.
        definition: String,
        /// Its input (JSON).
        input: Value,
    },
    /// Deliver a signal.
    Signal {
        /// The signal's name.
        name: String,
        /// Its payload (JSON).
        payload: Value,
    },
    /// The saga's status.
    Status,
}

/// The answer to a [`SagaRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SagaReply {
    /// Started.
    Started,
    /// Whether a step was waiting for the signal.
    Signalled(bool),
    /// The status.
    Status(SagaStatus),
}

/// Sagas spread over the nodes: each runs on the node that owns its id.
/// When members change, a node stops the sagas it no longer owns and
/// resumes, from the shared journal, the unfinished ones it now owns (their
/// steps run again with the same idempotency keys).
#[derive(Clone)]
pub struct ClusterSagas {
    keyed: Keyed<SagaRequest, SagaReply>,
    node: ClusterNode,
}

/// The keyed kind of sagas (the journal's kind too).
const SAGA_KIND: &str = "saga";

static SAGA_IDS: AtomicU64 = AtomicU64::new(1);

impl ClusterNode {
    /// Runs sagas on this node (journaling into `sagas`' journal, which every
    /// node running sagas must share, with the same definitions and handlers).
    pub fn host_sagas(&self, sagas: Sagas) -> Result<ClusterSagas, ClusterError> {
        let (serving, moving) = (sagas.clone(), sagas);
        let node = self.inner.name.clone();
        let keyed = self.host_keyed(
            SAGA_KIND,
            move |id: String, request: SagaRequest, _timeout| {
                let (sagas, node) = (serving.clone(), node.clone());
                async move {
                    let target = format!("saga/{id}");
                    let r = match request {
                        SagaRequest::Start { definition, input } => {
                            match sagas.start_with_id(&id, &definition, input).await {
                                Ok(()) => Ok(SagaReply::Started),
                                // Already started (a retried start whose
                                // answer was lost): the same saga, started.
                                Err(e) => match sagas.status(&id).await {
                                    Ok(s) if s.definition == definition => Ok(SagaReply::Started),
                                    _ => Err(e),
                                },
                            }
                        }
                        SagaRequest::Signal { name, payload } => {
                            sagas.signal(&id, &name, payload).await.map(SagaReply::Signalled)
                        }
                        SagaRequest::Status => sagas.status(&id).await.map(SagaReply::Status),
                    };
                    r.map_err(|e| saga_error(&node, &target, e))
                }
            },
            move |ring: Arc<HashRing>, me: String| {
                let sagas = moving.clone();
                async move {
                    let mine = |id: &str| ring.owner(id).is_some_and(|o| o == me);
                    let stopped = sagas.stop_where(|id| !mine(id)).await;
                    let resumed = match sagas.resume_where(mine).await {
                        Ok(n) => n,
                        Err(e) => {
                            tracing::error!(node = %me, error = %e, "resuming the sagas this node now owns failed");
                            0
                        }
                    };
                    stopped + resumed
                }
            },
        )?;
        Ok(ClusterSagas {
            keyed,
            node: self.clone(),
        })
    }

    /// Calls sagas run on other nodes.
    pub fn saga_client(&self) -> ClusterSagas {
        ClusterSagas {
            keyed: self.keyed(SAGA_KIND),
            node: self.clone(),
        }
    }
}

impl ClusterSagas {
    /// A fresh saga id for `definition`, unique in the cluster (it carries
    /// this node's name).
    pub fn new_id(&self, definition: &str) -> String {
        format!(
            "{definition}-{}-{}-{}",
            self.node.name(),
            troupe_journal::now_ms(),
            SAGA_IDS.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Starts an instance of `definition` on the node that owns its fresh
    /// id; returns the id once the start is journaled. To retry a start
    /// whose answer was lost, use [`ClusterSagas::start_with_id`] with the
    /// same id.
    pub async fn start(
        &self,
        definition: &str,
        input: Value,
        timeout: Duration,
    ) -> Result<String, ClusterError> {
        let id = self.new_id(definition);
        self.start_with_id(&id, definition, input, timeout).await?;
        Ok(id)
    }

    /// Starts saga `id` (from [`ClusterSagas::new_id`]) on the node that
    /// owns it. Idempotent: starting an id already started with the same
    /// definition succeeds.
    pub async fn start_with_id(
        &self,
        id: &str,
        definition: &str,
        input: Value,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let request = SagaRequest::Start {
            definition: definition.to_owned(),
            input,
        };
        self.keyed.ask(id, request, timeout).await.map(drop)
    }

    /// Delivers signal `name`; true if a step was waiting for it.
    pub async fn signal(
        &self,
        id: &str,
        name: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<bool, ClusterError> {
        let request = SagaRequest::Signal {
            name: name.to_owned(),
            payload,
        };
        match self.keyed.ask(id, request, timeout).await? {
            SagaReply::Signalled(b) => Ok(b),
            other => Err(unexpected("signal", &other)),
        }
    }

    /// The saga's status.
    pub async fn status(&self, id: &str, timeout: Duration) -> Result<SagaStatus, ClusterError> {
        match self.keyed.ask(id, SagaRequest::Status, timeout).await? {
            SagaReply::Status(s) => Ok(s),
            other => Err(unexpected("status", &other)),
        }
    }

    /// The node running saga `id` now.
    pub fn owner(&self, id: &str) -> Result<String, ClusterError> {
        self.keyed.owner(id)
    }
}

//! Step handlers: what a step's action or compensation runs.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use ractor::{ActorCell, RpcReplyPort};
use serde_json::Value;

use crate::error::StepError;

/// What a handler is given.
#[derive(Debug, Clone, PartialEq)]
pub struct StepContext {
    /// Saga instance id.
    pub saga: String,
    /// Step name.
    pub step: String,
    /// Attempt number, from 1. A retry after a crash keeps the attempt (and
    /// so the idempotency key) of the attempt whose outcome was lost.
    pub attempt: u32,
    /// `{"input": <saga input>, "<dependency>": <its output>, ...}`.
    pub input: Value,
    /// For a compensation: the output of the action it undoes.
    pub output: Option<Value>,
}

impl StepContext {
    /// `(saga, step, attempt)` as one string: participants deduplicate on it.
    pub fn idempotency_key(&self) -> String {
        format!("{}/{}/{}", self.saga, self.step, self.attempt)
    }
}

/// Performs (or undoes) one step.
pub trait StepHandler: Send + Sync + 'static {
    /// Runs once; the saga applies the timeout and retries.
    fn run(&self, ctx: StepContext) -> BoxFuture<'static, Result<Value, StepError>>;
}

impl<F, Fut> StepHandler for F
where
    F: Fn(StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
{
    fn run(&self, ctx: StepContext) -> BoxFuture<'static, Result<Value, StepError>> {
        Box::pin(self(ctx))
    }
}

/// Handlers by name, so a saga can be resumed from its journal and
/// described as JSON.
#[derive(Clone, Default)]
pub struct Handlers {
    map: HashMap<String, Arc<dyn StepHandler>>,
}

impl Handlers {
    /// Registers (or replaces) a handler.
    pub fn register(&mut self, name: &str, h: impl StepHandler) -> &mut Self {
        self.map.insert(name.to_owned(), Arc::new(h));
        self
    }

    /// Registers a step that asks the actor registered (with ractor's
    /// registry) under `actor_name`: `build` makes its message around a
    /// reply port.
    pub fn register_actor<M, B>(&mut self, name: &str, actor_name: &str, build: B) -> &mut Self
    where
        M: ractor::Message,
        B: Fn(StepContext, RpcReplyPort<Result<Value, StepError>>) -> M + Send + Sync + 'static,
    {
        let actor_name = actor_name.to_owned();
        let build = Arc::new(build);
        self.register(name, move |ctx: StepContext| {
            let (actor_name, build) = (actor_name.clone(), build.clone());
            async move {
                let cell: ActorCell =
                    ractor::registry::where_is(actor_name.clone()).ok_or_else(|| {
                        StepError::retryable(format!("no actor registered as `{actor_name}`"))
                    })?;
                let (tx, rx) = tokio::sync::oneshot::channel();
                cell.send_message(build(ctx, RpcReplyPort::from(tx)))
                    .map_err(|e| {
                        StepError::retryable(format!(
                            "`{actor_name}` did not take the message: {e}"
                        ))
                    })?;
                rx.await.map_err(|_| {
                    StepError::retryable(format!("`{actor_name}` dropped the reply"))
                })?
            }
        })
    }

    /// The handler registered as `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn StepHandler>> {
        self.map.get(name).cloned()
    }
}

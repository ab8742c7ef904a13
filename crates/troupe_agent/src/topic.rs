//! Topics: publish once, deliver to every subscribed agent.
//!
//! A topic has a name, a message type and an [`Overflow`] policy for
//! subscribers whose mailbox is full. Publishing never blocks without
//! bound: with [`Overflow::Drop`] a full subscriber misses the message at
//! once; with [`Overflow::Wait`] the publisher waits up to the given time
//! for room, then drops. Every drop is counted, in the [`Published`] report
//! and in the `troupe_topic_dropped_total{topic}` counter.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use troupe_actor::{ActorError, ActorHandle, Rejected};

use crate::agent::{Agent, AgentRef, Handles};
use crate::error::AgentError;

/// What happens when a subscriber's mailbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Drop the message for that subscriber, at once.
    Drop,
    /// Wait up to this long for room, then drop.
    Wait(Duration),
}

/// The outcome of one publish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Subscribers that got the message.
    pub delivered: usize,
    /// Subscribers that missed it (full or not running).
    pub dropped: usize,
}

/// Most subscribers of one topic.
pub const MAX_SUBSCRIBERS: usize = 4096;

/// Something a topic delivers to: an actor handle or an agent instance.
trait Subscriber<M>: Send + Sync {
    /// Its name (one subscription per name).
    fn id(&self) -> String;
    /// Delivers if there is room now.
    fn try_deliver(&self, msg: M) -> BoxFuture<'_, Result<(), AgentError>>;
    /// Delivers, waiting up to `wait` for room.
    fn deliver_wait(&self, msg: M, wait: Duration) -> BoxFuture<'_, Result<(), AgentError>>;
}

impl<M: ractor::Message> Subscriber<M> for ActorHandle<M> {
    fn id(&self) -> String {
        self.name().to_owned()
    }

    fn try_deliver(&self, msg: M) -> BoxFuture<'_, Result<(), AgentError>> {
        let r = self.tell(msg).map_err(|r: Rejected<M>| r.error.into());
        async move { r }.boxed()
    }

    fn deliver_wait(&self, msg: M, wait: Duration) -> BoxFuture<'_, Result<(), AgentError>> {
        async move { self.send(msg, wait).await.map_err(|r| r.error.into()) }.boxed()
    }
}

struct AgentSubscriber<A: Agent>(AgentRef<A>);

impl<A, M> Subscriber<M> for AgentSubscriber<A>
where
    A: Handles<M>,
    M: Send + 'static,
{
    fn id(&self) -> String {
        format!("{:?}", self.0)
    }

    fn try_deliver(&self, msg: M) -> BoxFuture<'_, Result<(), AgentError>> {
        self.0.tell(msg).boxed()
    }

    fn deliver_wait(&self, msg: M, wait: Duration) -> BoxFuture<'_, Result<(), AgentError>> {
        async move { self.0.timeout(wait).send(msg).await }.boxed()
    }
}

struct Topic<M> {
    overflow: Overflow,
    subscribers: Vec<Arc<dyn Subscriber<M>>>,
    dropped: metrics::Counter,
}

/// The topics of one system, by name. Cheap to clone.
#[derive(Clone, Default)]
pub struct Topics {
    topics: Arc<Mutex<HashMap<String, Box<dyn Any + Send>>>>,
}

impl Topics {
    /// No topics.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_topic<M: Clone + Send + Sync + 'static, R>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Topic<M>) -> R,
    ) -> Result<R, AgentError> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let entry = topics.entry(name.to_owned()).or_insert_with(|| {
            Box::new(Topic::<M> {
                overflow: Overflow::Drop,
                subscribers: Vec::new(),
                dropped: metrics::counter!("troupe_topic_dropped_total", "topic" => name.to_owned()),
            })
        });
        match entry.downcast_mut::<Topic<M>>() {
            Some(t) => Ok(f(t)),
            None => Err(AgentError::WrongMessageType {
                name: format!("topic `{name}`"),
                expected: std::any::type_name::<M>(),
            }),
        }
    }

    /// Sets the overflow policy of topic `name` (created with
    /// [`Overflow::Drop`] otherwise).
    pub fn declare<M: Clone + Send + Sync + 'static>(
        &self,
        name: &str,
        overflow: Overflow,
    ) -> Result<(), AgentError> {
        self.with_topic::<M, _>(name, |t| t.overflow = overflow)
    }

    /// Subscribes an actor (by its handle) to `name`.
    pub fn subscribe<M: Clone + Sync + ractor::Message>(
        &self,
        name: &str,
        subscriber: ActorHandle<M>,
    ) -> Result<(), AgentError> {
        self.add(name, Arc::new(subscriber))
    }

    /// Subscribes an agent instance to `name`: each message reaches its
    /// [`Handles<M>`] handler.
    pub fn subscribe_agent<A, M>(&self, name: &str, agent: AgentRef<A>) -> Result<(), AgentError>
    where
        A: Handles<M>,
        M: Clone + Send + Sync + 'static,
    {
        self.add(name, Arc::new(AgentSubscriber(agent)))
    }

    fn add<M: Clone + Send + Sync + 'static>(
        &self,
        name: &str,
        subscriber: Arc<dyn Subscriber<M>>,
    ) -> Result<(), AgentError> {
        self.with_topic::<M, _>(name, |t| {
            if t.subscribers.iter().any(|s| s.id() == subscriber.id()) {
                return Ok(());
            }
            if t.subscribers.len() >= MAX_SUBSCRIBERS {
                return Err(AgentError::TooLarge {
                    what: format!("subscribers of topic `{name}`"),
                    limit: MAX_SUBSCRIBERS,
                });
            }
            t.subscribers.push(subscriber);
            Ok(())
        })?
    }

    /// Removes the actor named `actor` from `name`.
    pub fn unsubscribe<M: Clone + Send + Sync + 'static>(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<(), AgentError> {
        self.with_topic::<M, _>(name, |t| t.subscribers.retain(|s| s.id() != actor))
    }

    /// Delivers `msg` to every subscriber of `name`, following its
    /// overflow policy (see the [module docs](self)).
    pub async fn publish<M: Clone + Send + Sync + 'static>(
        &self,
        name: &str,
        msg: M,
    ) -> Result<Published, AgentError> {
        let (subscribers, overflow, counter) = self.with_topic::<M, _>(name, |t| {
            (t.subscribers.clone(), t.overflow, t.dropped.clone())
        })?;
        let mut report = Published::default();
        let mut waiting = Vec::new();
        for s in &subscribers {
            match s.try_deliver(msg.clone()).await {
                Ok(()) => report.delivered += 1,
                Err(AgentError::Actor(
                    ActorError::Backpressure { .. } | ActorError::NotRunning { .. },
                )) => match overflow {
                    Overflow::Drop => report.dropped += 1,
                    Overflow::Wait(t) => waiting.push(s.deliver_wait(msg.clone(), t)),
                },
                Err(_) => report.dropped += 1,
            }
        }
        for r in futures::future::join_all(waiting).await {
            match r {
                Ok(()) => report.delivered += 1,
                Err(_) => report.dropped += 1,
            }
        }
        counter.increment(report.dropped as u64);
        Ok(report)
    }
}

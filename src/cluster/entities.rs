//! Durable entities spread over the nodes by consistent hashing.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use ractor::RpcReplyPort;
use troupe_actor::{Entities, EventSourced};

use super::{
    ClusterError, ClusterNode, HashRing, KindDispatch, Rebalance, Route, Wire, decode, encode,
    rejected,
};

/// An entity that can be reached from other nodes: its requests and
/// replies are wire types, and [`ClusterEntity::command`] turns a request
/// into the entity's own command.
pub trait ClusterEntity: EventSourced {
    /// What callers send.
    type Request: Wire;
    /// What the entity answers.
    type Reply: Wire;
    /// The command for `request`, answering on `reply`.
    fn command(request: Self::Request, reply: RpcReplyPort<Self::Reply>) -> Self::Command;
}

/// Entities of one kind, addressed by key from any node. Cheap to clone.
pub struct ClusterEntities<E: ClusterEntity> {
    node: ClusterNode,
    local: Option<Entities<E>>,
    _kind: PhantomData<fn() -> E>,
}

impl<E: ClusterEntity> Clone for ClusterEntities<E> {
    fn clone(&self) -> Self {
        Self {
            node: self.node.clone(),
            local: self.local.clone(),
            _kind: PhantomData,
        }
    }
}

impl<E: ClusterEntity> ClusterEntities<E> {
    /// Sends `request` to entity `key` on whichever node owns it and waits
    /// up to `timeout` for the reply (sent after the command's events are
    /// journaled).
    pub async fn ask(
        &self,
        key: &str,
        request: E::Request,
        timeout: Duration,
    ) -> Result<E::Reply, ClusterError> {
        let inner = &self.node.inner;
        match (inner.route_entity(E::KIND, key)?, &self.local) {
            (Route::Local, Some(local)) => local
                .ask(key, |port| E::command(request, port), timeout)
                .await
                .map_err(|e| rejected(&inner.name, &format!("{}/{key}", E::KIND), &e)),
            // Remote, or hosted here but called through a client handle.
            _ => self.ask_via(&inner.name, key, request, timeout).await,
        }
    }

    /// Sends `request` through node `via` (say, the node a client is
    /// connected to), which forwards it to the owner of `key`: what a
    /// gateway node does with requests it does not own.
    pub async fn ask_via(
        &self,
        via: &str,
        key: &str,
        request: E::Request,
        timeout: Duration,
    ) -> Result<E::Reply, ClusterError> {
        let inner = &self.node.inner;
        let body = encode(
            &inner.name,
            &format!("request for {}/{key}", E::KIND),
            &request,
        )?;
        let reply = inner
            .clone()
            .entity_via(via, E::KIND, key, body, timeout)
            .await?;
        decode(&inner.name, &format!("reply of {}/{key}", E::KIND), &reply)
    }

    /// The node that owns `key` now.
    pub fn owner(&self, key: &str) -> Result<String, ClusterError> {
        self.node.owner_of(E::KIND, key)
    }

    /// This node's registry of the kind (None on a node that only calls).
    pub fn local(&self) -> Option<&Entities<E>> {
        self.local.as_ref()
    }
}

impl ClusterNode {
    /// Hosts entities of `E::KIND` on this node: it takes its share of
    /// keys, serves requests for them from other nodes, and passivates
    /// the ones that move elsewhere when members change. `entities` should
    /// journal into the journal every node of the kind shares (or, with
    /// [`super::Placement::NodeLocal`], this node's own).
    pub fn host<E: ClusterEntity>(
        &self,
        entities: Entities<E>,
    ) -> Result<ClusterEntities<E>, ClusterError> {
        let inner = &self.inner;
        let serve = entities.clone();
        let name = inner.name.clone();
        let dispatch: KindDispatch =
            Arc::new(move |key: String, body: Vec<u8>, timeout: Duration| {
                let (entities, name) = (serve.clone(), name.clone());
                async move {
                    let target = format!("{}/{key}", E::KIND);
                    let request: E::Request =
                        decode(&name, &format!("request for {target}"), &body)?;
                    let reply = entities
                        .ask(&key, |port| E::command(request, port), timeout)
                        .await
                        .map_err(|e| rejected(&name, &target, &e))?;
                    encode(&name, &format!("reply of {target}"), &reply)
                        .map(serde_bytes::ByteBuf::from)
                }
                .boxed()
            });
        let moving = entities.clone();
        let rebalance: Rebalance = Arc::new(move |ring: Arc<HashRing>, me: String| {
            let entities = moving.clone();
            async move {
                entities
                    .passivate_where(|key| ring.owner(key).is_some_and(|o| o != me))
                    .await
            }
            .boxed()
        });
        inner.register_kind(E::KIND, dispatch, rebalance)?;
        Ok(ClusterEntities {
            node: self.clone(),
            local: Some(entities),
            _kind: PhantomData,
        })
    }

    /// Calls entities of `E::KIND` hosted on other nodes, without hosting
    /// any here.
    pub fn entity_client<E: ClusterEntity>(&self) -> ClusterEntities<E> {
        ClusterEntities {
            node: self.clone(),
            local: None,
            _kind: PhantomData,
        }
    }
}

//! # troupe_actor: durable actors on ractor
//!
//! ractor gives fast actors, links and supervision events, but no restarts,
//! no persistence and only unbounded mailboxes. This crate adds them:
//!
//! | you want | use |
//! |---|---|
//! | a bounded, restart-stable address for any ractor actor | [`ActorHandle`], [`mailbox::spawn`] |
//! | restarts with OTP strategies, intensity and backoff | [`SupervisorSpec`], [`ChildSpec`], [`SupervisorHandle`] |
//! | state that survives crashes (event sourcing) | [`EventSourced`] run by [`DurableActor`] |
//! | many durable entities addressed by key, passivated when idle | [`Entities`] |
//! | one actor of your own per key, activated on demand, passivated when idle | [`Keyed`] with an [`Activator`] |
//! | "deliver this at that time", surviving restarts | [`Timers`] |
//!
//! Write plain ractor actors for stateless work, and [`EventSourced`]
//! entities for anything whose state must survive a crash. Every mailbox is
//! bounded (see [`mailbox`] for what happens at the bound) and every
//! durable actor persists before it applies and applies before it replies
//! (see [`durable`]).

#![warn(missing_docs)]

pub mod durable;
pub mod entity;
mod error;
pub mod keyed;
pub mod mailbox;
pub mod supervisor;
pub mod timers;

pub use durable::{
    AppendFailure, DurableActor, DurableArgs, DurableConfig, DurableState, Effect, EventSourced,
    recover,
};
pub use entity::{DurableActivator, Entities, EntityConfig};
pub use error::{ActorError, Rejected};
pub use keyed::{Activator, Keyed, KeyedConfig};
pub use mailbox::{ActorHandle, Bounded, BoundedArgs, DEFAULT_MAILBOX_CAPACITY, MailboxPermits};
pub use ractor::RpcReplyPort;
pub use supervisor::{
    Backoff, ChildInfo, ChildSpec, Intensity, Restart, Strategy, Supervisor, SupervisorHandle,
    SupervisorMsg, SupervisorSpec,
};
pub use timers::{Timer, TimerConfig, TimerSink, TimerTarget, Timers};

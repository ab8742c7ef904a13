//! # troupe_saga: DAG workflows with compensation
//!
//! | you want | use |
//! |---|---|
//! | describe a workflow | [`SagaDefinition`] of [`StepDef`]s (validated: no cycle, no unknown or duplicate step) |
//! | say what a step does or undoes | a [`StepHandler`] registered in [`Handlers`] (an async closure, or an actor by registry name) |
//! | run, watch, signal and resume instances | [`Sagas`] |
//!
//! Ready steps run concurrently; a slow step delays only its dependents.
//! When a step fails for good, completed steps are compensated in reverse
//! dependency order, each exactly once, surviving crashes (see [`saga`]).

#![warn(missing_docs)]

pub mod definition;
mod error;
pub mod handler;
mod manager;
pub mod saga;

pub use definition::{MAX_STEPS, RetryPolicy, SagaDefinition, StepDef};
pub use error::{SagaError, StepError};
pub use handler::{Handlers, StepContext, StepHandler};
pub use manager::{DEFAULT_MAX_RUNNING, MAX_REQUEST_BYTES, Sagas, StartRequest};
pub use saga::{Phase, SagaEvent, SagaStatus, StepState};

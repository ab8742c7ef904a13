//! Workflow definitions: a DAG of named steps, validated when built.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::SagaError;

/// How often and how patiently an action or compensation is retried.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all (at least 1).
    pub max_attempts: u32,
    /// Wait before the second attempt.
    pub backoff_min: Duration,
    /// Longest wait.
    pub backoff_max: Duration,
    /// Relative jitter, 0 to 1.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// 3 attempts, 50 ms doubling to 5 s, ±20 %.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub fn once() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// `n` attempts with no wait between them (tests).
    pub fn immediate(n: u32) -> Self {
        Self {
            max_attempts: n.max(1),
            backoff_min: Duration::ZERO,
            backoff_max: Duration::ZERO,
            jitter: 0.0,
        }
    }

    /// The wait after failed attempt `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .backoff_min
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.backoff_max);
        if self.jitter <= 0.0 || base.is_zero() {
            return base;
        }
        let j = self.jitter.min(1.0);
        base.mul_f64(rand::rng().random_range((1.0 - j)..=(1.0 + j)))
            .min(self.backoff_max)
    }
}

/// One step of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepDef {
    /// Unique name within the workflow.
    pub name: String,
    /// Registered handler that performs the step (ignored for signal steps).
    pub action: String,
    /// Registered handler that undoes it, if it can be undone.
    pub compensation: Option<String>,
    /// Steps that must succeed first; their outputs are this step's input.
    pub after: Vec<String>,
    /// Longest one attempt may take.
    pub timeout: Duration,
    /// Retries of the action.
    pub retry: RetryPolicy,
    /// Retries of the compensation; past them the saga needs attention.
    pub compensation_retry: RetryPolicy,
    /// Wait for an external signal of this name instead of running an
    /// action; the signal's payload is the step's output.
    pub signal: Option<String>,
}

impl StepDef {
    /// A step running handler `action`, with a 30 s timeout and the default retry.
    pub fn new(name: &str, action: &str) -> Self {
        Self {
            name: name.into(),
            action: action.into(),
            compensation: None,
            after: Vec::new(),
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            compensation_retry: RetryPolicy::default(),
            signal: None,
        }
    }

    /// A step that waits for signal `signal` for at most `deadline`.
    pub fn signal(name: &str, signal: &str, deadline: Duration) -> Self {
        Self {
            signal: Some(signal.into()),
            timeout: deadline,
            retry: RetryPolicy::once(),
            ..Self::new(name, "")
        }
    }

    /// Runs after these steps.
    pub fn after(mut self, deps: &[&str]) -> Self {
        self.after = deps.iter().map(|d| d.to_string()).collect();
        self
    }

    /// Undone by handler `compensation`.
    pub fn compensate_with(mut self, compensation: &str) -> Self {
        self.compensation = Some(compensation.into());
        self
    }

    /// Sets the timeout of one attempt.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sets the action's retry policy.
    pub fn retry(mut self, r: RetryPolicy) -> Self {
        self.retry = r;
        self
    }

    /// Sets the compensation's retry policy.
    pub fn compensation_retry(mut self, r: RetryPolicy) -> Self {
        self.compensation_retry = r;
        self
    }
}

/// A validated DAG of steps. Build it with [`SagaDefinition::new`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaDefinition {
    name: String,
    steps: Vec<StepDef>,
    /// Steps in a topological order (indices into `steps`).
    order: Vec<usize>,
}

/// Most steps in one workflow.
pub const MAX_STEPS: usize = 1_000;

impl SagaDefinition {
    /// Validates `steps`: unique names, known dependencies, no cycle.
    pub fn new(name: &str, steps: Vec<StepDef>) -> Result<Self, SagaError> {
        let invalid = |m: String| SagaError::InvalidDefinition {
            definition: name.to_owned(),
            message: m,
        };
        if steps.is_empty() || steps.len() > MAX_STEPS {
            return Err(invalid(format!(
                "a workflow has 1 to {MAX_STEPS} steps, not {}",
                steps.len()
            )));
        }
        let mut index = BTreeMap::new();
        for (i, s) in steps.iter().enumerate() {
            if index.insert(s.name.clone(), i).is_some() {
                return Err(invalid(format!("duplicate step name `{}`", s.name)));
            }
        }
        for s in &steps {
            for d in &s.after {
                if !index.contains_key(d) {
                    return Err(invalid(format!(
                        "step `{}` depends on unknown step `{d}`",
                        s.name
                    )));
                }
                if d == &s.name {
                    return Err(invalid(format!("step `{}` depends on itself", s.name)));
                }
            }
        }
        // Kahn's algorithm; whatever is left is on a cycle.
        let mut indegree: Vec<usize> = steps.iter().map(|s| s.after.len()).collect();
        let mut ready: BTreeSet<usize> = (0..steps.len()).filter(|&i| indegree[i] == 0).collect();
        let mut order = Vec::with_capacity(steps.len());
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for (j, s) in steps.iter().enumerate() {
                if s.after.contains(&steps[i].name) {
                    indegree[j] -= 1;
                    if indegree[j] == 0 {
                        ready.insert(j);
                    }
                }
            }
        }
        if order.len() != steps.len() {
            let cyclic: Vec<&str> = (0..steps.len())
                .filter(|i| !order.contains(i))
                .map(|i| steps[i].name.as_str())
                .collect();
            return Err(invalid(format!("steps {cyclic:?} form a cycle")));
        }
        Ok(Self {
            name: name.to_owned(),
            steps,
            order,
        })
    }

    /// The workflow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The steps, as given.
    pub fn steps(&self) -> &[StepDef] {
        &self.steps
    }

    /// Index of a step.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// Indices of the steps `i` depends on.
    pub fn deps(&self, i: usize) -> Vec<usize> {
        self.steps[i]
            .after
            .iter()
            .filter_map(|d| self.index(d))
            .collect()
    }

    /// Indices of the steps that depend on `i`.
    pub fn dependents(&self, i: usize) -> Vec<usize> {
        let name = &self.steps[i].name;
        (0..self.steps.len())
            .filter(|&j| self.steps[j].after.contains(name))
            .collect()
    }

    /// A topological order.
    pub fn order(&self) -> &[usize] {
        &self.order
    }
}

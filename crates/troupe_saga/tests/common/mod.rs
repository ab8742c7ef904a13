#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use troupe_saga::*;

/// What participants saw, deduplicated by idempotency key as a real
/// participant would.
#[derive(Default)]
pub struct Log {
    pub entries: Vec<(String, String)>, // (kind, step)
    pub keys: BTreeSet<String>,
    pub raw_calls: HashMap<String, u32>,
}

pub type Shared = Arc<Mutex<Log>>;

#[derive(Clone, Default)]
pub struct Faults {
    /// Steps whose action always fails (permanently).
    pub fail: BTreeSet<String>,
    /// Steps whose action fails transiently this many times first.
    pub flaky: HashMap<String, u32>,
    /// Steps whose compensation always fails.
    pub fail_undo: BTreeSet<String>,
}

/// Handlers "do" and "undo" that record into `log` and obey `faults`.
pub fn handlers(log: &Shared, faults: &Faults) -> Handlers {
    let mut h = Handlers::default();
    let (l, f) = (log.clone(), faults.clone());
    h.register("do", move |ctx: StepContext| {
        let (l, f) = (l.clone(), f.clone());
        async move {
            tokio::task::yield_now().await;
            let key = format!("do:{}", ctx.idempotency_key());
            let mut log = l.lock().unwrap_or_else(|p| p.into_inner());
            *log.raw_calls.entry(ctx.step.clone()).or_default() += 1;
            if f.fail.contains(&ctx.step) {
                return Err(StepError::permanent(format!("{} refuses", ctx.step)));
            }
            if let Some(n) = f.flaky.get(&ctx.step)
                && ctx.attempt <= *n
            {
                return Err(StepError::retryable(format!(
                    "{} flaky attempt {}",
                    ctx.step, ctx.attempt
                )));
            }
            if log.keys.insert(key) {
                log.entries.push(("do".into(), ctx.step.clone()));
            }
            Ok(json!({ "step": ctx.step, "attempt": ctx.attempt }))
        }
    });
    let (l, f) = (log.clone(), faults.clone());
    h.register("undo", move |ctx: StepContext| {
        let (l, f) = (l.clone(), f.clone());
        async move {
            tokio::task::yield_now().await;
            assert!(
                ctx.output.is_some(),
                "a compensation must see the output it undoes"
            );
            if f.fail_undo.contains(&ctx.step) {
                return Err(StepError::retryable(format!("cannot undo {}", ctx.step)));
            }
            let key = format!("undo:{}", ctx.idempotency_key());
            let mut log = l.lock().unwrap_or_else(|p| p.into_inner());
            if log.keys.insert(key) {
                log.entries.push(("undo".into(), ctx.step.clone()));
            }
            Ok(Value::Null)
        }
    });
    h
}

/// A step running "do", undone by "undo", retried immediately.
pub fn step(name: &str, after: &[&str]) -> StepDef {
    StepDef::new(name, "do")
        .after(after)
        .compensate_with("undo")
        .retry(RetryPolicy::immediate(3))
        .compensation_retry(RetryPolicy::immediate(2))
        .timeout(Duration::from_secs(10))
}

/// Checks the outcome of a finished saga against the log.
pub fn check_outcome(def: &SagaDefinition, status: &SagaStatus, log: &Log) {
    let done: Vec<&String> = log
        .entries
        .iter()
        .filter(|(k, _)| k == "do")
        .map(|(_, s)| s)
        .collect();
    let undone: Vec<&String> = log
        .entries
        .iter()
        .filter(|(k, _)| k == "undo")
        .map(|(_, s)| s)
        .collect();
    let unique_done: BTreeSet<&String> = done.iter().copied().collect();
    assert_eq!(
        unique_done.len(),
        done.len(),
        "an action took effect twice: {done:?}"
    );
    if status.phase == Phase::Completed {
        assert_eq!(
            done.len(),
            def.steps().len(),
            "completed without running every step"
        );
        assert!(undone.is_empty(), "a completed saga compensated {undone:?}");
        return;
    }
    assert_eq!(status.phase, Phase::Aborted, "{status:?}");
    let unique_undone: BTreeSet<&String> = undone.iter().copied().collect();
    assert_eq!(
        unique_undone.len(),
        undone.len(),
        "a compensation took effect twice: {undone:?}"
    );
    assert_eq!(
        unique_undone, unique_done,
        "compensated steps differ from completed steps"
    );
    // Never before the compensations of the steps that depend on it.
    for (pos, s) in undone.iter().enumerate() {
        let i = def.index(s).expect("known step");
        for d in def.dependents(i) {
            let dn = &def.steps()[d].name;
            if let Some(dpos) = undone.iter().position(|u| *u == dn) {
                assert!(dpos < pos, "`{s}` was undone before its dependent `{dn}`");
            }
        }
    }
}

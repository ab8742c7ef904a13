//! The saga suite: a 100-step, 10-level DAG of 10 ms steps against its
//! critical path and against running the steps one after another; the
//! framework's time per step with each durability; and sagas completed per
//! second for 1,000 concurrent 5-step sagas with instant steps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use troupe_journal::{Durability, Journal, RocksConfig, RocksJournal};
use troupe_saga::{Handlers, Phase, RetryPolicy, SagaDefinition, Sagas, StepContext, StepDef};

use super::Report;

type BoxError = Box<dyn std::error::Error>;

fn handlers() -> Handlers {
    let mut h = Handlers::default();
    h.register("sleep10", |_ctx: StepContext| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(json!(null))
    });
    h.register("instant", |_ctx: StepContext| async { Ok(json!(null)) });
    h
}

/// `levels` levels of `width` steps; each step depends on every step of the
/// level before.
fn layered(name: &str, levels: usize, width: usize, action: &str) -> SagaDefinition {
    let mut steps = Vec::new();
    for l in 0..levels {
        for w in 0..width {
            let after: Vec<String> = if l == 0 {
                vec![]
            } else {
                (0..width).map(|p| format!("l{}s{p}", l - 1)).collect()
            };
            let after: Vec<&str> = after.iter().map(String::as_str).collect();
            steps.push(
                StepDef::new(&format!("l{l}s{w}"), action)
                    .after(&after)
                    .retry(RetryPolicy::once()),
            );
        }
    }
    SagaDefinition::new(name, steps).expect("layered DAG is valid")
}

fn chain(name: &str, n: usize) -> SagaDefinition {
    let steps = (0..n)
        .map(|i| {
            let after = if i == 0 {
                vec![]
            } else {
                vec![format!("s{}", i - 1)]
            };
            let after: Vec<&str> = after.iter().map(String::as_str).collect();
            StepDef::new(&format!("s{i}"), "instant")
                .after(&after)
                .retry(RetryPolicy::once())
        })
        .collect();
    SagaDefinition::new(name, steps).expect("chain is valid")
}

async fn sagas(
    dir: &std::path::Path,
    durability: Durability,
) -> Result<(Sagas, RocksJournal), BoxError> {
    let rocks = RocksJournal::open(RocksConfig::new(dir).durability(durability))?;
    let journal: Arc<dyn Journal> = Arc::new(rocks.clone());
    let s = Sagas::new(journal, handlers());
    s.register(layered("dag", 10, 10, "sleep10"))?;
    s.register(chain("chain", 200))?;
    s.register(chain("five", 5))?;
    Ok((s, rocks))
}

async fn one(s: &Sagas, def: &str) -> Result<Duration, BoxError> {
    let start = Instant::now();
    let id = s.start(def, json!({})).await?;
    let status = s.wait(&id, Duration::from_secs(120)).await?;
    if status.phase != Phase::Completed {
        return Err(format!("{def} ended {:?}: {:?}", status.phase, status.error).into());
    }
    Ok(start.elapsed())
}

pub fn run(quick: bool) -> Result<(), BoxError> {
    let report = Report;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let base = tempfile::Builder::new().prefix("troupe-bench-").tempdir()?;
    rt.block_on(async {
        let critical = Duration::from_millis(10 * 10);
        // The nearest baseline: the same 10 levels of 10 concurrent 10 ms
        // sleeps in plain Tokio (timer granularity alone costs ~1 ms a level).
        let mut raw = Duration::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for _ in 0..10 {
                futures::future::join_all(
                    (0..10).map(|_| tokio::time::sleep(Duration::from_millis(10))),
                )
                .await;
            }
            raw = raw.min(t.elapsed());
        }
        report.figure(
            "raw_tokio_dag_critical_path_ratio",
            raw.as_secs_f64() / critical.as_secs_f64(),
            "x",
        );
        let sequential = Duration::from_millis(100 * 10);
        for (d, suffix) in [(Durability::Buffered, ""), (Durability::Fsync, "_fsync")] {
            let (s, rocks) = sagas(&base.path().join(format!("dag{suffix}")), d).await?;
            let mut best = Duration::MAX;
            for _ in 0..3 {
                best = best.min(one(&s, "dag").await?);
            }
            report.figure(
                &format!("dag_critical_path_ratio{suffix}"),
                best.as_secs_f64() / critical.as_secs_f64(),
                "x",
            );
            report.ratio(
                &format!("dag_vs_raw_tokio{suffix}"),
                best.as_secs_f64(),
                raw.as_secs_f64(),
            );
            if suffix.is_empty() {
                report.figure(
                    "dag_vs_sequential",
                    best.as_secs_f64() / sequential.as_secs_f64(),
                    "x",
                );
            }
            rocks.close().await;
        }
        for (d, name) in [
            (Durability::Fsync, "step_overhead_fsync"),
            (Durability::Buffered, "step_overhead_buffered"),
        ] {
            let (s, rocks) = sagas(&base.path().join(name), d).await?;
            let took = one(&s, "chain").await?;
            report.figure(name, took.as_secs_f64() * 1e6 / 200.0, "us");
            rocks.close().await;
        }
        let n = if quick { 200 } else { 1000 };
        let (s, rocks) = sagas(&base.path().join("many"), Durability::Fsync).await?;
        let start = Instant::now();
        let runs: Vec<_> = (0..n)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    let id = s.start("five", json!({})).await?;
                    let st = s.wait(&id, Duration::from_secs(120)).await?;
                    Ok::<_, troupe_saga::SagaError>(st.phase)
                })
            })
            .collect();
        for r in runs {
            let phase = r.await??;
            if phase != Phase::Completed {
                return Err(format!("a saga ended {phase:?}").into());
            }
        }
        report.figure(
            "sagas_completed",
            n as f64 / start.elapsed().as_secs_f64(),
            "/s",
        );
        rocks.close().await;
        Ok::<_, BoxError>(())
    })?;
    Ok(())
}

//! An order workflow as a saga: reserve stock and charge the card in
//! parallel, wait for a human approval, then ship. One run completes; one
//! fails at shipping and the finished steps are compensated in reverse
//! order; one is never approved and times out.
//!
//! Run with `cargo run --release --example order_saga`.
//! `--quick` and `--data-dir DIR` are accepted like the other examples.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use troupe::prelude::*;
use troupe::saga::{
    Handlers, Phase, RetryPolicy, SagaDefinition, Sagas, StepContext, StepDef, StepError,
};

// ANCHOR: handlers
fn handlers() -> Handlers {
    let mut h = Handlers::default();
    h.register("reserve", |ctx: StepContext| async move {
        let sku = ctx.input["input"]["sku"].as_str().unwrap_or("?").to_owned();
        println!("    reserve {sku} (key {})", ctx.idempotency_key());
        Ok(json!({ "reservation": format!("R-{sku}") }))
    });
    h.register("release", |ctx: StepContext| async move {
        println!(
            "    release reservation {}",
            ctx.output.unwrap_or(Value::Null)["reservation"]
        );
        Ok(Value::Null)
    });
    h.register("charge", |ctx: StepContext| async move {
        println!("    charge card (key {})", ctx.idempotency_key());
        Ok(json!({ "payment": "P-77" }))
    });
    h.register("refund", |ctx: StepContext| async move {
        println!(
            "    refund payment {}",
            ctx.output.unwrap_or(Value::Null)["payment"]
        );
        Ok(Value::Null)
    });
    h.register("ship", |ctx: StepContext| async move {
        if ctx.input["input"]["address"].is_null() {
            return Err(StepError::permanent("no shipping address"));
        }
        println!(
            "    ship with {} and {}",
            ctx.input["reserve"]["reservation"], ctx.input["charge"]["payment"]
        );
        Ok(json!({ "tracking": "TRK-1" }))
    });
    h
}
// ANCHOR_END: handlers

// ANCHOR: definition
fn definition() -> Result<SagaDefinition, troupe::saga::SagaError> {
    SagaDefinition::new(
        "order",
        vec![
            StepDef::new("reserve", "reserve").compensate_with("release"),
            StepDef::new("charge", "charge")
                .compensate_with("refund")
                .retry(RetryPolicy::default()),
            StepDef::signal("approve", "approved", Duration::from_millis(500))
                .after(&["reserve", "charge"]),
            StepDef::new("ship", "ship").after(&["approve", "reserve", "charge"]),
        ],
    )
}
// ANCHOR_END: definition

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let data_dir = args
        .iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("troupe-data/order_saga"));
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }
    let journal = RocksJournal::open(RocksConfig::new(&data_dir))?;
    // ANCHOR: run
    let sagas = Sagas::new(Arc::new(journal.clone()), handlers());
    sagas.register(definition()?)?;
    for (label, input, approve) in [
        (
            "complete",
            json!({"sku": "GPU-H100", "address": "1 Main St"}),
            true,
        ),
        ("no address", json!({"sku": "GPU-H200"}), true),
        (
            "never approved",
            json!({"sku": "TPU-V5", "address": "2 Side St"}),
            false,
        ),
    ] {
        println!("order ({label}):");
        let id = sagas.start("order", input).await?;
        if approve {
            // A human approves once the saga waits for it.
            while !sagas.signal(&id, "approved", json!({"by": "ops"})).await? {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let status = sagas.wait(&id, Duration::from_secs(30)).await?;
        // ANCHOR_END: run
        println!(
            "  -> {:?}{}",
            status.phase,
            status.error.map(|e| format!(": {e}")).unwrap_or_default()
        );
        assert!(matches!(status.phase, Phase::Completed | Phase::Aborted));
    }
    journal.close().await;
    Ok(())
}

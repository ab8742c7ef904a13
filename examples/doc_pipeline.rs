//! A document pipeline as a saga DAG: `ingest` stores the upload, `ocr`
//! and `detect_language` run in parallel on it, `summarize` and `translate`
//! each need both, and `index` publishes the result.
//!
//! The first document is in a language nobody can translate: `translate`
//! fails for good and the finished steps are undone, each exactly once, in
//! reverse dependency order. The second document's worker crashes while
//! the summarizer hangs; a new worker opens the same journal, resumes the
//! saga, and re-runs only what the journal does not show as done.
//!
//! Run with `cargo run --release --example doc_pipeline`.
//! `--quick` uses shorter step latencies; `--data-dir DIR` chooses where the
//! journal goes (default: a fresh temporary directory).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use troupe::prelude::*;
use troupe::saga::{
    Handlers, Phase, RetryPolicy, SagaDefinition, SagaError, SagaStatus, Sagas, StepContext,
    StepDef, StepError, StepState,
};

/// Languages the translation service has a model for (into English).
const TRANSLATABLE: [&str; 4] = ["de", "es", "fr", "it"];

// ANCHOR: services
/// The services the pipeline writes to (blob store, OCR text, summaries,
/// translations, search index) as one key-value store. They live outside
/// the pipeline's workers, so they outlast a worker's crash.
struct Services {
    records: Mutex<BTreeMap<String, Value>>,
    /// Every call, in order.
    calls: Mutex<Vec<Call>>,
    /// How long the fastest service takes to answer.
    latency: Duration,
    /// Times the OCR service still answers "busy".
    ocr_busy: AtomicU32,
    /// When set, the next call to the summarization model never returns.
    model_hangs: AtomicBool,
}

/// One call of a step's action or compensation.
#[derive(Clone)]
struct Call {
    worker: &'static str,
    step: String,
    undo: bool,
    key: String,
}

impl Services {
    fn put(&self, key: &str, value: Value) {
        self.records().insert(key.to_owned(), value);
    }

    fn delete(&self, key: &str) {
        self.records().remove(key);
    }

    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Value>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the call, then takes `units` times the base latency.
    async fn call(&self, worker: &'static str, ctx: &StepContext, undo: bool, units: u32) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Call {
                worker,
                step: ctx.step.clone(),
                undo,
                key: ctx.idempotency_key(),
            });
        tokio::time::sleep(self.latency * units).await;
    }
}
// ANCHOR_END: services

fn doc(ctx: &StepContext) -> String {
    ctx.input["input"]["doc"].as_str().unwrap_or("?").to_owned()
}

/// A field of the output a compensation undoes.
fn undoing(ctx: &StepContext, field: &str) -> String {
    let output = ctx.output.as_ref().unwrap_or(&Value::Null);
    output[field].as_str().unwrap_or("?").to_owned()
}

/// Registers `f` as handler `name`, giving it the services.
fn register<F, Fut>(h: &mut Handlers, name: &str, services: &Arc<Services>, f: F)
where
    F: Fn(Arc<Services>, StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, StepError>> + Send + 'static,
{
    let services = services.clone();
    h.register(name, move |ctx: StepContext| f(services.clone(), ctx));
}

/// The handlers of one worker process.
fn handlers(services: &Arc<Services>, worker: &'static str) -> Handlers {
    let mut h = Handlers::default();
    // ANCHOR: ingest
    register(&mut h, "store_blob", services, move |s, ctx| async move {
        s.call(worker, &ctx, false, 1).await;
        let blob = format!("blob/{}", doc(&ctx));
        s.put(&blob, ctx.input["input"].clone());
        println!("    {worker}  ingest           stored {blob}");
        Ok(json!({ "blob": blob }))
    });
    register(&mut h, "delete_blob", services, move |s, ctx| async move {
        s.call(worker, &ctx, true, 1).await;
        let blob = undoing(&ctx, "blob");
        s.delete(&blob);
        println!("    {worker}  undo ingest      deleted {blob}");
        Ok(Value::Null)
    });
    // ANCHOR_END: ingest
    register(&mut h, "ocr", services, move |s, ctx| async move {
        s.call(worker, &ctx, false, 4).await;
        let busy = s
            .ocr_busy
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if busy.is_ok() {
            println!(
                "    {worker}  ocr              attempt {}: service busy",
                ctx.attempt
            );
            return Err(StepError::retryable("OCR service busy (429)"));
        }
        let text = format!("ocr/{}", doc(&ctx));
        let pages = ctx.input["input"]["pages"].as_u64().unwrap_or(1);
        s.put(&text, json!({ "pages": pages }));
        println!(
            "    {worker}  ocr              attempt {}: {pages} pages -> {text}",
            ctx.attempt
        );
        Ok(json!({ "text": text, "pages": pages }))
    });
    register(&mut h, "drop_text", services, move |s, ctx| async move {
        s.call(worker, &ctx, true, 1).await;
        let text = undoing(&ctx, "text");
        s.delete(&text);
        println!("    {worker}  undo ocr         dropped {text}");
        Ok(Value::Null)
    });
    register(
        &mut h,
        "detect_language",
        services,
        move |s, ctx| async move {
            s.call(worker, &ctx, false, 1).await;
            let language = ctx.input["input"]["lang"]
                .as_str()
                .unwrap_or("en")
                .to_owned();
            println!("    {worker}  detect_language  {language}");
            Ok(json!({ "language": language }))
        },
    );
    // ANCHOR: summarize
    register(&mut h, "summarize", services, move |s, ctx| async move {
        if s.model_hangs.swap(false, Ordering::SeqCst) {
            s.call(worker, &ctx, false, 1).await;
            println!("    {worker}  summarize        the model does not answer...");
            return std::future::pending().await;
        }
        s.call(worker, &ctx, false, 6).await;
        let summary = format!("summary/{}", doc(&ctx));
        s.put(&summary, json!({ "from": ctx.input["ocr"]["text"] }));
        println!("    {worker}  summarize        wrote {summary}");
        Ok(json!({ "summary": summary }))
    });
    // ANCHOR_END: summarize
    register(&mut h, "drop_summary", services, move |s, ctx| async move {
        s.call(worker, &ctx, true, 1).await;
        let summary = undoing(&ctx, "summary");
        s.delete(&summary);
        println!("    {worker}  undo summarize   dropped {summary}");
        Ok(Value::Null)
    });
    // ANCHOR: translate
    register(&mut h, "translate", services, move |s, ctx| async move {
        s.call(worker, &ctx, false, 2).await;
        let language = ctx.input["detect_language"]["language"]
            .as_str()
            .unwrap_or("?");
        if language == "en" {
            return Ok(json!({ "translation": null }));
        }
        if !TRANSLATABLE.contains(&language) {
            println!("    {worker}  translate        no model for `{language}`");
            return Err(StepError::permanent(format!(
                "no translation model for `{language}`"
            )));
        }
        let translation = format!("translation/{}.en", doc(&ctx));
        s.put(&translation, json!({ "from": language }));
        println!("    {worker}  translate        {language} -> en: {translation}");
        Ok(json!({ "translation": translation }))
    });
    // ANCHOR_END: translate
    register(
        &mut h,
        "drop_translation",
        services,
        move |s, ctx| async move {
            s.call(worker, &ctx, true, 1).await;
            let translation = undoing(&ctx, "translation");
            s.delete(&translation);
            println!("    {worker}  undo translate   dropped {translation}");
            Ok(Value::Null)
        },
    );
    register(&mut h, "index", services, move |s, ctx| async move {
        s.call(worker, &ctx, false, 1).await;
        let entry = format!("index/{}", doc(&ctx));
        s.put(
            &entry,
            json!({
                "summary": ctx.input["summarize"]["summary"],
                "translation": ctx.input["translate"]["translation"],
            }),
        );
        println!("    {worker}  index            published {entry}");
        Ok(json!({ "entry": entry }))
    });
    register(&mut h, "remove_entry", services, move |s, ctx| async move {
        s.call(worker, &ctx, true, 1).await;
        let entry = undoing(&ctx, "entry");
        s.delete(&entry);
        println!("    {worker}  undo index       removed {entry}");
        Ok(Value::Null)
    });
    h
}

// ANCHOR: definition
fn definition() -> Result<SagaDefinition, SagaError> {
    let ocr_retry = RetryPolicy {
        backoff_min: Duration::from_millis(20),
        ..RetryPolicy::default()
    };
    SagaDefinition::new(
        "document",
        vec![
            StepDef::new("ingest", "store_blob").compensate_with("delete_blob"),
            StepDef::new("ocr", "ocr")
                .after(&["ingest"])
                .compensate_with("drop_text")
                .retry(ocr_retry),
            // Reads a field of the stored file: nothing to undo.
            StepDef::new("detect_language", "detect_language").after(&["ingest"]),
            StepDef::new("summarize", "summarize")
                .after(&["ocr", "detect_language"])
                .compensate_with("drop_summary"),
            StepDef::new("translate", "translate")
                .after(&["ocr", "detect_language"])
                .compensate_with("drop_translation"),
            StepDef::new("index", "index")
                .after(&["summarize", "translate"])
                .compensate_with("remove_entry"),
        ],
    )
}
// ANCHOR_END: definition

/// A worker process: its own journal handle and saga manager.
fn start_worker(
    journal: &RocksJournal,
    services: &Arc<Services>,
    name: &'static str,
) -> Result<Sagas, SagaError> {
    let sagas = Sagas::new(Arc::new(journal.clone()), handlers(services, name));
    sagas.register(definition()?)?;
    Ok(sagas)
}

fn open_journal(dir: &Path) -> Result<RocksJournal, JournalError> {
    RocksJournal::open(RocksConfig::new(dir).durability(Durability::Fsync))
}

/// Prints a saga's phase and its steps' states.
fn show(status: &SagaStatus) -> Result<(), SagaError> {
    let def = definition()?;
    println!("  saga {} -> {:?}", status.id, status.phase);
    for (step, state) in &status.steps {
        let undoable = def
            .index(step)
            .is_some_and(|i| def.steps()[i].compensation.is_some());
        let state = match state {
            StepState::Succeeded(_) => "done".to_owned(),
            StepState::Running(a) => format!("running (attempt {a})"),
            StepState::Failed(e) => format!("failed: {e}"),
            StepState::Compensated if undoable => "compensated".to_owned(),
            StepState::Compensated => "compensated (nothing to undo)".to_owned(),
            StepState::Pending => "never ran".to_owned(),
            other => format!("{other:?}"),
        };
        println!("    {step:<16} {state}");
    }
    Ok(())
}

/// Polls the saga until `ready` holds for its status.
async fn wait_until(
    sagas: &Sagas,
    id: &str,
    ready: impl Fn(&SagaStatus) -> bool,
) -> troupe::Result<()> {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    while !ready(&sagas.status(id).await?) {
        if tokio::time::Instant::now() > give_up {
            return Err(format!("saga {id} never reached the expected state").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn succeeded(status: &SagaStatus, step: &str) -> bool {
    status
        .steps
        .iter()
        .any(|(s, st)| s == step && matches!(st, StepState::Succeeded(_)))
}

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let temp = tempfile::tempdir()?;
    let data_dir = match args.iter().position(|a| a == "--data-dir") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--data-dir needs a directory")?),
        None => temp.path().to_owned(),
    };
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }
    let services = Arc::new(Services {
        records: Mutex::default(),
        calls: Mutex::default(),
        latency: Duration::from_millis(if quick { 5 } else { 40 }),
        ocr_busy: AtomicU32::new(1),
        model_hangs: AtomicBool::new(false),
    });
    println!("journal at {}", data_dir.display());

    // ANCHOR: failure
    let journal = open_journal(&data_dir)?;
    let sagas = start_worker(&journal, &services, "worker-1")?;
    println!("\nrun 1: a scanned letter in Basque (no translation model for it)");
    let letter = json!({ "doc": "letter-0001.pdf", "pages": 2, "lang": "eu" });
    let id = sagas.start("document", letter).await?;
    let status = sagas.wait(&id, Duration::from_secs(30)).await?;
    show(&status)?;
    // ANCHOR_END: failure
    let undone: Vec<String> = services
        .calls()
        .into_iter()
        .filter(|c| c.undo)
        .map(|c| c.step)
        .collect();
    println!("  compensated, in this order: {}", undone.join(", "));
    if status.phase != Phase::Aborted
        || undone != ["summarize", "ocr", "ingest"]
        || !services.records().is_empty()
    {
        return Err("run 1 should have undone summarize, then ocr, then ingest, once each".into());
    }
    println!("  nothing of the letter is left in any service");

    println!("\nrun 2: a contract in German; worker-1 crashes while the model hangs");
    services.model_hangs.store(true, Ordering::SeqCst);
    let contract = json!({ "doc": "contract-0002.pdf", "pages": 14, "lang": "de" });
    let id = sagas.start("document", contract).await?;
    // ANCHOR: crash
    // Crash once the summarizer hangs and the translation is journaled.
    wait_until(&sagas, &id, |s| {
        !services.model_hangs.load(Ordering::SeqCst) && succeeded(s, "translate")
    })
    .await?;
    sagas.stop_all().await;
    drop(sagas);
    journal.close().await;
    drop(journal);
    println!("  worker-1 crashed");

    // A new process: the same journal directory, handlers and workflow.
    let journal = open_journal(&data_dir)?;
    let sagas = start_worker(&journal, &services, "worker-2")?;
    println!("  worker-2 reads the journal:");
    show(&sagas.status(&id).await?)?;
    let resumed = sagas.resume_all().await?;
    println!("  worker-2 resumed {resumed} saga(s)");
    let status = sagas.wait(&id, Duration::from_secs(30)).await?;
    show(&status)?;
    // ANCHOR_END: crash
    journal.close().await;

    // Who ran what, from the services' point of view.
    let key = |worker: &str, step: &str| {
        services
            .calls()
            .into_iter()
            .find(|c| c.key.starts_with(&id) && c.worker == worker && c.step == step)
            .map(|c| c.key)
    };
    let (mut kept, mut rerun, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
    for (step, _) in &status.steps {
        match (key("worker-1", step), key("worker-2", step)) {
            (Some(_), None) => kept.push(step.as_str()),
            (Some(before), Some(after)) if before == after => rerun.push((step.as_str(), after)),
            (None, Some(_)) => fresh.push(step.as_str()),
            _ => return Err(format!("step {step} ran under two idempotency keys").into()),
        }
    }
    println!("  not re-run, the journal had them: {}", kept.join(", "));
    for (step, key) in &rerun {
        println!("  re-run, its outcome was lost in the crash: {step} (same key {key})");
    }
    println!("  run for the first time by worker-2: {}", fresh.join(", "));
    if status.phase != Phase::Completed || rerun.len() != 1 {
        return Err("run 2 should have completed, re-running only the hung step".into());
    }
    println!(
        "  in the services: {}",
        services
            .records()
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );

    println!(
        "\nsummary: run 1 aborted and undid {} steps, once each, dependents first; \
         run 2 resumed after a crash and re-ran {} of its {} steps",
        undone.len(),
        rerun.len(),
        status.steps.len()
    );
    Ok(())
}

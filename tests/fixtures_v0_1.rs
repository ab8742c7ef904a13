//! Journals written by release 0.1 (commit e904dd7, the last before
//! agents per session) replay under this code: sessions (one with a turn
//! answered again as attempt 2 under 0.1's rules), tasks, workflows and
//! the GPU lease table, read back as 0.1 read them (`expected.json`,
//! written by 0.1 itself), then carried on: a pending turn answered, a
//! waiting workflow approved, a new turn in an old session.
//!
//! The fixtures (`tests/fixtures/v0.1`) are RocksDB directories; each test
//! copies them to a temporary directory before opening them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use troupe::gateway::{GatewayConfig, ModelConfig, Server, Tenant};
use troupe::prelude::*;
use troupe::saga::{SagaDefinition, StepDef};

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v0.1"))
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

/// `actual` has every field `expected` has, with the same value (fields
/// added since 0.1 are not compared).
fn assert_superset(actual: &Value, expected: &Value, path: &str) {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            for (k, v) in e {
                let got = a.get(k).unwrap_or(&Value::Null);
                assert_superset(got, v, &format!("{path}.{k}"));
            }
        }
        (Value::Array(a), Value::Array(e)) => {
            assert_eq!(a.len(), e.len(), "{path}: {a:?} vs {e:?}");
            for (i, (x, y)) in a.iter().zip(e).enumerate() {
                assert_superset(x, y, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(actual, expected, "{path}"),
    }
}

/// When step `step` of saga `id` last started, as journaled (the write
/// time in its envelope), from the journal in `dir`.
async fn step_started_ms(dir: &Path, id: &str, step: usize) -> u64 {
    let journal = RocksJournal::open_read_only(dir).expect("journal");
    let pid = PersistenceId::new("saga", id).expect("id");
    let events = journal
        .replay(&pid, 1, u64::MAX)
        .collect_all()
        .await
        .expect("replay");
    events
        .iter()
        .filter(|e| {
            matches!(
                e.decode::<troupe::saga::SagaEvent>(),
                Ok(troupe::saga::SagaEvent::StepStarted { step: s, .. }) if s == step
            )
        })
        .map(|e| e.timestamp_ms)
        .next_back()
        .expect("the step started")
}

/// Whether a signal step started at `started_ms` with `deadline` has run
/// out of time by now. A saga resumed from a journal of 0.1 keeps the
/// deadline that started then: absolute, not re-armed on resume.
fn past(started_ms: u64, deadline: Duration) -> bool {
    troupe::journal::now_ms() > started_ms + deadline.as_millis() as u64
}

async fn call(base: &str, token: &str, method: &str, path: &str, body: Option<Value>) -> Value {
    let mut req = reqwest::Client::new()
        .request(method.parse().expect("method"), format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let v: Value = resp.json().await.expect("json");
    assert!(status.is_success(), "{method} {path}: {status} {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_data_directory_of_0_1_is_served_and_carried_on() {
    let expected = expected();
    let g = &expected["gateway"];
    // 0.1 took short tokens; tenants are named by the data, tokens by
    // the configuration, so the data replays under a token of today's length.
    let token = "acme-fixture-token-0123456789abcdef";
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixtures().join("gateway"), dir.path());
    let waiting = g["waiting"].as_str().expect("waiting");
    let approve_started = step_started_ms(&dir.path().join("journal"), waiting, 1).await;
    // The `review` workflow waits an hour for its approval.
    let timed_out = past(approve_started, Duration::from_secs(3600));
    let mut config = GatewayConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_owned(),
        durability: Durability::Fsync,
        tenants: vec![Tenant::new("acme", token)],
        model: ModelConfig::Local {
            words: 8,
            chunk_ms: 0,
        },
        ..GatewayConfig::default()
    };
    config.gpus.force_simulated = true;
    // The lease table of 0.1 is recovered (the GPU supervisor would not
    // start otherwise), with nothing leased.
    let server = Server::start(config)
        .await
        .expect("the 0.1 data directory opens");
    let base = format!("http://{}", server.addr());
    let sid = g["session"]["id"].as_str().expect("session id");
    let session = call(&base, token, "GET", &format!("/v1/sessions/{sid}"), None).await;
    assert_superset(&session, &g["session"], "session");
    for (id, task) in g["tasks"].as_object().expect("tasks") {
        let now = call(&base, token, "GET", &format!("/v1/tasks/{id}"), None).await;
        assert_superset(&now, task, &format!("task {id}"));
    }
    for (id, flow) in g["workflows"].as_object().expect("workflows") {
        let now = call(&base, token, "GET", &format!("/v1/workflows/{id}"), None).await;
        if id == waiting && timed_out {
            continue; // checked below
        }
        assert_superset(&now, flow, &format!("workflow {id}"));
    }
    let gpus = call(&base, token, "GET", "/v1/gpus", None).await;
    assert_superset(&gpus, &g["gpus"], "gpus");

    // Carried on: the waiting workflow is approved and completes, or, once
    // its hour is up, times out and is compensated; the old session takes
    // a third turn.
    let want = if timed_out { "Aborted" } else { "Completed" };
    if !timed_out {
        call(
            &base,
            token,
            "POST",
            &format!("/v1/workflows/{waiting}/signals/approve"),
            Some(json!({"by": "editor"})),
        )
        .await;
    }
    let mut flow = Value::Null;
    for _ in 0..2_000 {
        flow = call(
            &base,
            token,
            "GET",
            &format!("/v1/workflows/{waiting}"),
            None,
        )
        .await;
        if flow["phase"] == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(flow["phase"], want, "{flow}");
    if timed_out {
        assert!(
            flow["error"]
                .as_str()
                .is_some_and(|e| e.contains("deadline")),
            "{flow}"
        );
    }
    let posted = call(
        &base,
        token,
        "POST",
        &format!("/v1/sessions/{sid}/messages"),
        Some(json!({"content": "and the day after?"})),
    )
    .await;
    assert_eq!(posted["turn"], 3);
    let task = posted["task_id"].as_str().expect("task id");
    let mut state = Value::Null;
    for _ in 0..2_000 {
        state =
            call(&base, token, "GET", &format!("/v1/tasks/{task}"), None).await["state"].clone();
        if state["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(state["status"], "succeeded", "{state}");
    server.shutdown().await.expect("shutdown");
}

struct Concierge;

impl Agent for Concierge {
    type State = ();
}

const CONCIERGE: AgentKey<Concierge> = AgentKey::new("concierge");

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct City {
    city: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_sagas_journaled_by_0_1_replay_and_resume() {
    let expected = expected();
    let a = &expected["agents"];
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixtures().join("agents"), dir.path());
    let approve_started = step_started_ms(dir.path(), "fixture-approval", 1).await;
    let timed_out = past(approve_started, Duration::from_secs(30 * 24 * 3600));
    let journal = RocksJournal::open(RocksConfig::new(dir.path()).durability(Durability::Fsync))
        .expect("the 0.1 journal opens");
    let forecast = Tool::new("forecast", "Tomorrow's weather", |c: City| async move {
        Ok::<_, String>(json!({"city": c.city, "sky": "clear"}))
    });
    let troupe = Troupe::builder()
        .journal(Arc::new(journal))
        .backend(LocalBackend::default().words(6, 2))
        .agent(
            &CONCIERGE,
            Concierge,
            AgentOptions::default().tools(Tools::new().with(forecast)),
        )
        .step("reserve", |_c: StepContext| async {
            Ok(json!({"reserved": 2}))
        })
        .step("release", |_c: StepContext| async { Ok(json!(null)) })
        .step("charge", |_c: StepContext| async {
            Err::<Value, _>(StepError::permanent("card declined"))
        })
        .step("ship", |_c: StepContext| async {
            Ok(json!({"shipped": true}))
        })
        .workflow(
            SagaDefinition::new(
                "order",
                vec![
                    StepDef::new("reserve", "reserve").compensate_with("release"),
                    StepDef::new("charge", "charge").after(&["reserve"]),
                ],
            )
            .expect("order"),
        )
        .workflow(
            SagaDefinition::new(
                "approval",
                vec![
                    StepDef::new("reserve", "reserve").compensate_with("release"),
                    StepDef::signal("approve", "approve", Duration::from_secs(30 * 24 * 3600))
                        .after(&["reserve"]),
                    StepDef::new("ship", "ship").after(&["approve"]),
                ],
            )
            .expect("approval"),
        )
        .build()
        .await
        .expect("the system builds over the 0.1 journal and resumes its work");
    let sessions = troupe.sessions();
    // An answered session with an attempt 2 (0.1 started attempts over:
    // its context holds only the second attempt's round) and a closed one
    // read exactly as 0.1 read them.
    for id in ["fixture-s1", "fixture-s3"] {
        let view = serde_json::to_value(sessions.view(id).await.expect("view")).expect("json");
        assert_superset(&view, &a["sessions"][id], id);
    }
    // The turn 0.1 left pending was resumed by the build and is answered.
    let s2 = sessions.view("fixture-s2").await.expect("view");
    let outcome = match s2.pending {
        Some(p) => troupe.agents().wait_turn_end("fixture-s2", p.turn).await,
        None => troupe.agents().wait_turn_end("fixture-s2", 2).await,
    }
    .expect("the pending turn of 0.1 is answered");
    assert_eq!(outcome.turn.turn, 2);
    let s2 = sessions.view("fixture-s2").await.expect("view");
    assert_eq!((s2.completed, s2.failed, s2.pending), (1, 1, None));

    let sagas = troupe.sagas();
    let order =
        serde_json::to_value(sagas.status("fixture-order").await.expect("status")).expect("json");
    assert_superset(&order, &a["sagas"]["fixture-order"], "fixture-order");
    if timed_out {
        // A month after the fixture was written, its deadline (taken from
        // the 0.1 event's own time) has passed: it was compensated.
        let done = sagas
            .wait("fixture-approval", Duration::from_secs(30))
            .await
            .expect("wait");
        assert_eq!(done.phase, troupe::saga::Phase::Aborted, "{done:?}");
        troupe.shutdown().await.expect("shutdown");
        return;
    }
    let approval = serde_json::to_value(sagas.status("fixture-approval").await.expect("status"))
        .expect("json");
    assert_superset(
        &approval,
        &a["sagas"]["fixture-approval"],
        "fixture-approval",
    );
    // Resumed, still waiting for its signal (its deadline, taken from the
    // 0.1 event's own time, is a month away): approved, it completes.
    let mut delivered = false;
    for _ in 0..500 {
        if sagas
            .signal("fixture-approval", "approve", json!({"by": "ops"}))
            .await
            .unwrap_or(false)
        {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(delivered, "the resumed saga takes its signal");
    let done = sagas
        .wait("fixture-approval", Duration::from_secs(30))
        .await
        .expect("wait");
    assert_eq!(
        serde_json::to_value(done.phase).expect("phase"),
        json!("Completed")
    );
    troupe.shutdown().await.expect("shutdown");
}

//! The gateway driven over real HTTP on 127.0.0.1: the task, session and
//! workflow lifecycles, tenants, every error status, resumable SSE streams
//! with random disconnects, Prometheus metrics, and a server killed with
//! SIGKILL right after a 202.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use troupe_gateway::{GatewayConfig, ModelConfig, Server, Tenant};

const ACME: &str = "acme-secret-token-0123456789abcdef";
const GLOBEX: &str = "globex-secret-token-0123456789abcdef";

/// A tenant allowed every priority (the tests exercise them all).
fn tenant(name: &str, token: &str) -> Tenant {
    let mut t = Tenant::new(name, token);
    t.quota.max_priority = 3;
    t
}

fn config(dir: &std::path::Path, chunk_ms: u64) -> GatewayConfig {
    let mut c = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        durability: troupe_journal::Durability::Buffered,
        tenants: vec![tenant("acme", ACME), tenant("globex", GLOBEX)],
        heartbeat_ms: 50,
        model: ModelConfig::Local {
            words: 12,
            chunk_ms,
        },
        ..GatewayConfig::default()
    };
    c.gpus.force_simulated = true;
    c
}

struct Api {
    base: String,
    http: Client,
}

impl Api {
    fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: Client::new(),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let text = resp.text().await.unwrap();
        (
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Polls a task until `done` accepts its state (bounded: a liveness check).
    async fn wait_task(&self, token: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..3_000 {
            let (s, _, body) = self
                .call("GET", &format!("/v1/tasks/{id}"), Some(token), None)
                .await;
            assert_eq!(s, StatusCode::OK, "{body}");
            if done(&body["state"]) {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("task {id} never reached the expected state");
    }

    async fn leased(&self) -> u64 {
        let (_, _, g) = self.call("GET", "/v1/gpus", Some(ACME), None).await;
        g["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["leased_memory_bytes"].as_u64().unwrap())
            .sum()
    }
}

fn is(status: &'static str) -> impl Fn(&Value) -> bool {
    move |s| s["status"] == status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_sessions_and_workflows_end_to_end_with_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Server::start(config(dir.path(), 1)).await.unwrap();
    let api = Api::new(gw.addr());

    // Inference task: 202 + Location, then succeeded with its result.
    let (s, h, body) = api
        .call(
            "POST",
            "/v1/tasks",
            Some(ACME),
            Some(json!({"prompt": "hello", "priority": 2})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    let id = body["task_id"].as_str().unwrap().to_owned();
    assert_eq!(h["location"], format!("/v1/tasks/{id}").as_str());
    let done = api.wait_task(ACME, &id, is("succeeded")).await;
    assert!(
        done["state"]["result"]["text"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count()
            == 12
    );
    assert_eq!(api.leased().await, 0);

    // Session: 201, a message answered by a task, events in the session.
    let (s, _, sess) = api.call("POST", "/v1/sessions", Some(ACME), None).await;
    assert_eq!(s, StatusCode::CREATED);
    let sid = sess["id"].as_str().unwrap().to_owned();
    let (s, h, body) = api
        .call(
            "POST",
            &format!("/v1/sessions/{sid}/messages"),
            Some(ACME),
            Some(json!({"content": "where is my order?"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    let tid = body["task_id"].as_str().unwrap().to_owned();
    assert_eq!(h["location"], format!("/v1/tasks/{tid}").as_str());
    let done = api.wait_task(ACME, &tid, is("succeeded")).await;
    assert_eq!(done["state"]["result"]["turn"], 1);
    let (_, _, view) = api
        .call("GET", &format!("/v1/sessions/{sid}"), Some(ACME), None)
        .await;
    assert_eq!(view["completed"], 1);
    // An embedding program posts to the same session in process: the
    // post reaches the session's agent, and the program waits for the end.
    let agents = gw.troupe().agents();
    let posted = agents
        .sessions()
        .post(&sid, "and my invoice?")
        .await
        .unwrap();
    let outcome = agents.wait_turn_end(&sid, posted.turn).await.unwrap();
    assert_eq!(outcome.turn.turn, 2);

    // Workflow: waits for its signal, then completes.
    let (s, _, body) = api
        .call(
            "POST",
            "/v1/workflows",
            Some(ACME),
            Some(json!({"definition": "review", "input": {"topic": "cats"}})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    let wid = body["workflow_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/workflows/{wid}");
    let mut delivered = false;
    for _ in 0..3_000 {
        let (s, _, _) = api
            .call(
                "POST",
                &format!("{path}/signals/approve"),
                Some(ACME),
                Some(json!({"by": "editor"})),
            )
            .await;
        if s == StatusCode::ACCEPTED {
            delivered = true;
            break;
        }
        assert_eq!(s, StatusCode::CONFLICT, "not waiting yet");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(delivered);
    let mut phase = Value::Null;
    for _ in 0..3_000 {
        let (_, _, w) = api.call("GET", &path, Some(ACME), None).await;
        phase = w["phase"].clone();
        if phase == "Completed" {
            assert_eq!(w["steps"].as_array().unwrap().len(), 3);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(phase, "Completed");

    // Another tenant sees none of it; no token is 401.
    for p in [
        format!("/v1/tasks/{id}"),
        format!("/v1/sessions/{sid}"),
        path.clone(),
    ] {
        let (s, _, body) = api.call("GET", &p, Some(GLOBEX), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{p}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("no "));
    }
    let (s, _, _) = api
        .call("DELETE", &format!("/v1/tasks/{id}"), Some(GLOBEX), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = api.call("GET", "/v1/gpus", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _, _) = api
        .call("GET", "/v1/gpus", Some("wrong-token-123"), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_task_frees_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Server::start(config(dir.path(), 2_000)).await.unwrap();
    let api = Api::new(gw.addr());
    let (_, _, body) = api
        .call(
            "POST",
            "/v1/tasks",
            Some(ACME),
            Some(json!({"prompt": "long"})),
        )
        .await;
    let id = body["task_id"].as_str().unwrap().to_owned();
    api.wait_task(ACME, &id, is("running")).await;
    while api.leased().await == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (s, _, body) = api
        .call("DELETE", &format!("/v1/tasks/{id}"), Some(ACME), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["state"]["status"], "cancelled");
    let mut freed = false;
    for _ in 0..2_000 {
        if api.leased().await == 0 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(freed, "the cancelled task's lease was not released");
    // 409: a second message while the first turn is in progress.
    let (_, _, sess) = api.call("POST", "/v1/sessions", Some(GLOBEX), None).await;
    let sid = sess["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/sessions/{sid}/messages");
    let (s, _, _) = api
        .call("POST", &path, Some(GLOBEX), Some(json!({"content": "a"})))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, _, msg) = api
        .call("POST", &path, Some(GLOBEX), Some(json!({"content": "b"})))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{msg}");
    assert!(msg["error"]["message"].as_str().unwrap().contains("busy"));
    gw.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_status_has_a_json_message_and_metrics_parse() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), 300);
    c.body_limit_bytes = 1_024;
    c.task_queue = 1;
    c.task_workers = 1;
    let gw = Server::start(c).await.unwrap();
    let api = Api::new(gw.addr());
    let raw = |body: &'static str| {
        api.http
            .post(format!("{}/v1/tasks", api.base))
            .bearer_auth(ACME)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // 400: malformed JSON, and a missing field named in the message.
    let r = raw("{\"prompt\": ").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = raw("{\"priority\": 1}").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let msg: Value = r.json().await.unwrap();
    assert!(
        msg["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing field `prompt`"),
        "{msg}"
    );
    let (s, _, msg) = api
        .call(
            "POST",
            "/v1/tasks",
            Some(ACME),
            Some(json!({"prompt": "x", "priority": 9})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        msg["error"]["message"]
            .as_str()
            .unwrap()
            .contains("priority")
    );
    // 404: unknown ids and routes.
    let (s, _, msg) = api.call("GET", "/v1/tasks/nope", Some(ACME), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(msg["error"]["message"], "no task `nope`");
    let (s, _, _) = api
        .call("GET", "/v1/sessions/nope/events", Some(ACME), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = api.call("GET", "/v2/whatever", Some(ACME), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // 413: a body over the limit.
    let (s, _, msg) = api
        .call(
            "POST",
            "/v1/tasks",
            Some(ACME),
            Some(json!({"prompt": "x".repeat(4_096)})),
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{msg}");
    assert!(msg["error"]["message"].as_str().unwrap().contains("1024"));
    // 429: the task queue at its bound (one running, one waiting).
    let mut refused = None;
    for _ in 0..20 {
        let (s, h, msg) = api
            .call(
                "POST",
                "/v1/tasks",
                Some(ACME),
                Some(json!({"prompt": "fill"})),
            )
            .await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            refused = Some((h, msg));
            break;
        }
        assert_eq!(s, StatusCode::ACCEPTED);
    }
    let (h, msg) = refused.expect("a full queue answers 429");
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    assert!(
        msg["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue full")
    );
    // /metrics is Prometheus text with the documented histogram buckets.
    let mut finished = false;
    for _ in 0..3_000 {
        let text = api
            .http
            .get(format!("{}/metrics", api.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("exposition text");
        let buckets: Vec<f64> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "inference_latency_seconds")
            .filter_map(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) => {
                    Some(h.iter().map(|b| b.less_than).collect::<Vec<_>>())
                }
                _ => None,
            })
            .next()
            .unwrap_or_default();
        // The GenAI client metrics (with the buckets their conventions
        // advise) appear once a model call has ended; the local model
        // reports usage, so input tokens are counted.
        let histogram = |name: &str, token_type: Option<&str>| -> Vec<f64> {
            scrape
                .samples
                .iter()
                .filter(|s| s.metric == name)
                .filter(|s| token_type.is_none_or(|t| s.labels.get("gen_ai_token_type") == Some(t)))
                .find_map(|s| match &s.value {
                    prometheus_parse::Value::Histogram(h) => {
                        Some(h.iter().map(|b| b.less_than).collect())
                    }
                    _ => None,
                })
                .unwrap_or_default()
        };
        let tokens = histogram("gen_ai_client_token_usage", Some("input"));
        if !buckets.is_empty() && !tokens.is_empty() {
            assert_eq!(&buckets[..6], &[0.1, 0.5, 1.0, 2.0, 5.0, 10.0]);
            assert_eq!(&tokens[..4], &[1.0, 4.0, 16.0, 64.0], "input token usage");
            assert!(!histogram("gen_ai_client_token_usage", Some("output")).is_empty());
            let first = histogram("gen_ai_client_operation_time_to_first_chunk_seconds", None);
            assert_eq!(&first[..3], &[0.001, 0.005, 0.01]);
            let duration = histogram("gen_ai_client_operation_duration_seconds", None);
            assert_eq!(&duration[..3], &[0.01, 0.02, 0.04]);
            // Every metric has HELP text (a new one without it fails here).
            for sample in &scrape.samples {
                let family = ["_sum", "_count", "_bucket"]
                    .iter()
                    .find_map(|s| sample.metric.strip_suffix(s))
                    .filter(|f| scrape.docs.contains_key(*f))
                    .unwrap_or(&sample.metric);
                assert!(
                    scrape.docs.contains_key(family),
                    "`{}` has no # HELP (add it to troupe_gateway's catalogue)",
                    sample.metric
                );
            }
            assert!(
                scrape
                    .samples
                    .iter()
                    .any(|s| s.metric == "troupe_gateway_errors_total")
            );
            assert!(
                scrape
                    .samples
                    .iter()
                    .any(|s| s.metric.starts_with("troupe_journal_"))
            );
            finished = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        finished,
        "no inference latency or GenAI token histogram in /metrics"
    );
    let (s, _, _) = api.call("GET", "/readyz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    gw.shutdown().await.unwrap();
}

/// Reads SSE events (`id`, `event`, `data`) from a response until `stop` of them.
async fn read_sse(resp: reqwest::Response, stop: usize, out: &mut Vec<(u64, String)>) -> usize {
    let mut bytes = resp.bytes_stream();
    let mut buf = String::new();
    let mut got = 0;
    let (mut id, mut data) = (None, String::new());
    while got < stop {
        let Some(Ok(chunk)) = bytes.next().await else {
            break;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(nl) = buf.find('\n') {
            let line: String = buf.drain(..=nl).collect();
            let line = line.trim_end_matches(['\n', '\r']);
            if let Some(v) = line.strip_prefix("id:") {
                id = Some(v.trim().parse::<u64>().unwrap());
            } else if let Some(v) = line.strip_prefix("data:") {
                data = v.trim().to_owned();
            } else if line.is_empty()
                && let Some(seq) = id.take()
            {
                out.push((seq, std::mem::take(&mut data)));
                got += 1;
                if got == stop {
                    return got;
                }
            }
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_clients_that_drop_at_random_resume_with_every_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Server::start(config(dir.path(), 2)).await.unwrap();
    let api = Api::new(gw.addr());
    let (_, _, sess) = api.call("POST", "/v1/sessions", Some(ACME), None).await;
    let sid = sess["id"].as_str().unwrap().to_owned();
    let turns = 4;
    let driver = {
        let api = Api::new(gw.addr());
        let sid = sid.clone();
        tokio::spawn(async move {
            for t in 0..turns {
                let (s, _, body) = api
                    .call(
                        "POST",
                        &format!("/v1/sessions/{sid}/messages"),
                        Some(ACME),
                        Some(json!({"content": format!("turn {t}")})),
                    )
                    .await;
                assert_eq!(s, StatusCode::ACCEPTED, "{body}");
                api.wait_task(ACME, body["task_id"].as_str().unwrap(), is("succeeded"))
                    .await;
            }
        })
    };
    let mut rng = rand::rng();
    let mut seen: Vec<(u64, String)> = Vec::new();
    let mut reconnects = 0;
    let mut drained = false;
    while !drained {
        let last = seen.last().map_or(0, |(s, _)| *s);
        let mut req = api
            .http
            .get(format!("{}/v1/sessions/{sid}/events", api.base))
            .bearer_auth(ACME);
        if last > 0 {
            req = req.header("Last-Event-ID", last.to_string());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let take = rng.random_range(1..12);
        let got =
            tokio::time::timeout(Duration::from_millis(500), read_sse(resp, take, &mut seen)).await;
        reconnects += 1;
        if driver.is_finished() && matches!(got, Err(_) | Ok(0)) {
            drained = true; // nothing more arrives
        }
    }
    driver.await.unwrap();
    let (_, _, view) = api
        .call("GET", &format!("/v1/sessions/{sid}"), Some(ACME), None)
        .await;
    let last = view["seq"].as_u64().unwrap();
    let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "after {reconnects} reconnects"
    );
    let completed = seen
        .iter()
        .filter(|(_, d)| d.contains("\"turn_completed\""))
        .count();
    assert_eq!(completed, turns);
    gw.shutdown().await.unwrap();
}

/// With `[storage]`, a session's events are archived to the cold tier and
/// read back unchanged over SSE from there (no hot tail, nothing left
/// warm); blobs go in and out over HTTP, bounded and checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_archives_sessions_and_serves_blobs_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), 0);
    let mut storage = troupe_journal::TierConfig::default();
    storage.archive.archive_after_s = Some(1);
    storage.archive.min_segment_events = 1;
    storage.blobs.max_blob_bytes = 2 << 20;
    storage.blobs.chunk_bytes = 256 << 10;
    // No hot tail: once archived, every read below goes to the cold tier.
    storage.hot = troupe_journal::HotConfig::disabled();
    c.storage = Some(storage);
    let gw = Server::start(c.clone()).await.unwrap();
    let api = Api::new(gw.addr());
    let (_, _, sess) = api.call("POST", "/v1/sessions", Some(ACME), None).await;
    let sid = sess["id"].as_str().unwrap().to_owned();
    for t in 0..2 {
        let task = post_message(&api, &sid, &format!("turn {t}")).await;
        api.wait_task(ACME, &task, is("succeeded")).await;
    }
    let before = session_events(&api, &sid).await;
    assert!(before.len() > 6, "{before:?}");
    let tiered = gw.troupe().tiered().expect("storage configured");
    let report = tiered
        .archive_all(troupe_journal::now_ms() + 60_000, |_, _| {})
        .await
        .unwrap();
    assert!(report.events >= before.len() as u64, "{report:?}");
    let pid = troupe_journal::PersistenceId::new("session", &sid).unwrap();
    let manifest = tiered.manifest(&pid).await.unwrap().expect("archived");
    assert_eq!(manifest.archived_to, before.last().unwrap().0);
    assert_eq!(
        session_events(&api, &sid).await,
        before,
        "cold events read back unchanged"
    );

    // A shutdown lets go of everything: the same process starts the
    // gateway again on the same data (the journal's lock is released once
    // the last actors have stopped) and reads the archived session back.
    gw.shutdown().await.unwrap();
    let mut restarted = None;
    for _ in 0..500 {
        match Server::start(c.clone()).await {
            Ok(g) => {
                restarted = Some(g);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let gw = restarted.expect("the gateway restarts in the same process");
    let tiered = gw.troupe().tiered().expect("storage configured");
    let api = Api::new(gw.addr());
    assert_eq!(
        session_events(&api, &sid).await,
        before,
        "cold events read back unchanged after the restart"
    );

    let payload: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    let parts: Vec<Result<Vec<u8>, std::io::Error>> =
        payload.chunks(64 << 10).map(|c| Ok(c.to_vec())).collect();
    let resp = api
        .http
        .post(format!("{}/v1/blobs", api.base))
        .bearer_auth(ACME)
        .header("content-type", "image/png")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(parts)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let blob: Value = resp.json().await.unwrap();
    assert_eq!(blob["size"], 1_500_000);
    assert_eq!(blob["media_type"], "image/png");
    assert_eq!(
        location,
        format!("/v1/blobs/{}", blob["hash"].as_str().unwrap())
    );
    let got = api
        .http
        .get(format!("{}{location}", api.base))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(got.bytes().await.unwrap().as_ref(), payload.as_slice());

    // A message may carry it; the turn's event refers to it, so the blob
    // collector keeps it long after its grace period.
    let (s, _, body) = api
        .call(
            "POST",
            &format!("/v1/sessions/{sid}/messages"),
            Some(ACME),
            Some(json!({"content": "what is in this photo?", "attachments": [blob.clone()]})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    api.wait_task(ACME, body["task_id"].as_str().unwrap(), is("succeeded"))
        .await;
    let mut ghost = blob.clone();
    ghost["hash"] = json!(format!("sha256:{}", "cd".repeat(32)));
    let (s, _, body) = api
        .call(
            "POST",
            &format!("/v1/sessions/{sid}/messages"),
            Some(ACME),
            Some(json!({"content": "and this one?", "attachments": [ghost]})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("not stored"), "{body}");
    let events = session_events(&api, &sid).await;
    assert!(
        events
            .iter()
            .any(|(_, d)| d.contains("attachments") && d.contains(blob["hash"].as_str().unwrap())),
        "the user turn carries the reference"
    );
    let gc = tiered
        .collect_blobs(troupe_journal::now_ms() + 86_400_000)
        .await
        .unwrap();
    assert_eq!((gc.collected, gc.kept), (0, 1), "{gc:?}");

    let big = vec![0u8; 3 << 20];
    let resp = api
        .http
        .post(format!("{}/v1/blobs", api.base))
        .bearer_auth(ACME)
        .header("content-type", "video/mp4")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2097152"),
        "{body}"
    );
    let (s, _, _) = api
        .call(
            "GET",
            &format!("/v1/blobs/sha256:{}", "ab".repeat(32)),
            Some(ACME),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = api.call("GET", "/v1/blobs/nothex", Some(ACME), None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = api.call("GET", &location, None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    gw.shutdown().await.unwrap();
}

/// Every event of a session so far, read over SSE from the start (the
/// stream is cut once nothing new arrives for 500 ms).
async fn session_events(api: &Api, sid: &str) -> Vec<(u64, String)> {
    let resp = api
        .http
        .get(format!("{}/v1/sessions/{sid}/events?after=0", api.base))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        read_sse(resp, usize::MAX, &mut out),
    )
    .await;
    out
}

async fn post_message(api: &Api, sid: &str, text: &str) -> String {
    let (s, _, body) = api
        .call(
            "POST",
            &format!("/v1/sessions/{sid}/messages"),
            Some(ACME),
            Some(json!({ "content": text })),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    body["task_id"].as_str().unwrap().to_owned()
}

/// With `[postgres]`, a second server on another data directory (another
/// machine, as far as it can tell) carries on the sessions the first one
/// served: same events, same sequence numbers, the next turn answered.
/// Needs `TROUPE_PG_URL` (`make test` starts a throwaway PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_carries_on_sessions_from_the_shared_postgres_journal() {
    let url = std::env::var("TROUPE_PG_URL").expect(
        "TROUPE_PG_URL is not set: `make test` starts a throwaway PostgreSQL; \
         by hand: TROUPE_PG_URL=$(scripts/pg.sh start) cargo test -p troupe_gateway",
    );
    let schema = format!("gw_{:016x}", rand::random::<u64>());
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let configure = |dir: &std::path::Path| {
        let mut c = config(dir, 0);
        c.postgres = Some(troupe_gateway::PostgresSection {
            url: url.clone(),
            schema: schema.clone(),
            pool_size: 8,
        });
        c
    };
    let first = Server::start(configure(dirs[0].path())).await.unwrap();
    let api = Api::new(first.addr());
    let (_, _, sess) = api.call("POST", "/v1/sessions", Some(ACME), None).await;
    let sid = sess["id"].as_str().unwrap().to_owned();
    let task = post_message(&api, &sid, "hello from node one").await;
    api.wait_task(ACME, &task, is("succeeded")).await;
    let before = session_events(&api, &sid).await;
    assert!(before.iter().any(|(_, d)| d.contains("turn_completed")));
    first.shutdown().await.unwrap();

    let second = Server::start(configure(dirs[1].path())).await.unwrap();
    let api = Api::new(second.addr());
    assert_eq!(session_events(&api, &sid).await, before, "the same events");
    let task = post_message(&api, &sid, "and hello from node two").await;
    api.wait_task(ACME, &task, is("succeeded")).await;
    let after = session_events(&api, &sid).await;
    assert_eq!(&after[..before.len()], &before[..]);
    let seqs: Vec<u64> = after.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=after.len() as u64).collect::<Vec<_>>());
    assert_eq!(
        after
            .iter()
            .filter(|(_, d)| d.contains("turn_completed"))
            .count(),
        2,
        "the second server answered turn 2"
    );
    let (_, _, view) = api
        .call("GET", &format!("/v1/sessions/{sid}"), Some(ACME), None)
        .await;
    assert_eq!(view["turns"], 2, "{view}");
    second.shutdown().await.unwrap();
}

const CHILD_DIR: &str = "TROUPE_GATEWAY_CHILD_DIR";

/// The server process of `a_server_killed_after_202_finishes_the_work`.
#[test]
#[ignore = "the child process of a_server_killed_after_202_finishes_the_work"]
fn gateway_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut c = config(std::path::Path::new(&dir), 50);
        c.durability = troupe_journal::Durability::Fsync;
        let gw = Server::start(c).await.unwrap();
        println!("LISTENING {}", gw.addr());
        std::future::pending::<()>().await;
    });
}

fn spawn_child(dir: &std::path::Path) -> (std::process::Child, std::net::SocketAddr) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "gateway_child",
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("child exited").unwrap();
        if let Some((_, a)) = line.split_once("LISTENING ") {
            break a.trim().parse().unwrap();
        }
    };
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_after_202_finishes_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_child(dir.path());
    let api = Api::new(addr);
    let (_, _, sess) = api.call("POST", "/v1/sessions", Some(ACME), None).await;
    let sid = sess["id"].as_str().unwrap().to_owned();
    let (s, _, turn) = api
        .call(
            "POST",
            &format!("/v1/sessions/{sid}/messages"),
            Some(ACME),
            Some(json!({"content": "hi"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, _, task) = api
        .call(
            "POST",
            "/v1/tasks",
            Some(ACME),
            Some(json!({"prompt": "survive"})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    child.kill().unwrap(); // SIGKILL, right after the 202s
    child.wait().unwrap();

    let (mut child, addr) = spawn_child(dir.path());
    let api = Api::new(addr);
    for id in [
        task["task_id"].as_str().unwrap(),
        turn["task_id"].as_str().unwrap(),
    ] {
        api.wait_task(ACME, id, is("succeeded")).await;
    }
    let (_, _, view) = api
        .call("GET", &format!("/v1/sessions/{sid}"), Some(ACME), None)
        .await;
    assert_eq!(view["completed"], 1, "{view}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A signal is journaled before its 202: killed right after the answer,
/// the restarted server still has it (the workflow goes on to publish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_answered_202_survives_a_sigkill_right_after() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, addr) = spawn_child(dir.path());
    let api = Api::new(addr);
    let (s, _, w) = api
        .call(
            "POST",
            "/v1/workflows",
            Some(ACME),
            Some(json!({"definition": "review", "input": {"topic": "crash"}})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{w}");
    let id = w["workflow_id"].as_str().unwrap().to_owned();
    let path = format!("/v1/workflows/{id}/signals/approve");
    // 409 until the draft is done and the approval waits.
    let mut delivered = false;
    for _ in 0..3_000 {
        let (s, _, body) = api.call("POST", &path, Some(ACME), None).await;
        if s == StatusCode::ACCEPTED {
            delivered = true;
            break;
        }
        assert_eq!(s, StatusCode::CONFLICT, "{body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(delivered, "the approval never waited");
    child.kill().unwrap(); // SIGKILL, right after the 202
    child.wait().unwrap();

    let (mut child, addr) = spawn_child(dir.path());
    let api = Api::new(addr);
    let mut phase = Value::Null;
    for _ in 0..3_000 {
        let (_, _, w) = api
            .call("GET", &format!("/v1/workflows/{id}"), Some(ACME), None)
            .await;
        phase = w["phase"].clone();
        if phase == "Completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(phase, "Completed", "the approval was lost");
    let (s, _, _) = api.call("POST", &path, Some(ACME), None).await;
    assert_eq!(s, StatusCode::CONFLICT, "a second approval is refused");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_degrade_policy_refuses_low_priorities_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), 2_000);
    c.gpus.simulated = 1;
    c.gpus.lease_compute_pct = 50;
    c.degrade.refuse_lowest_above_pct = 30;
    c.degrade.top_only_above_pct = 40;
    let gw = Server::start(c).await.unwrap();
    let api = Api::new(gw.addr());
    // Idle GPUs: every priority is accepted.
    let (s, _, busy) = api
        .call(
            "POST",
            "/v1/tasks",
            Some(ACME),
            Some(json!({"prompt": "hold", "priority": 0})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    api.wait_task(ACME, busy["task_id"].as_str().unwrap(), is("running"))
        .await;
    // One running task leases 50 % of the only GPU: above both thresholds.
    let mut refused = None;
    for _ in 0..2_000 {
        let (s, h, msg) = api
            .call(
                "POST",
                "/v1/tasks",
                Some(ACME),
                Some(json!({"prompt": "x", "priority": 2})),
            )
            .await;
        if s == StatusCode::TOO_MANY_REQUESTS {
            refused = Some((h, msg));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (h, msg) = refused.expect("priority 2 refused above the top-only threshold");
    assert!(h.contains_key("retry-after"));
    assert!(
        msg["error"]["message"]
            .as_str()
            .unwrap()
            .contains("degrade policy"),
        "{msg}"
    );
    let (s, _, _) = api
        .call(
            "POST",
            "/v1/tasks",
            Some(ACME),
            Some(json!({"prompt": "x", "priority": 0})),
        )
        .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    let (s, _, _) = api
        .call(
            "POST",
            "/v1/tasks",
            Some(ACME),
            Some(json!({"prompt": "x", "priority": 3})),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "the top priority still flows");
    gw.shutdown().await.unwrap();
}

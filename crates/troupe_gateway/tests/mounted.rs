//! The gateway as a router over a system the program built itself:
//! mounted in the program's own axum app next to its own routes, and
//! answering 503 with `Retry-After` (not 500) while the journal fails.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use reqwest::StatusCode;
use serde_json::{Value, json};
use troupe_agent::{AgentOptions, LocalBackend};
use troupe_gateway::{ASSISTANT, Assistant, Gateway, GatewayConfig, ServeLimits, Tenant, serve};
use troupe_journal::{FaultyJournal, InMemoryJournal};
use troupe_runtime::Troupe;

const TOKEN: &str = "acme-mounted-token-0123456789abcdef";

fn config() -> GatewayConfig {
    GatewayConfig {
        tenants: vec![Tenant::new("acme", TOKEN)],
        ..GatewayConfig::default()
    }
}

/// Serves `app` on 127.0.0.1; returns its base URL and a stop switch.
// ANCHOR: serve
async fn listen(app: axum::Router) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // The connection cap, header-read and write time-outs of `[http]`'s
    // defaults; `ServeLimits::from(&config.http)` takes a config's.
    let limits = ServeLimits::default();
    tokio::spawn(serve(listener, app, limits, async move {
        let _ = stopped.await;
    }));
    (base, stop)
}
// ANCHOR_END: serve

/// The gateway over `troupe`, served on 127.0.0.1.
async fn served(
    troupe: Troupe,
) -> (
    Arc<Troupe>,
    Gateway,
    String,
    tokio::sync::oneshot::Sender<()>,
) {
    let troupe = Arc::new(troupe);
    let gateway = Gateway::new(troupe.clone(), config()).await.unwrap();
    let (base, stop) = listen(gateway.router()).await;
    (troupe, gateway, base, stop)
}

async fn call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut req = http
        .request(method.parse().unwrap(), url)
        .bearer_auth(TOKEN);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_mounts_in_a_users_axum_app_beside_its_own_routes() {
    let troupe = Troupe::builder()
        .durability(troupe_journal::Durability::InMemory)
        .backend(LocalBackend::default())
        .agent(&ASSISTANT, Assistant, AgentOptions::default())
        .build()
        .await
        .unwrap();
    let troupe = Arc::new(troupe);
    let gateway = Gateway::new(troupe.clone(), config()).await.unwrap();
    // The user's own app: its route, and Troupe's routes merged in.
    let app = axum::Router::new()
        .route("/hello", get(|| async { "hello from the app" }))
        .merge(gateway.router());
    let (base, stop) = listen(app).await;
    let http = reqwest::Client::new();
    let hello = http
        .get(format!("{base}/hello"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(hello, "hello from the app");
    let (s, _, session) = call(&http, "POST", &format!("{base}/v1/sessions"), None).await;
    assert_eq!(s, StatusCode::CREATED, "{session}");
    let sid = session["id"].as_str().unwrap();
    let (s, _, posted) = call(
        &http,
        "POST",
        &format!("{base}/v1/sessions/{sid}/messages"),
        Some(json!({"content": "where is my order?"})),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{posted}");
    let task = posted["task_id"].as_str().unwrap();
    let mut status = Value::Null;
    for _ in 0..3_000 {
        let (_, _, t) = call(&http, "GET", &format!("{base}/v1/tasks/{task}"), None).await;
        status = t["state"].clone();
        if status["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(status["status"], "succeeded", "{status}");
    assert_eq!(status["result"]["turn"], 1);
    // A session opened with an agent this system does not have is a 400.
    let (s, _, _) = call(
        &http,
        "POST",
        &format!("{base}/v1/sessions"),
        Some(json!({"agent": "nobody"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let _ = stop.send(());
    gateway.shutdown();
    troupe.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_journal_failures_answer_503_with_retry_after() {
    let (journal, faults) = FaultyJournal::new(InMemoryJournal::new());
    let troupe = Troupe::builder()
        .journal(Arc::new(journal))
        .backend(LocalBackend::default())
        .agent(&ASSISTANT, Assistant, AgentOptions::default())
        .build()
        .await
        .unwrap();
    let (troupe, gateway, base, stop) = served(troupe).await;
    let http = reqwest::Client::new();

    faults.fail_appends(1);
    let (s, h, body) = call(&http, "POST", &format!("{base}/v1/sessions"), None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);

    // Once the journal answers again, so does the gateway.
    let (s, _, session) = call(&http, "POST", &format!("{base}/v1/sessions"), None).await;
    assert_eq!(s, StatusCode::CREATED, "{session}");
    let sid = session["id"].as_str().unwrap();

    // A message whose task cannot be journaled: 503 too, and nothing posted.
    faults.fail_appends(1);
    let (s, h, body) = call(
        &http,
        "POST",
        &format!("{base}/v1/sessions/{sid}/messages"),
        Some(json!({"content": "hello"})),
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(h.contains_key("retry-after"));
    let (_, _, view) = call(&http, "GET", &format!("{base}/v1/sessions/{sid}"), None).await;
    assert_eq!(view["turns"], 0, "{view}");
    let _ = stop.send(());
    gateway.shutdown();
    troupe.shutdown().await.unwrap();
}

/// Polls `/readyz` until it answers `want` (bounded: the loop, not a
/// timer, decides; the cap only stops a broken build from hanging).
async fn readyz_until(http: &reqwest::Client, base: &str, want: StatusCode) -> Value {
    for _ in 0..4_000 {
        let (s, _, body) = call(http, "GET", &format!("{base}/readyz"), None).await;
        if s == want {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("/readyz never answered {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_supervisor_whose_journal_fails_is_restarted_and_readyz_says_so_meanwhile() {
    use troupe_gpu::probe::SimulatedProbe;
    use troupe_gpu::scheduler::LeaseRequest;
    let (leases, faults) = FaultyJournal::new(InMemoryJournal::new());
    let probe = SimulatedProbe::new(1, 16 << 30);
    let troupe = Troupe::builder()
        .journal(Arc::new(InMemoryJournal::new()))
        .gpus(Arc::new(probe.clone()))
        .lease_journal(Arc::new(leases))
        .backend(LocalBackend::default())
        .agent(&ASSISTANT, Assistant, AgentOptions::default())
        .build()
        .await
        .unwrap();
    let (troupe, gateway, base, stop) = served(troupe).await;
    let http = reqwest::Client::new();
    readyz_until(&http, &base, StatusCode::OK).await;

    let gpu = troupe.gpu().expect("gpus configured").clone();
    let req = || LeaseRequest {
        holder: "probe".into(),
        memory: 1 << 30,
        compute: 10,
        priority: 1,
        deadline_ms: gpu.now_ms() + 60_000,
        ttl_ms: 10_000,
        estimate_ms: Some(100),
        ..LeaseRequest::default()
    };
    // The journal refuses the grant's write: the supervisor fails (nobody
    // is told of a grant it could not journal) and its restart's recovery
    // is held.
    faults.fail_appends(1);
    faults.hold_reads();
    let before = gpu.actor().unwrap().get_id();
    assert!(gpu.acquire(req(), None, None).await.is_err());
    let body = readyz_until(&http, &base, StatusCode::SERVICE_UNAVAILABLE).await;
    assert!(
        body.to_string().contains("GPU supervisor"),
        "readiness names what is down: {body}"
    );
    // Still down while its recovery cannot finish.
    let (s, _, _) = call(&http, "GET", &format!("{base}/readyz"), None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);

    faults.release_reads();
    readyz_until(&http, &base, StatusCode::OK).await;
    assert_ne!(gpu.actor().unwrap().get_id(), before, "a new incarnation");
    let lease = gpu.acquire(req(), None, None).await.expect("grants again");
    gpu.release(&lease).await.unwrap();

    // A device that refuses one field (a MIG instance and its utilization)
    // stays healthy, and the API says what is unknown and why.
    probe.refuse(0, "utilization", Some("Not Supported"));
    let mut device = Value::Null;
    for _ in 0..4_000 {
        let (_, _, g) = call(&http, "GET", &format!("{base}/v1/gpus"), None).await;
        device = g["devices"][0].clone();
        if device["refused"][0]["field"] == "utilization" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(device["refused"][0]["reason"], "Not Supported", "{device}");
    assert_eq!(device["healthy"], true, "{device}");
    assert!(device["utilization_pct"].is_null(), "{device}");
    gpu.acquire(req(), None, None).await.expect("still grants");
    let _ = stop.send(());
    gateway.shutdown();
    troupe.shutdown().await.unwrap();
}

//! The gateway against slow and hostile clients.
//!
//! In process, through the router (tower's `oneshot`, no sockets): a
//! tenant-isolation matrix generated from the router's own route table;
//! the framework's rejections in the documented JSON form with request
//! ids; RFC 9110 authentication; `Host`, `Origin` and CORS; 100,000 GETs
//! of unknown ids; `Idempotency-Key`; two concurrent signals; proptest
//! inputs over every route. Over real sockets on 127.0.0.1: 500 slowloris
//! connections, and 200 clients that stop reading.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use futures::StreamExt;
use proptest::prelude::*;
use serde_json::{Value, json};
use tower::ServiceExt;
use troupe_gateway::{Access, Gateway, GatewayConfig, ModelConfig, Server, Tenant, routes};

const ACME: &str = "acme-hostile-token-0123456789abcdef";
const GLOBEX: &str = "globex-hostile-token-0123456789abcdef";
const APP: &str = "https://app.example";

fn config(dir: &std::path::Path) -> GatewayConfig {
    let mut c = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        durability: troupe_journal::Durability::Buffered,
        tenants: vec![Tenant::new("acme", ACME), Tenant::new("globex", GLOBEX)],
        heartbeat_ms: 50,
        model: ModelConfig::Local {
            words: 4,
            chunk_ms: 0,
        },
        storage: Some(troupe_journal::TierConfig::default()),
        ..GatewayConfig::default()
    };
    c.http.cors_origins = vec![APP.into()];
    c.gpus.force_simulated = true;
    c
}

async fn gateway(c: &GatewayConfig) -> Gateway {
    let troupe = troupe_gateway::troupe_for(c).await.unwrap();
    Gateway::new(Arc::new(troupe), c.clone()).await.unwrap()
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

/// One request through the router. Event streams are not read.
async fn call(
    router: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Body>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| *k == "host") {
        req = req.header("host", "127.0.0.1:8080");
    }
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(body.unwrap_or_else(Body::empty)).unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let sse = headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let body = if sse {
        Value::String("(event stream)".into())
    } else {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn json_body(v: Value) -> Option<Body> {
    Some(Body::from(v.to_string()))
}

const JSON: (&str, &str) = ("content-type", "application/json");

/// Every error has the documented JSON form and the request's id.
fn assert_error_form(r: &Reply, what: &str) {
    let id = r
        .headers
        .get("x-request-id")
        .unwrap_or_else(|| panic!("{what}: no x-request-id"))
        .to_str()
        .unwrap()
        .to_owned();
    if r.status.is_client_error() || r.status.is_server_error() {
        assert!(
            r.headers
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"application/json")),
            "{what}: {} is not JSON: {}",
            r.status,
            r.body
        );
        assert!(r.body["error"]["code"].is_string(), "{what}: {}", r.body);
        assert!(r.body["error"]["message"].is_string(), "{what}: {}", r.body);
        assert_eq!(r.body["error"]["request_id"], id.as_str(), "{what}");
    }
}

/// Acme's resources, one per kind of id.
struct Owned {
    session: String,
    task: String,
    workflow: String,
    blob: String,
}

async fn acme_resources(router: &Router) -> Owned {
    let s = call(router, "POST", "/v1/sessions", Some(ACME), &[], None).await;
    assert_eq!(s.status, StatusCode::CREATED, "{}", s.body);
    let t = call(
        router,
        "POST",
        "/v1/tasks",
        Some(ACME),
        &[JSON],
        json_body(json!({"prompt": "p"})),
    )
    .await;
    assert_eq!(t.status, StatusCode::ACCEPTED, "{}", t.body);
    let w = call(
        router,
        "POST",
        "/v1/workflows",
        Some(ACME),
        &[JSON],
        json_body(json!({"definition": "review", "input": {"topic": "t"}})),
    )
    .await;
    assert_eq!(w.status, StatusCode::ACCEPTED, "{}", w.body);
    let b = call(
        router,
        "POST",
        "/v1/blobs",
        Some(ACME),
        &[("content-type", "text/plain")],
        Some(Body::from("acme's bytes")),
    )
    .await;
    assert_eq!(b.status, StatusCode::CREATED, "{}", b.body);
    Owned {
        session: s.body["id"].as_str().unwrap().into(),
        task: t.body["task_id"].as_str().unwrap().into(),
        workflow: w.body["workflow_id"].as_str().unwrap().into(),
        blob: b.body["hash"].as_str().unwrap().into(),
    }
}

/// Statuses a route answers its own tenant and another tenant, with the
/// body each sends.
struct Expect {
    own: u16,
    other: u16,
    body: fn() -> (Option<Value>, Option<&'static str>),
}

fn none() -> (Option<Value>, Option<&'static str>) {
    (None, None)
}

/// The isolation matrix: one entry per route of the router. A route added
/// without an entry here fails the test.
fn matrix() -> HashMap<(&'static str, &'static str), Expect> {
    let e = |own, other, body| Expect { own, other, body };
    HashMap::from([
        (("POST", "/v1/sessions"), e(201, 201, none as fn() -> _)),
        (("GET", "/v1/sessions/{id}"), e(200, 404, none)),
        (
            ("POST", "/v1/sessions/{id}/messages"),
            e(202, 404, || (Some(json!({"content": "hi"})), None)),
        ),
        (("GET", "/v1/sessions/{id}/events"), e(200, 404, none)),
        (("POST", "/v1/sessions/{id}/tickets"), e(201, 404, none)),
        // No call of the owner's session waits: 404 for the owner too.
        (
            ("POST", "/v1/sessions/{id}/approvals/{call}"),
            e(404, 404, || (Some(json!({"approve": true})), None)),
        ),
        (
            ("POST", "/v1/tasks"),
            e(202, 202, || (Some(json!({"prompt": "q"})), None)),
        ),
        (("GET", "/v1/tasks/{id}"), e(200, 404, none)),
        (("DELETE", "/v1/tasks/{id}"), e(200, 404, none)),
        (
            ("POST", "/v1/workflows"),
            e(202, 202, || {
                (Some(json!({"definition": "review", "input": {}})), None)
            }),
        ),
        (("GET", "/v1/workflows/{id}"), e(200, 404, none)),
        (
            ("POST", "/v1/workflows/{id}/signals/{name}"),
            e(202, 404, none),
        ),
        (
            ("POST", "/v1/blobs"),
            e(201, 201, || (None, Some("other bytes"))),
        ),
        (("GET", "/v1/blobs/{hash}"), e(200, 404, none)),
        (("GET", "/v1/gpus"), e(200, 200, none)),
        (("GET", "/v1/usage"), e(200, 200, none)),
        (("GET", "/metrics"), e(200, 200, none)),
        (("GET", "/healthz"), e(200, 200, none)),
        (("GET", "/readyz"), e(200, 200, none)),
    ])
}

fn concrete(path: &str, o: &Owned) -> String {
    let id = if path.starts_with("/v1/sessions") {
        &o.session
    } else if path.starts_with("/v1/tasks") {
        &o.task
    } else {
        &o.workflow
    };
    path.replace("{id}", id)
        .replace("{name}", "approve")
        .replace("{call}", "call-1-refund")
        .replace("{hash}", &o.blob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_keeps_tenants_apart_and_refuses_missing_and_bad_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&config(dir.path())).await;
    let router = gw.router();
    let owned = acme_resources(&router).await;
    let matrix = matrix();
    let table = routes();
    assert!(table.len() >= 17, "{table:?}");
    for route in &table {
        let key = (route.method, route.path);
        let expect = matrix.get(&key).unwrap_or_else(|| {
            panic!(
                "route {} {} has no entry in the isolation matrix",
                route.method, route.path
            )
        });
        let path = concrete(route.path, &owned);
        let what = format!("{} {path}", route.method);
        let send = |token: Option<&'static str>| {
            let (json, raw) = (expect.body)();
            let (headers, body): (Vec<(&str, &str)>, _) = match (json, raw) {
                (Some(v), _) => (vec![JSON], json_body(v)),
                (None, Some(text)) => {
                    (vec![("content-type", "text/plain")], Some(Body::from(text)))
                }
                (None, None) => (vec![], None),
            };
            let (router, path) = (router.clone(), path.clone());
            async move { call(&router, route.method, &path, token, &headers, body).await }
        };
        if route.access == Access::Tenant {
            let r = send(None).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what} without a token");
            assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="troupe""#);
            assert_error_form(&r, &what);
            let r = send(Some("not-a-tenant-token-0123456789abcdef")).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{what} with a bad token"
            );
            assert!(
                r.headers["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .contains("invalid_token")
            );
            assert_error_form(&r, &what);
        }
        let r = send(Some(GLOBEX)).await;
        assert_eq!(
            r.status.as_u16(),
            expect.other,
            "{what} by another tenant: {}",
            r.body
        );
        assert_error_form(&r, &what);
        // The signal waits for the draft step: 409 until it does.
        let mut r = send(Some(ACME)).await;
        for _ in 0..2_000 {
            if r.status != StatusCode::CONFLICT || !route.path.contains("signals") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            r = send(Some(ACME)).await;
        }
        assert_eq!(
            r.status.as_u16(),
            expect.own,
            "{what} by its tenant: {}",
            r.body
        );
        assert_error_form(&r, &what);
    }
    assert_eq!(
        matrix.len(),
        table.len(),
        "entries for routes that are gone"
    );
    gw.shutdown();
    gw.troupe().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_are_json_with_request_ids_and_authentication_follows_rfc_9110() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&config(dir.path())).await;
    let router = gw.router();
    let sid = call(&router, "POST", "/v1/sessions", Some(ACME), &[], None)
        .await
        .body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The framework's own rejections, rewritten.
    let r = call(&router, "PUT", "/v1/tasks", Some(ACME), &[], None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.body["error"]["code"], "method_not_allowed");
    assert!(r.headers["allow"].to_str().unwrap().contains("POST"));
    assert_error_form(&r, "PUT /v1/tasks");
    let events = format!("/v1/sessions/{sid}/events");
    let r = call(
        &router,
        "GET",
        &format!("{events}?after=abc"),
        Some(ACME),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_error_form(&r, "a malformed query");
    // The largest sequence is a valid place to resume from.
    let r = call(
        &router,
        "GET",
        &format!("{events}?after=18446744073709551615"),
        Some(ACME),
        &[],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let big = "x".repeat(70 * 1024);
    let r = call(
        &router,
        "POST",
        "/v1/sessions",
        Some(ACME),
        &[JSON],
        Some(Body::from(big)),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error_form(&r, "a body over the limit");
    let r = call(
        &router,
        "POST",
        "/v1/tasks",
        Some(ACME),
        &[],
        Some(Body::from("{}")),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_error_form(&r, "no content type");
    let r = call(&router, "GET", "/v2/nothing", Some(ACME), &[], None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_error_form(&r, "an unknown route");
    // A plain request id is kept; any other is replaced.
    let r = call(
        &router,
        "GET",
        "/v1/tasks/nope",
        Some(ACME),
        &[("x-request-id", "abc-123")],
        None,
    )
    .await;
    assert_eq!(r.headers["x-request-id"], "abc-123");
    assert_eq!(r.body["error"]["request_id"], "abc-123");
    let r = call(
        &router,
        "GET",
        "/v1/tasks/nope",
        Some(ACME),
        &[("x-request-id", "two words")],
        None,
    )
    .await;
    assert_ne!(r.headers["x-request-id"], "two words");
    assert_error_form(&r, "a replaced id");
    // RFC 9110: the scheme is case-insensitive; another scheme is no token.
    let lower = format!("bearer  {ACME}");
    let r = call(
        &router,
        "GET",
        "/v1/gpus",
        None,
        &[("authorization", &lower)],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = call(
        &router,
        "GET",
        "/v1/gpus",
        None,
        &[("authorization", "Basic YTpi")],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.body["error"]["code"], "unauthorized");
    // Hosts and origins: a page elsewhere, or a rebound name, is refused.
    let r = call(
        &router,
        "GET",
        "/healthz",
        None,
        &[("host", "evil.example")],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_error_form(&r, "a foreign host");
    let r = call(
        &router,
        "GET",
        "/healthz",
        None,
        &[("host", "localhost:8080"), ("host", "evil.example")],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "two Host headers");
    let r = call(
        &router,
        "GET",
        "/v1/gpus",
        Some(ACME),
        &[("origin", "https://evil.example")],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_error_form(&r, "a foreign origin");
    let r = call(
        &router,
        "GET",
        "/v1/gpus",
        Some(ACME),
        &[("origin", APP)],
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["access-control-allow-origin"], APP);
    let r = call(
        &router,
        "OPTIONS",
        "/v1/tasks",
        None,
        &[
            ("origin", APP),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization,idempotency-key",
            ),
        ],
        None,
    )
    .await;
    assert!(r.status.is_success(), "preflight: {}", r.status);
    assert_eq!(r.headers["access-control-allow-origin"], APP);
    // A stream ticket opens one stream once, without a bearer token.
    let t = call(
        &router,
        "POST",
        &format!("/v1/sessions/{sid}/tickets"),
        Some(ACME),
        &[],
        None,
    )
    .await;
    assert_eq!(t.status, StatusCode::CREATED, "{}", t.body);
    let url = t.body["events"].as_str().unwrap().to_owned();
    assert_eq!(
        call(&router, "GET", &url, None, &[], None).await.status,
        StatusCode::OK
    );
    let again = call(&router, "GET", &url, None, &[], None).await;
    assert_eq!(
        again.status,
        StatusCode::UNAUTHORIZED,
        "a ticket is used once"
    );
    gw.shutdown();
    gw.troupe().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_gets_of_unknown_ids_activate_no_entity() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&config(dir.path())).await;
    let router = gw.router();
    let n = 100_000;
    let statuses = futures::stream::iter(0..n)
        .map(|i| {
            let router = router.clone();
            async move {
                let path = if i % 2 == 0 {
                    format!("/v1/sessions/{:032x}", rand::random::<u128>())
                } else {
                    format!("/v1/tasks/{:024x}", rand::random::<u128>() >> 32)
                };
                call(&router, "GET", &path, Some(ACME), &[], None)
                    .await
                    .status
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    assert!(statuses.iter().all(|s| *s == StatusCode::NOT_FOUND));
    assert_eq!(gw.troupe().sessions().active_count(), 0);
    assert_eq!(gw.tasks().active_count(), 0);
    // Real ones still answer.
    let s = call(&router, "POST", "/v1/sessions", Some(ACME), &[], None).await;
    assert_eq!(s.status, StatusCode::CREATED);
    gw.shutdown();
    gw.troupe().shutdown().await.unwrap();
}

async fn task_ids(gw: &Gateway) -> usize {
    let after = troupe_journal::PersistenceId::new("task", "\u{1}").unwrap();
    gw.troupe()
        .journal()
        .persistence_ids(Some(&after), 10_000)
        .await
        .unwrap()
        .iter()
        .filter(|p| p.kind() == "task")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_makes_one_task_and_one_workflow_with_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&config(dir.path())).await;
    let router = gw.router();
    let before = task_ids(&gw).await;
    let post = |key: &'static str, prompt: &'static str| {
        let router = router.clone();
        async move {
            call(
                &router,
                "POST",
                "/v1/tasks",
                Some(ACME),
                &[JSON, ("idempotency-key", key)],
                json_body(json!({"prompt": prompt})),
            )
            .await
        }
    };
    let first = post("order-17", "summarize").await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
    let again = post("order-17", "summarize").await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    assert_eq!(again.body, first.body, "a retry gets the first answer");
    assert_eq!(again.headers["location"], first.headers["location"]);
    let other = post("order-17", "something else").await;
    assert_eq!(
        other.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        other.body
    );
    // Concurrent retries of one request: one task.
    let racing = futures::future::join_all((0..8).map(|_| post("order-18", "race"))).await;
    let ids: std::collections::HashSet<_> = racing
        .iter()
        .map(|r| {
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
            r.body["task_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(task_ids(&gw).await, before + 2, "two keys, two tasks");
    // Another tenant's key of the same name is its own.
    let globex = call(
        &router,
        "POST",
        "/v1/tasks",
        Some(GLOBEX),
        &[JSON, ("idempotency-key", "order-17")],
        json_body(json!({"prompt": "summarize"})),
    )
    .await;
    assert_eq!(globex.status, StatusCode::ACCEPTED);
    assert_ne!(globex.body["task_id"], first.body["task_id"]);
    // Workflows.
    let start = |input: Value| {
        let router = router.clone();
        async move {
            call(
                &router,
                "POST",
                "/v1/workflows",
                Some(ACME),
                &[JSON, ("idempotency-key", "wf-1")],
                json_body(json!({"definition": "review", "input": input})),
            )
            .await
        }
    };
    let w1 = start(json!({"topic": "a"})).await;
    assert_eq!(w1.status, StatusCode::ACCEPTED, "{}", w1.body);
    let w2 = start(json!({"topic": "a"})).await;
    assert_eq!(w2.body, w1.body);
    let w3 = start(json!({"topic": "b"})).await;
    assert_eq!(w3.status, StatusCode::UNPROCESSABLE_ENTITY);
    let bad = call(
        &router,
        "POST",
        "/v1/tasks",
        Some(ACME),
        &[JSON, ("idempotency-key", "")],
        json_body(json!({"prompt": "x"})),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    gw.shutdown();
    gw.troupe().shutdown().await.unwrap();
}

/// `GET /v1/usage` of `token`.
async fn usage(router: &Router, token: &str) -> Value {
    let r = call(router, "GET", "/v1/usage", Some(token), &[], None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body
}

/// Polls `GET /v1/usage` until `what.used` is `n` (each poll waits 5 ms;
/// at most 4,000 polls).
async fn wait_usage(router: &Router, token: &str, what: &str, n: u64) {
    for _ in 0..4_000 {
        if usage(router, token).await[what]["used"] == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{what} never reached {n}: {}", usage(router, token).await);
}

/// Starts a `review` workflow for `token`'s tenant.
async fn start_review(router: &Router, token: &str) -> Reply {
    call(
        router,
        "POST",
        "/v1/workflows",
        Some(token),
        &[JSON],
        json_body(json!({"definition": "review", "input": {"topic": "t"}})),
    )
    .await
}

async fn upload(router: &Router, token: &str, body: Body) -> Reply {
    call(
        router,
        "POST",
        "/v1/blobs",
        Some(token),
        &[("content-type", "application/octet-stream")],
        Some(body),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_has_its_own_share_of_blob_bytes_uploads_and_workflows() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.tenants[0].quota.max_blob_bytes = 100;
    c.tenants[0].quota.max_uploads = 1;
    c.tenants[0].quota.max_workflows = 2;
    if let Some(s) = c.storage.as_mut() {
        s.blobs.gc_grace_s = 0;
    }
    let gw = gateway(&c).await;
    let router = gw.router();

    // One upload in flight at a time: the second waits for none, it is refused.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Vec<u8>, std::io::Error>>();
    tx.unbounded_send(Ok(vec![1u8; 10])).unwrap();
    let slow = {
        let router = router.clone();
        tokio::spawn(async move { upload(&router, ACME, Body::from_stream(rx)).await })
    };
    wait_usage(&router, ACME, "uploads", 1).await;
    let refused = upload(&router, ACME, Body::from("x")).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.body
    );
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quota.max_uploads")
    );
    assert_error_form(&refused, "a second upload");
    // Another tenant is not held up by it.
    let other = upload(&router, GLOBEX, Body::from("globex")).await;
    assert_eq!(other.status, StatusCode::CREATED, "{}", other.body);
    drop(tx);
    let slow = slow.await.unwrap();
    assert_eq!(slow.status, StatusCode::CREATED, "{}", slow.body);
    assert_eq!(usage(&router, ACME).await["blob_bytes"]["used"], 10);

    // Bytes: 100 for acme. The same bytes again are counted once (an
    // upload needs room for its bytes while they stream, whatever they
    // turn out to be).
    let thirty = upload(&router, ACME, Body::from(vec![3u8; 30])).await;
    assert_eq!(thirty.status, StatusCode::CREATED, "{}", thirty.body);
    let again = upload(&router, ACME, Body::from(vec![3u8; 30])).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert_eq!(usage(&router, ACME).await["blob_bytes"]["used"], 40);
    // Streamed without a length past the quota: cut as it passes, and
    // nothing is charged.
    let streamed = Body::from_stream(futures::stream::iter(
        (0..4).map(|_| Ok::<_, std::io::Error>(vec![2u8; 20])),
    ));
    let r = upload(&router, ACME, streamed).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "quota_exceeded");
    assert_error_form(&r, "a streamed upload past the quota");
    assert_eq!(usage(&router, ACME).await["blob_bytes"]["used"], 40);
    let sixty = vec![7u8; 60];
    let a = upload(&router, ACME, Body::from(sixty.clone())).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(usage(&router, ACME).await["blob_bytes"]["used"], 100);
    // Full: refused before a byte is read.
    let r = upload(&router, ACME, Body::from(vec![1u8; 1])).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quota.max_blob_bytes")
    );
    assert_eq!(usage(&router, ACME).await["blob_bytes"]["used"], 100);
    // Another tenant storing the same bytes is charged for them too; the
    // bytes are stored once.
    let theirs = upload(&router, GLOBEX, Body::from(sixty)).await;
    assert_eq!(theirs.status, StatusCode::CREATED);
    assert_eq!(theirs.body["hash"], a.body["hash"]);
    assert_eq!(usage(&router, GLOBEX).await["blob_bytes"]["used"], 66);
    // Blobs nothing refers to are collected (grace 0 here): acme's share
    // is free again, found out at its next upload.
    let tiers = gw.troupe().tiered().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let report = tiers.collect_blobs(now + 1_000).await.unwrap();
    assert!(report.collected >= 4, "{report:?}");
    let after = upload(&router, ACME, Body::from(vec![4u8; 90])).await;
    assert_eq!(after.status, StatusCode::CREATED, "{}", after.body);
    assert_eq!(usage(&router, ACME).await["blob_bytes"]["used"], 90);

    // Workflows: two running for acme (each waits for its approval).
    let w1 = start_review(&router, ACME).await;
    assert_eq!(w1.status, StatusCode::ACCEPTED, "{}", w1.body);
    assert_eq!(
        start_review(&router, ACME).await.status,
        StatusCode::ACCEPTED
    );
    let third = start_review(&router, ACME).await;
    assert_eq!(
        third.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        third.body
    );
    assert!(
        third.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quota.max_workflows")
    );
    assert_eq!(
        start_review(&router, GLOBEX).await.status,
        StatusCode::ACCEPTED,
        "globex has its own"
    );
    // One ends: its place is free.
    let id = w1.body["workflow_id"].as_str().unwrap().to_owned();
    let signal = format!("/v1/workflows/{id}/signals/approve");
    let mut r = call(&router, "POST", &signal, Some(ACME), &[], None).await;
    for _ in 0..4_000 {
        if r.status != StatusCode::CONFLICT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        r = call(&router, "POST", &signal, Some(ACME), &[], None).await;
    }
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    wait_usage(&router, ACME, "workflows", 1).await;
    assert_eq!(
        start_review(&router, ACME).await.status,
        StatusCode::ACCEPTED
    );
    let u = usage(&router, ACME).await;
    assert_eq!(u["workflows"], json!({"used": 2, "max": 2}), "{u}");
    assert_eq!(u["tenant"], "acme");
    gw.shutdown();
    gw.troupe().shutdown().await.unwrap();
    drop((router, gw));
    // After a restart, the workflows it resumed count against their tenant.
    let gw = gateway(&c).await;
    let router = gw.router();
    assert_eq!(usage(&router, ACME).await["workflows"]["used"], 2);
    assert_eq!(usage(&router, GLOBEX).await["workflows"]["used"], 1);
    assert_eq!(
        start_review(&router, ACME).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // The blobs' shares are read back from the owner records.
    assert_eq!(usage(&router, ACME).await["blob_bytes"]["used"], 90);
    gw.shutdown();
    gw.troupe().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_again_with_its_idempotency_key_posts_one_turn_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let send = |router: Router, session: String, key: &'static str, content: &'static str| async move {
        call(
            &router,
            "POST",
            &format!("/v1/sessions/{session}/messages"),
            Some(ACME),
            &[JSON, ("idempotency-key", key)],
            json_body(json!({ "content": content })),
        )
        .await
    };
    let (session, first) = {
        let gw = gateway(&c).await;
        let router = gw.router();
        // A session opened with a key: a retry opens the same one.
        let open = |token| {
            let router = router.clone();
            async move {
                call(
                    &router,
                    "POST",
                    "/v1/sessions",
                    Some(token),
                    &[("idempotency-key", "s-1")],
                    None,
                )
                .await
            }
        };
        let s = open(ACME).await;
        assert_eq!(s.status, StatusCode::CREATED, "{}", s.body);
        let session = s.body["id"].as_str().unwrap().to_owned();
        assert_eq!(session.len(), 32);
        assert_eq!(open(ACME).await.body, s.body);
        assert_ne!(open(GLOBEX).await.body["id"], s.body["id"]);
        let first = send(router.clone(), session.clone(), "m-1", "where is order 17?").await;
        assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.body);
        // At once (the turn may still run), and concurrently: the first answer.
        let again = futures::future::join_all(
            (0..4).map(|_| send(router.clone(), session.clone(), "m-1", "where is order 17?")),
        )
        .await;
        for r in &again {
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
            assert_eq!(r.body, first.body);
        }
        // The same key with another message.
        let other = send(router.clone(), session.clone(), "m-1", "and order 18?").await;
        assert_eq!(
            other.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            other.body
        );
        // After the turn has ended: still the first answer.
        let task = first.body["task_id"].as_str().unwrap();
        for _ in 0..4_000 {
            let t = call(
                &router,
                "GET",
                &format!("/v1/tasks/{task}"),
                Some(ACME),
                &[],
                None,
            )
            .await;
            if t.body["state"]["status"] == "succeeded" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let late = send(router.clone(), session.clone(), "m-1", "where is order 17?").await;
        assert_eq!(late.body, first.body);
        // Another tenant's key of the same name does not reach this session.
        let globex = call(
            &router,
            "POST",
            &format!("/v1/sessions/{session}/messages"),
            Some(GLOBEX),
            &[JSON, ("idempotency-key", "m-1")],
            json_body(json!({ "content": "where is order 17?" })),
        )
        .await;
        assert_eq!(globex.status, StatusCode::NOT_FOUND);
        assert!(gw.tasks().active_count() > 0);
        gw.shutdown();
        gw.troupe().shutdown().await.unwrap();
        // The system's shutdown passivated the task entities too: none
        // holds the journal, which the restart below opens again.
        assert_eq!(gw.tasks().active_count(), 0);
        (session, first)
    };
    // A restart: the key is in the journal.
    let gw = gateway(&c).await;
    let router = gw.router();
    let r = send(router.clone(), session.clone(), "m-1", "where is order 17?").await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    assert_eq!(r.body, first.body);
    let next = send(router.clone(), session.clone(), "m-2", "thanks").await;
    assert_eq!(next.status, StatusCode::ACCEPTED, "{}", next.body);
    assert_eq!(next.body["turn"], 2);
    let view = call(
        &router,
        "GET",
        &format!("/v1/sessions/{session}"),
        Some(ACME),
        &[],
        None,
    )
    .await;
    assert_eq!(view.body["turns"], 2, "{}", view.body);
    gw.shutdown();
    gw.troupe().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_with_a_token_are_only_for_its_bearer() {
    const SCRAPER: &str = "scraper-token-0123456789abcdef-0123";
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.http.metrics_token = Some("too-short".into());
    assert!(matches!(
        c.validate(),
        Err(troupe_gateway::GatewayError::Config(m)) if m.contains("http.metrics_token")
    ));
    c.http.metrics_token = Some(SCRAPER.into());
    let gw = gateway(&c).await;
    let router = gw.router();
    let r = call(&router, "GET", "/metrics", None, &[], None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers["www-authenticate"], r#"Bearer realm="troupe""#);
    assert_error_form(&r, "/metrics without a token");
    // A tenant's token does not open it.
    let r = call(&router, "GET", "/metrics", Some(ACME), &[], None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(
        r.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    let r = call(&router, "GET", "/metrics", Some(SCRAPER), &[], None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.as_str().unwrap().contains("# HELP troupe_gateway"));
    // The scraper's token is nobody's tenant token.
    let r = call(&router, "GET", "/v1/usage", Some(SCRAPER), &[], None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    gw.shutdown();
    gw.troupe().shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_concurrent_signals_one_is_delivered_and_the_other_refused() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&config(dir.path())).await;
    let router = gw.router();
    for round in 0..5 {
        let w = call(
            &router,
            "POST",
            "/v1/workflows",
            Some(ACME),
            &[JSON],
            json_body(json!({"definition": "review", "input": {"topic": round}})),
        )
        .await;
        let id = w.body["workflow_id"].as_str().unwrap().to_owned();
        let path = format!("/v1/workflows/{id}/signals/approve");
        // Wait for the approval step (409 until the draft is done).
        for _ in 0..2_000 {
            let status = call(
                &router,
                "GET",
                &format!("/v1/workflows/{id}"),
                Some(ACME),
                &[],
                None,
            )
            .await
            .body["steps"][1]["state"]
                .clone();
            if status.get("Running").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (a, b) = tokio::join!(
            call(&router, "POST", &path, Some(ACME), &[], None),
            call(&router, "POST", &path, Some(ACME), &[], None)
        );
        let mut got = [a.status.as_u16(), b.status.as_u16()];
        got.sort();
        assert_eq!(got, [202, 409], "round {round}: {} / {}", a.body, b.body);
    }
    gw.shutdown();
    gw.troupe().shutdown().await.unwrap();
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_owned()),
        Just("POST".to_owned()),
        Just("DELETE".to_owned()),
        Just("PUT".to_owned()),
        Just("PATCH".to_owned()),
        Just("HEAD".to_owned()),
        Just("OPTIONS".to_owned()),
        "[A-Z]{1,8}",
    ]
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("v1".to_owned()),
        Just("sessions".to_owned()),
        Just("tasks".to_owned()),
        Just("workflows".to_owned()),
        Just("signals".to_owned()),
        Just("blobs".to_owned()),
        Just("events".to_owned()),
        Just("messages".to_owned()),
        Just("tickets".to_owned()),
        Just("%00".to_owned()),
        Just("%ff%fe".to_owned()),
        Just("..".to_owned()),
        "[0-9a-f]{0,40}",
        "[a-zA-Z0-9._~%-]{0,24}",
    ]
}

fn query() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("?after=18446744073709551615".to_owned()),
        Just("?after=-1".to_owned()),
        Just("?ticket=".to_owned()),
        "\\?[a-z]{1,6}=[a-zA-Z0-9%]{0,12}",
    ]
}

fn header() -> impl Strategy<Value = (String, String)> {
    let name = prop_oneof![
        Just("authorization".to_owned()),
        Just("content-type".to_owned()),
        Just("last-event-id".to_owned()),
        Just("idempotency-key".to_owned()),
        Just("origin".to_owned()),
        Just("x-request-id".to_owned()),
        Just("content-length".to_owned()),
        "[a-z-]{1,12}",
    ];
    let value = prop_oneof![
        Just(format!("Bearer {ACME}")),
        Just("Bearer".to_owned()),
        Just("application/json".to_owned()),
        "[ -~]{0,40}",
    ];
    (name, value)
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(br#"{"prompt":"x"}"#.to_vec()),
        Just(br#"{"content":"hi","attachments":[{"hash":"00","size":1}]}"#.to_vec()),
        Just(br#"{"definition":"review","input":null}"#.to_vec()),
        Just(br#"{"prompt":"x","priority":255,"max_tokens":4294967295}"#.to_vec()),
        proptest::collection::vec(any::<u8>(), 0..512),
    ]
}

#[test]
fn arbitrary_requests_never_panic_and_always_answer_in_the_documented_form() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = rt.block_on(gateway(&config(dir.path())));
    let router = gw.router();
    let sid = rt.block_on(async {
        call(&router, "POST", "/v1/sessions", Some(ACME), &[], None)
            .await
            .body["id"]
            .as_str()
            .unwrap()
            .to_owned()
    });
    let cases = proptest::test_runner::Config {
        cases: 512,
        failure_persistence: None,
        ..Default::default()
    };
    proptest!(cases, |(
        method in method(),
        segments in proptest::collection::vec(segment(), 0..6),
        own_session in any::<bool>(),
        query in query(),
        headers in proptest::collection::vec(header(), 0..5),
        body in body(),
    )| {
        let mut path = String::new();
        for (i, s) in segments.iter().enumerate() {
            path.push('/');
            path.push_str(if own_session && i == 2 { &sid } else { s });
        }
        if path.is_empty() {
            path.push('/');
        }
        path.push_str(&query);
        let Ok(uri) = path.parse::<axum::http::Uri>() else { return Ok(()) };
        let mut req = Request::builder().method(method.as_str()).uri(uri).header("host", "127.0.0.1");
        for (k, v) in &headers {
            if let (Ok(k), Ok(v)) = (
                axum::http::HeaderName::from_bytes(k.as_bytes()),
                axum::http::HeaderValue::from_str(v),
            ) {
                req = req.header(k, v);
            }
        }
        let Ok(req) = req.body(Body::from(body)) else { return Ok(()) };
        let r = rt.block_on(async {
            let resp = tokio::time::timeout(Duration::from_secs(20), router.clone().oneshot(req))
                .await
                .expect("every request is answered")
                .unwrap();
            let (status, headers) = (resp.status(), resp.headers().clone());
            let body = if headers.get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream")) {
                Value::Null
            } else {
                let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
                serde_json::from_slice(&bytes).unwrap_or(Value::Null)
            };
            Reply { status, headers, body }
        });
        prop_assert!(r.status != StatusCode::INTERNAL_SERVER_ERROR, "{} {path}: {}", method, r.body);
        if method != "HEAD" {
            assert_error_form(&r, &format!("{method} {path}"));
        }
    });
    rt.block_on(async {
        gw.shutdown();
        gw.troupe().shutdown().await.unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_at_the_header_time_out_while_healthz_answers() {
    troupe_gateway::fit_open_files(3_000);
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.http.header_read_timeout_ms = 2_000;
    let server = Server::start(c).await.unwrap();
    let addr = server.addr();
    let n = 500;
    let closed = Arc::new(AtomicUsize::new(0));
    let mut slow = Vec::new();
    for _ in 0..n {
        let closed = closed.clone();
        slow.push(std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
            let mut buf = [0u8; 256];
            // One byte a second, for at most 60 s (the header time-out is 2 s).
            for i in 0..60 {
                let byte = head.get(i).copied().unwrap_or(b'a');
                if s.write_all(&[byte]).is_err() {
                    closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                match s.read(&mut buf) {
                    Ok(0) => {
                        closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    Ok(_) => panic!("a request without its headers was answered"),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => {
                        closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
        }));
    }
    // Meanwhile, others are served.
    let http = reqwest::Client::new();
    for _ in 0..5 {
        let r = http
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::task::spawn_blocking(move || {
        for t in slow {
            t.join().unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(
        closed.load(Ordering::SeqCst),
        n,
        "every slow connection was closed by the server"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stop_reading_are_cut_off_at_the_write_time_out() {
    troupe_gateway::fit_open_files(3_000);
    // A route that streams forever, and counts the streams dropped.
    let dropped = Arc::new(AtomicUsize::new(0));
    struct Count(Arc<AtomicUsize>);
    impl Drop for Count {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let d = dropped.clone();
    let app = Router::new()
        .route(
            "/flood",
            axum::routing::get(move || {
                let guard = Count(d.clone());
                async move {
                    let chunks = futures::stream::repeat_with(move || {
                        let _g = &guard;
                        Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 64 * 1024]))
                    });
                    Body::from_stream(chunks)
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = troupe_gateway::ServeLimits {
        write_timeout: Duration::from_millis(500),
        ..troupe_gateway::ServeLimits::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(troupe_gateway::serve(listener, app, limits, async move {
        let _ = stopped.await;
    }));
    let n = 200;
    let mut stalled = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4 * 1024).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        stalled.push(s); // never read
    }
    let http = reqwest::Client::new();
    let r = http
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "served while 200 clients stall");
    // Bounded wait (a liveness check, not a timing one).
    for _ in 0..600 {
        if dropped.load(Ordering::SeqCst) == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        dropped.load(Ordering::SeqCst),
        n,
        "every stalled stream was cut"
    );
    drop(stalled);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// Sessions with enough journaled text that a catch-up fills any socket
/// buffer: `turns` messages of 30 KiB each.
async fn long_session(http: &reqwest::Client, base: &str, turns: usize) -> String {
    let s: Value = http
        .post(format!("{base}/v1/sessions"))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = s["id"].as_str().unwrap().to_owned();
    let text = "long history ".repeat(30 * 1024 / 13);
    for _ in 0..turns {
        // 409 while the previous turn is answered: wait for it.
        for _ in 0..2_000 {
            let r = http
                .post(format!("{base}/v1/sessions/{sid}/messages"))
                .bearer_auth(ACME)
                .json(&json!({ "content": text }))
                .send()
                .await
                .unwrap();
            if r.status() == StatusCode::ACCEPTED {
                break;
            }
            assert_eq!(r.status(), StatusCode::CONFLICT);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    sid
}

/// 200 event-stream clients that stop reading during their catch-up: the
/// server keeps serving others, the journal's pool is not exhausted (on
/// PostgreSQL), and every stalled stream is ended by the write time-out.
async fn stalled_catch_up(mut c: GatewayConfig) {
    troupe_gateway::fit_open_files(3_000);
    c.http.write_timeout_ms = 500;
    // Less than the catch-up (24 messages of 30 KiB), so writes block.
    c.http.send_buffer_bytes = Some(64 * 1024);
    c.tenants[0].quota.max_streams = 1_000;
    c.http.streams_per_session = 1_000;
    let server = Server::start(c).await.unwrap();
    let base = format!("http://{}", server.addr());
    let http = reqwest::Client::new();
    let sid = long_session(&http, &base, 24).await;
    let n = 200;
    let mut stalled = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4 * 1024).unwrap();
        let mut s = socket.connect(server.addr()).await.unwrap();
        let req = format!(
            "GET /v1/sessions/{sid}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ACME}\r\n\r\n"
        );
        tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
            .await
            .unwrap();
        stalled.push(s); // never read
    }
    // Others are served meanwhile, journal reads and writes included.
    let other = long_session(&http, &base, 1).await;
    let r = http
        .get(format!("{base}/v1/sessions/{other}"))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Every stalled stream ends (a liveness bound, not a timing one).
    let subscribed = || server.troupe().sessions().subscribed_count();
    for _ in 0..600 {
        if subscribed() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        subscribed(),
        0,
        "stalled streams were cut by the write time-out"
    );
    drop(stalled);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_stalled_in_catch_up_are_cut_on_rocksdb() {
    let dir = tempfile::tempdir().unwrap();
    stalled_catch_up(config(dir.path())).await;
}

/// Needs `TROUPE_PG_URL` (`make test` starts a throwaway PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_stalled_in_catch_up_are_cut_on_postgres() {
    let url = std::env::var("TROUPE_PG_URL").expect(
        "TROUPE_PG_URL is not set: `make test` starts a throwaway PostgreSQL; \
         by hand: TROUPE_PG_URL=$(scripts/pg.sh start) cargo test -p troupe_gateway",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.storage = None;
    c.postgres = Some(troupe_gateway::PostgresSection {
        url,
        schema: format!("stall_{:016x}", rand::random::<u64>()),
        pool_size: 4,
    });
    stalled_catch_up(c).await;
}

//! Tool approvals under SIGKILL, over HTTP: a child process serves the
//! gateway over a RocksDB journal; a turn waits for the approval of a call
//! (holding no GPU lease), another for one whose deadline is short; the
//! child is killed while both wait. After the restart the first call is
//! approved over `POST /v1/sessions/{id}/approvals/{call}` and runs, once
//! (its tool must not run twice, and it never started); a second decision
//! gets 409; the second call's deadline, passed while the process was
//! down, rejected it, and the model was told.

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use troupe::gateway::{Gateway, GatewayConfig, ServeLimits, Tenant, serve};
use troupe::gpu::probe::SimulatedProbe;
use troupe::prelude::*;
use troupe::testing::{Recorder, read_lines};

mod common;

const CHILD_DIR: &str = "TROUPE_APPROVAL_CHILD_DIR";
const TOKEN: &str = "acme-approval-token-0123456789abcdef";
/// How long the `wipe` call may wait.
const WIPE_DEADLINE: Duration = Duration::from_secs(2);

struct Desk;

impl Agent for Desk {
    type State = ();
}

const DESK: AgentKey<Desk> = AgentKey::new("desk");

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct Order {
    order: u32,
}

/// A tool that records each run outside the process.
fn tool(name: &'static str, recorder: Recorder) -> Tool {
    Tool::new(name, "Does its job", move |o: Order| {
        let recorder = recorder.clone();
        async move {
            recorder
                .record(&format!("{name} {}", o.order))
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(json!({ "tool": name, "order": o.order, "done": true }))
        }
    })
}

/// The child: the gateway over a durable system, until it is killed.
#[test]
#[ignore = "the child process of an_approval_waits_through_sigkill_and_applies_after_the_restart"]
fn approval_child() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = std::path::PathBuf::from(dir);
        let recorder = Recorder::open(dir.join("runs")).expect("recorder");
        let tools = Tools::new()
            .with(
                tool("refund", recorder.clone())
                    .at_most_once()
                    .needs_approval(Duration::from_secs(600)),
            )
            .with(tool("wipe", recorder).needs_approval(WIPE_DEADLINE));
        let model = LocalBackend::default()
            .words(6, 1)
            .call_tool_when("refund", "refund", json!({"order": 7}))
            .call_tool_when("wipe", "wipe", json!({"order": 8}));
        let troupe = Troupe::builder()
            .data_dir(dir.join("data"))
            .durability(Durability::Fsync)
            .gpus(Arc::new(SimulatedProbe::new(1, 16 << 30)))
            .backend(model)
            .agent(&DESK, Desk, AgentOptions::default().tools(tools))
            .build()
            .await
            .expect("troupe");
        let config = GatewayConfig {
            tenants: vec![Tenant::new("acme", TOKEN)],
            ..GatewayConfig::default()
        };
        let gateway = Gateway::new(Arc::new(troupe), config)
            .await
            .expect("gateway");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("PORT {}", listener.local_addr().unwrap().port());
        serve(
            listener,
            gateway.router(),
            ServeLimits::default(),
            std::future::pending(),
        )
        .await
        .expect("serve");
    });
}

/// Starts the child; returns it and its base URL.
fn start(dir: &std::path::Path) -> (common::Child, String) {
    let child = common::spawn("approval_child", &[(CHILD_DIR, dir.display().to_string())]);
    loop {
        match child.next_line(Duration::from_secs(120)) {
            Some(l) if l.starts_with("PORT ") => {
                let base = format!("http://127.0.0.1:{}", &l[5..]);
                return (child, base);
            }
            Some(_) => {}
            None => panic!("the child exited before it served"),
        }
    }
}

async fn call(method: &str, url: &str, body: Option<Value>) -> (StatusCode, Value) {
    let http = reqwest::Client::new();
    let mut req = http
        .request(method.parse().unwrap(), url)
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("the child answers");
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Reads the session until `call`'s approval is in it (the loop decides;
/// its cap only stops a broken build from hanging); returns it.
async fn approval(base: &str, session: &str, call_id: &str) -> Value {
    for _ in 0..20_000 {
        let (s, view) = call("GET", &format!("{base}/v1/sessions/{session}"), None).await;
        assert_eq!(s, StatusCode::OK, "{view}");
        let found = view["approvals"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["call_id"] == call_id).cloned());
        if let Some(a) = found {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("`{call_id}` of `{session}` never asked for approval");
}

/// Polls task `id` until it ends; returns its state.
async fn task_end(base: &str, id: &str) -> Value {
    for _ in 0..20_000 {
        let (_, t) = call("GET", &format!("{base}/v1/tasks/{id}"), None).await;
        let st = &t["state"]["status"];
        if st == "succeeded" || st == "failed" {
            return t["state"].clone();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("task `{id}` never ended");
}

async fn open(base: &str, text: &str) -> (String, String) {
    let (s, session) = call(
        "POST",
        &format!("{base}/v1/sessions"),
        Some(json!({"agent": "desk"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{session}");
    let id = session["id"].as_str().unwrap().to_owned();
    let (s, posted) = call(
        "POST",
        &format!("{base}/v1/sessions/{id}/messages"),
        Some(json!({ "content": text })),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{posted}");
    (id, posted["task_id"].as_str().unwrap().to_owned())
}

#[test]
fn an_approval_waits_through_sigkill_and_applies_after_the_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let (mut child, base) = start(dir.path());
    let (refund, refund_task, wipe, wipe_deadline) = rt.block_on(async {
        let (refund, refund_task) = open(&base, "please refund order 7").await;
        let (wipe, _) = open(&base, "please wipe order 8").await;
        let a = approval(&base, &refund, "call-1-refund").await;
        assert_eq!(a["tool"], "refund");
        assert!(a.get("decision").is_none(), "{a}");
        let w = approval(&base, &wipe, "call-1-wipe").await;
        // Both wait, and no GPU lease is held meanwhile.
        let (s, gpus) = call("GET", &format!("{base}/v1/gpus"), None).await;
        assert_eq!(s, StatusCode::OK);
        for d in gpus["devices"].as_array().unwrap() {
            assert_eq!(d["leased_memory_bytes"], 0, "{gpus}");
        }
        (
            refund,
            refund_task,
            wipe,
            w["deadline_ms"].as_u64().unwrap(),
        )
    });
    assert!(child.kill(), "the child was serving");
    child.finish();
    // Down until the wipe call's deadline has passed.
    while troupe::journal::now_ms() <= wipe_deadline {
        std::thread::sleep(Duration::from_millis(50));
    }

    let (mut child, base) = start(dir.path());
    rt.block_on(async {
        let url = format!("{base}/v1/sessions/{refund}/approvals/call-1-refund");
        let (s, decided) = call("POST", &url, Some(json!({"approve": true}))).await;
        assert_eq!(s, StatusCode::OK, "{decided}");
        assert_eq!(decided["approved"], true);
        assert_eq!(decided["by"], "acme");
        // The first decision stands.
        let (s, again) = call(
            "POST",
            &url,
            Some(json!({"approve": false, "reason": "no"})),
        )
        .await;
        assert!(
            s == StatusCode::CONFLICT || s == StatusCode::NOT_FOUND,
            "{s} {again}"
        );
        // The client's task, accepted before the kill, ends with the answer.
        let t = task_end(&base, &refund_task).await;
        assert_eq!(t["status"], "succeeded", "{t}");
        // Malformed decisions are typed 400s.
        let (s, bad) = call("POST", &url, Some(json!({"approve": "yes"}))).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");

        // Both turns end: read them from the sessions.
        for (session, call_id, ok) in [
            (&refund, "call-1-refund", true),
            (&wipe, "call-1-wipe", false),
        ] {
            let mut view = Value::Null;
            for _ in 0..20_000 {
                let (_, v) = call("GET", &format!("{base}/v1/sessions/{session}"), None).await;
                if v["completed"] == 1 || v["failed"] == 1 {
                    view = v;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            assert_eq!(view["completed"], 1, "{session}: {view}");
            let messages = view["messages"].as_array().unwrap();
            let result = messages
                .iter()
                .find(|m| m["tool_call_id"] == call_id)
                .unwrap_or_else(|| panic!("{call_id}'s result in {view}"));
            let content = result["content"].as_str().unwrap();
            if ok {
                assert!(content.contains(r#""tool":"refund""#), "{content}");
            } else {
                assert!(
                    content.contains("none came before its deadline"),
                    "{content}"
                );
            }
        }
        // After the restart, the wipe's late decision is refused.
        let url = format!("{base}/v1/sessions/{wipe}/approvals/call-1-wipe");
        let (s, _) = call("POST", &url, Some(json!({"approve": true}))).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "its turn has ended");
    });
    assert!(child.kill());
    child.finish();
    // The refund ran once, after its approval; the wipe never ran.
    let runs = read_lines(dir.path().join("runs")).expect("runs");
    assert_eq!(runs, ["refund 7"], "{runs:?}");
}

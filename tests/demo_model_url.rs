//! `make demo MODEL_URL=...`: the flagship's quick mode against an
//! OpenAI-compatible server started here, through the same `MODEL_URL`
//! setting a user gives it. The server speaks the OpenAI streaming chat
//! API (text deltas, tool calls, usage) and answers like the local model
//! would, so the whole desk (triage's routing tool call, the desks' tool
//! calls, the killed instance's second attempt) runs over HTTP.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::Response;
use serde_json::{Value, json};
use troupe::agent::{ChatMessage, ChatRequest, Chunk, Role, ToolCall, ToolSpec};
use troupe::prelude::*;

#[derive(Default)]
struct Server {
    requests: AtomicUsize,
    models: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// The local model's rules, as the example's own local models have them.
fn model() -> LocalBackend {
    LocalBackend::default()
        .call_tool_when("refund", "route_to", json!({"desk": "refunds"}))
        .call_tool_when("invoice", "route_to", json!({"desk": "billing"}))
        .call_tool_when("charge", "route_to", json!({"desk": "billing"}))
        .call_tool_when("router", "route_to", json!({"desk": "technical"}))
        .call_tool_when("refund", "refund_status", json!({"order": "A-1042"}))
        .call_tool_when("invoice", "lookup_invoice", json!({"invoice": 1042}))
        .call_tool_when("error", "run_diagnostics", json!({"device": "router"}))
}

/// The OpenAI request, as a `ChatRequest`.
fn request(body: &Value) -> ChatRequest {
    let messages = body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| {
                    let role = match m["role"].as_str().unwrap_or("user") {
                        "system" => Role::System,
                        "assistant" => Role::Assistant,
                        "tool" => Role::Tool,
                        _ => Role::User,
                    };
                    let tool_calls = m["tool_calls"]
                        .as_array()
                        .map(|calls| {
                            calls
                                .iter()
                                .map(|c| ToolCall {
                                    id: c["id"].as_str().unwrap_or_default().into(),
                                    name: c["function"]["name"].as_str().unwrap_or_default().into(),
                                    arguments: c["function"]["arguments"]
                                        .as_str()
                                        .unwrap_or_default()
                                        .into(),
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    ChatMessage {
                        role,
                        content: m["content"].as_str().unwrap_or_default().into(),
                        tool_calls,
                        tool_call_id: m["tool_call_id"].as_str().map(str::to_owned),
                        attachments: Vec::new(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let mut request = ChatRequest::new(body["model"].as_str().unwrap_or_default(), messages);
    request.tools = body["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .map(|t| ToolSpec {
                    name: t["function"]["name"].as_str().unwrap_or_default().into(),
                    description: String::new(),
                    parameters: t["function"]["parameters"].clone(),
                })
                .collect()
        })
        .unwrap_or_default();
    request
}

async fn completions(State(server): State<Arc<Server>>, Json(body): Json<Value>) -> Response {
    server.requests.fetch_add(1, Ordering::SeqCst);
    if let Some(m) = body["model"].as_str() {
        server.models.lock().unwrap().insert(m.to_owned());
    }
    let lines: Vec<String> = model()
        .reply(&request(&body))
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let choice = match chunk {
                Chunk::Text(t) => {
                    json!({"index": 0, "delta": {"content": t}, "finish_reason": null})
                }
                Chunk::ToolCall(c) => json!({"index": 0, "delta": {"tool_calls": [{
                    "index": i, "id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}}]},
                    "finish_reason": null}),
                Chunk::Done { finish_reason, .. } => {
                    json!({"index": 0, "delta": {}, "finish_reason": finish_reason})
                }
            };
            json!({"choices": [choice]}).to_string()
        })
        .chain(["[DONE]".to_owned()])
        .collect();
    let chunks: Vec<Result<Bytes, std::io::Error>> = lines
        .into_iter()
        .map(|l| Ok(Bytes::from(format!("data: {l}\n\n"))))
        .collect();
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .expect("response")
}

#[test]
fn the_flagship_runs_on_an_openai_compatible_server_given_by_model_url() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = Arc::new(Server::default());
    let addr = rt.block_on(async {
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(completions))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    });
    // The example's binary sits beside this test's, in `examples/`.
    let exe = std::env::current_exe().expect("test binary");
    let example = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory")
        .join("examples")
        .join("support_desk");
    assert!(
        example.exists(),
        "{} is built with the tests",
        example.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(&example)
        .args(["--quick", "--data-dir"])
        .arg(dir.path().join("desk"))
        .env("MODEL_URL", format!("http://{addr}/v1"))
        .env("MODEL", "test-model")
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("answered by test-model at http://{addr}/v1")),
        "{stdout}"
    );
    assert!(
        stdout.contains("questions answered             24  of 24"),
        "{stdout}"
    );
    // Every model call went to the server, under the model name given.
    let requests = server.requests.load(Ordering::SeqCst);
    assert!(requests >= 24 * 2, "{requests} requests");
    assert_eq!(
        server
            .models
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>(),
        ["test-model"]
    );
}

//! The OpenAI-compatible client against a real HTTP server on 127.0.0.1
//! that streams chunks, rate-limits with `Retry-After`, sends malformed
//! chunks and closes streams early.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use troupe_agent::{
    AgentError, AgentOptions, AgentSystem, ChatMessage, ChatRequest, Chunk, Inference,
    ModelBackend, OpenAiBackend, OpenAiConfig, SessionConfig, SessionEvent, Sessions, Tool, Tools,
};
use troupe_journal::InMemoryJournal;

#[derive(Default)]
struct Server {
    requests: AtomicUsize,
    rate_limited: AtomicUsize,
    last_body: std::sync::Mutex<Value>,
}

fn sse(lines: &[String]) -> Response {
    let chunks: Vec<Result<Bytes, std::io::Error>> = lines
        .iter()
        .map(|l| Ok(Bytes::from(format!("data: {l}\n\n"))))
        .collect();
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap()
}

fn delta(text: &str) -> String {
    json!({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
        .to_string()
}

fn finish(reason: &str) -> String {
    json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}],
           "usage": {"prompt_tokens": 5, "completion_tokens": 3}})
    .to_string()
}

async fn completions(
    State(server): State<Arc<Server>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    server.requests.fetch_add(1, Ordering::SeqCst);
    *server.last_body.lock().unwrap() = body.clone();
    assert_eq!(body["stream"], true);
    match body["model"].as_str().unwrap_or_default() {
        "ok" => {
            assert_eq!(
                headers.get("authorization").and_then(|v| v.to_str().ok()),
                Some("Bearer sk-test")
            );
            sse(&[
                delta("Hello"),
                delta(", "),
                delta("world"),
                finish("stop"),
                "[DONE]".into(),
            ])
        }
        "busy-then-ok" => {
            if server.rate_limited.fetch_add(1, Ordering::SeqCst) < 2 {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "0")],
                    Json(json!({"error": {"message": "slow down"}})),
                )
                    .into_response()
            } else {
                sse(&[delta("finally"), finish("stop"), "[DONE]".into()])
            }
        }
        "busy-for-long" => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "120")],
            Json(json!({"error": {"message": "quota exhausted"}})),
        )
            .into_response(),
        "always-503" => (StatusCode::SERVICE_UNAVAILABLE, "upstream down").into_response(),
        "bad-request" => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "max_tokens is too large: 99999", "type": "invalid_request_error"}})),
        )
            .into_response(),
        "vision" => sse(&[delta("a cat"), finish("stop"), "[DONE]".into()]),
        "malformed" => sse(&[delta("two "), delta("chunks"), "{not json".into()]),
        "cut" => sse(&[delta("half "), delta("a reply")]),
        "tools" => {
            let last = body["messages"].as_array().unwrap().last().unwrap().clone();
            if last["role"] == "tool" {
                sse(&[
                    delta(&format!("the invoice says {}", last["content"].as_str().unwrap())),
                    finish("stop"),
                    "[DONE]".into(),
                ])
            } else {
                let frag = |args: &str, first: bool| {
                    let mut call = json!({"index": 0, "function": {"arguments": args}});
                    if first {
                        call["id"] = json!("call_1");
                        call["function"]["name"] = json!("lookup_invoice");
                    }
                    json!({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}]})
                        .to_string()
                };
                sse(&[
                    frag("{\"invo", true),
                    frag("ice\": 42}", false),
                    finish("tool_calls"),
                    "[DONE]".into(),
                ])
            }
        }
        other => (StatusCode::NOT_FOUND, format!("no model {other}")).into_response(),
    }
}

async fn serve() -> (String, Arc<Server>) {
    let server = Arc::new(Server::default());
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(completions))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), server)
}

fn backend(url: &str) -> OpenAiBackend {
    let mut config = OpenAiConfig::new(url).api_key("sk-test");
    // A backoff this long would hang the test: a retry must honour Retry-After.
    config.initial_backoff = Duration::from_secs(3600);
    config.max_backoff = Duration::from_secs(3600);
    config.max_retry_after = Duration::from_secs(30);
    OpenAiBackend::new(config).unwrap()
}

async fn collect(b: &OpenAiBackend, model: &str) -> Result<Vec<Chunk>, AgentError> {
    let mut s = b
        .stream(ChatRequest::new(model, vec![ChatMessage::user("hi")]))
        .await?;
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.push(c?);
    }
    Ok(out)
}

#[tokio::test]
async fn streams_chunks_and_usage() {
    let (url, server) = serve().await;
    let chunks = collect(&backend(&url), "ok").await.unwrap();
    assert_eq!(
        chunks,
        vec![
            Chunk::Text("Hello".into()),
            Chunk::Text(", ".into()),
            Chunk::Text("world".into()),
            Chunk::Done {
                finish_reason: "stop".into(),
                usage: Some(troupe_agent::Usage {
                    prompt_tokens: 5,
                    completion_tokens: 3
                })
            },
        ]
    );
    let body = server.last_body.lock().unwrap().clone();
    assert_eq!(
        body["messages"][0],
        json!({"role": "user", "content": "hi"})
    );
}

#[tokio::test]
async fn retries_429_honouring_retry_after_and_passes_long_hints_on() {
    let (url, server) = serve().await;
    let b = backend(&url);
    let chunks = tokio::time::timeout(Duration::from_secs(60), collect(&b, "busy-then-ok"))
        .await
        .expect("a retry waited for the backoff instead of Retry-After: 0")
        .unwrap();
    assert_eq!(chunks[0], Chunk::Text("finally".into()));
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        3,
        "two 429s, then success"
    );

    server.requests.store(0, Ordering::SeqCst);
    match collect(&b, "busy-for-long").await {
        Err(AgentError::Overloaded {
            retry_after,
            reason,
        }) => {
            assert_eq!(retry_after, Duration::from_secs(120));
            assert!(reason.contains("quota exhausted"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        1,
        "a hint past max_retry_after is not waited for"
    );
}

#[tokio::test]
async fn server_errors_reach_the_caller_with_the_servers_message() {
    let (url, server) = serve().await;
    let mut config = OpenAiConfig::new(&url);
    config.max_retries = 2;
    config.initial_backoff = Duration::from_millis(1);
    config.max_backoff = Duration::from_millis(2);
    let b = OpenAiBackend::new(config).unwrap();
    match collect(&b, "always-503").await {
        Err(AgentError::Backend {
            status, message, ..
        }) => {
            assert_eq!(status, 503);
            assert_eq!(message, "upstream down");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        3,
        "1 try + 2 retries"
    );
    server.requests.store(0, Ordering::SeqCst);
    match collect(&b, "bad-request").await {
        Err(AgentError::Backend {
            status, message, ..
        }) => {
            assert_eq!(status, 400);
            assert_eq!(message, "max_tokens is too large: 99999");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        1,
        "4xx is not retried"
    );
}

#[tokio::test]
async fn malformed_chunks_and_cut_streams_are_clear_errors() {
    let (url, _) = serve().await;
    let b = backend(&url);
    let mut s = b
        .stream(ChatRequest::new("malformed", vec![ChatMessage::user("hi")]))
        .await
        .unwrap();
    assert_eq!(s.next().await.unwrap().unwrap(), Chunk::Text("two ".into()));
    assert_eq!(
        s.next().await.unwrap().unwrap(),
        Chunk::Text("chunks".into())
    );
    match s.next().await {
        Some(Err(AgentError::MalformedChunk { chunk, message, .. })) => {
            assert_eq!(chunk, "{not json");
            assert!(!message.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert!(s.next().await.is_none(), "the stream ends at the error");

    match collect(&b, "cut").await {
        Err(AgentError::StreamClosed { chunks, .. }) => assert_eq!(chunks, 2),
        other => panic!("{other:?}"),
    }
}

fn system(url: &str) -> AgentSystem {
    let sessions = Sessions::new(Arc::new(InMemoryJournal::new()), SessionConfig::default());
    AgentSystem::new(sessions, Inference::new().with_backend(backend(url)))
}

/// Answers with the model (the default turn).
struct Answer;

impl troupe_agent::Agent for Answer {
    type State = ();
}

const ANSWER: troupe_agent::AgentKey<Answer> = troupe_agent::AgentKey::new("answer");

async fn events(sys: &AgentSystem, id: &str) -> Vec<SessionEvent> {
    let mut s = sys.sessions().subscribe(id, 0).await.unwrap();
    let last = sys.sessions().view(id).await.unwrap().seq;
    let mut out = Vec::new();
    while let Some(item) = s.next().await {
        if let troupe_agent::SessionItem::Event(rec) = item.unwrap() {
            out.push(rec.event.clone());
            if rec.seq == last {
                break;
            }
        }
    }
    out
}

#[tokio::test]
async fn a_malformed_stream_fails_the_turn_once_and_journals_nothing_twice() {
    let (url, _) = serve().await;
    let sys = system(&url);
    let options = AgentOptions::default().model("openai", "malformed");
    let agent = sys.register(&ANSWER, Answer, options).await.unwrap();
    let id = sys.sessions().create("answer", None).await.unwrap();
    let posted = sys
        .sessions()
        .post_with(&id, "hi", Vec::new(), troupe_agent::Dispatch::Later)
        .await
        .unwrap();
    let r = agent.get(&id).answer(posted.turn).await;
    assert!(matches!(r, Err(AgentError::MalformedChunk { .. })), "{r:?}");
    let evs = events(&sys, &id).await;
    let kinds: Vec<&str> = evs
        .iter()
        .map(|e| match e {
            SessionEvent::Opened { .. } => "opened",
            SessionEvent::UserTurn { .. } => "user",
            SessionEvent::TurnStarted { .. } => "started",
            SessionEvent::ModelChunk { .. } => "chunk",
            SessionEvent::TurnFailed { .. } => "failed",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        ["opened", "user", "started", "chunk", "chunk", "failed"]
    );
    // The session takes the next turn.
    sys.sessions()
        .post_with(&id, "again", Vec::new(), troupe_agent::Dispatch::Later)
        .await
        .unwrap();
}

#[tokio::test]
async fn tool_calls_streamed_in_fragments_are_assembled_run_and_journaled() {
    let (url, server) = serve().await;
    let sys = system(&url);
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct Lookup {
        invoice: u32,
    }
    let tools = Tools::new().with(Tool::new(
        "lookup_invoice",
        "Finds an invoice",
        |a: Lookup| async move { Ok::<_, String>(json!({"invoice": a.invoice, "status": "paid"})) },
    ));
    let options = AgentOptions::default()
        .model("openai", "tools")
        .tools(tools);
    let agent = sys.register(&ANSWER, Answer, options).await.unwrap();
    let id = sys.sessions().create("answer", None).await.unwrap();
    let posted = sys
        .sessions()
        .post_with(
            &id,
            "is invoice 42 paid?",
            Vec::new(),
            troupe_agent::Dispatch::Later,
        )
        .await
        .unwrap();
    let outcome = agent.get(&id).answer(posted.turn).await.unwrap();
    assert_eq!(outcome.tool_calls, 1);
    assert_eq!(
        outcome.text,
        r#"the invoice says {"invoice":42,"status":"paid"}"#
    );
    let body = server.last_body.lock().unwrap().clone();
    assert_eq!(body["tools"][0]["function"]["name"], "lookup_invoice");
    assert_eq!(
        body["messages"][1]["tool_calls"][0]["function"]["arguments"],
        "{\"invoice\": 42}"
    );
    assert_eq!(body["messages"][2]["tool_call_id"], "call_1");
    let evs = events(&sys, &id).await;
    assert!(evs.iter().any(|e| matches!(e, SessionEvent::ToolCalled { call, .. } if call.name == "lookup_invoice" && call.arguments == "{\"invoice\": 42}")));
    assert!(evs.iter().any(
        |e| matches!(e, SessionEvent::ToolResult { ok: true, call_id, .. } if call_id == "call_1")
    ));
    assert!(matches!(
        evs.last(),
        Some(SessionEvent::TurnCompleted { .. })
    ));
}

/// The data URL's bytes, decoded.
fn data_url(url: &str, media_type: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = url
        .strip_prefix(&format!("data:{media_type};base64,"))
        .unwrap_or_else(|| panic!("not a {media_type} data URL: {}", &url[..url.len().min(60)]));
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

#[tokio::test]
async fn attachments_reach_models_that_take_them_as_content_parts() {
    use sha2::Digest as _;
    let (url, server) = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let objects = troupe_journal::tiered::open_object_store(
        &troupe_journal::ColdConfig::default(),
        dir.path(),
    )
    .unwrap();
    let blobs = troupe_journal::BlobStore::new(objects, troupe_journal::BlobConfig::default());
    let png: Vec<u8> = (0..5_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let pdf = b"%PDF-1.7 a small document".to_vec();
    let image = blobs.put("image/png", png.clone()).await.unwrap();
    let doc = blobs.put("application/pdf", pdf.clone()).await.unwrap();

    let vision = OpenAiBackend::new(
        OpenAiConfig::new(&url)
            .name("vision")
            .accepts(["image/", "application/pdf"]),
    )
    .unwrap();
    let text_only = OpenAiBackend::new(OpenAiConfig::new(&url).name("text")).unwrap();
    let sessions = Sessions::new(Arc::new(InMemoryJournal::new()), SessionConfig::default());
    let sys = AgentSystem::with_config(
        sessions,
        Inference::new()
            .with_backend(vision)
            .with_backend(text_only),
        troupe_agent::SystemConfig {
            blobs: Some(blobs),
            ..Default::default()
        },
    );
    let agent = sys
        .register(
            &ANSWER,
            Answer,
            AgentOptions::default().model("vision", "vision"),
        )
        .await
        .unwrap();
    let id = sys.sessions().create("answer", None).await.unwrap();
    let posted = sys
        .sessions()
        .post_with(
            &id,
            "what is in the picture?",
            vec![image.clone(), doc.clone()],
            troupe_agent::Dispatch::Later,
        )
        .await
        .unwrap();
    agent.get(&id).answer(posted.turn).await.unwrap();
    let body = server.last_body.lock().unwrap().clone();
    let parts = body["messages"][0]["content"]
        .as_array()
        .expect("content parts");
    assert_eq!(parts.len(), 3, "{parts:?}");
    assert_eq!(parts[0]["type"], "text");
    assert!(
        parts[0]["text"]
            .as_str()
            .unwrap()
            .starts_with("what is in the picture?")
    );
    assert_eq!(parts[1]["type"], "image_url");
    let got = data_url(parts[1]["image_url"]["url"].as_str().unwrap(), "image/png");
    assert_eq!(hex::encode(sha2::Sha256::digest(&got)), image.hash.hex());
    assert_eq!(parts[2]["type"], "file");
    let got = data_url(
        parts[2]["file"]["file_data"].as_str().unwrap(),
        "application/pdf",
    );
    assert_eq!(got, pdf);

    // A text-only backend reads the line that names each attachment.
    let options = AgentOptions::default().model("text", "vision");
    let plain = sys
        .register(
            &troupe_agent::AgentKey::<Answer>::new("plain"),
            Answer,
            options,
        )
        .await
        .unwrap();
    let id2 = sys.sessions().create("plain", None).await.unwrap();
    let posted = sys
        .sessions()
        .post_with(
            &id2,
            "and this one?",
            vec![image.clone()],
            troupe_agent::Dispatch::Later,
        )
        .await
        .unwrap();
    plain.get(&id2).answer(posted.turn).await.unwrap();
    let body = server.last_body.lock().unwrap().clone();
    let text = body["messages"][0]["content"].as_str().expect("plain text");
    assert!(
        text.contains(&format!("[attachment: image/png {}", image.hash)),
        "{text}"
    );

    // Past the bound on attachment bytes per call: a clear error, no request.
    let small = AgentOptions {
        max_attachment_bytes: 1_000,
        ..AgentOptions::default().model("vision", "vision")
    };
    let tight = sys
        .register(
            &troupe_agent::AgentKey::<Answer>::new("tight"),
            Answer,
            small,
        )
        .await
        .unwrap();
    let id3 = sys.sessions().create("tight", None).await.unwrap();
    let posted = sys
        .sessions()
        .post_with(&id3, "too big", vec![image], troupe_agent::Dispatch::Later)
        .await
        .unwrap();
    let before = server.requests.load(Ordering::SeqCst);
    match tight.get(&id3).answer(posted.turn).await {
        Err(AgentError::TooLarge { limit, what }) => {
            assert_eq!(limit, 1_000);
            assert!(what.contains("attachment"), "{what}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(server.requests.load(Ordering::SeqCst), before);

    // The next turn's own attachment fits: it is sent, and the older one
    // past the bound stays the line that names it.
    let posted = sys
        .sessions()
        .post_with(&id3, "and now?", vec![doc], troupe_agent::Dispatch::Later)
        .await
        .unwrap();
    tight.get(&id3).answer(posted.turn).await.unwrap();
    let body = server.last_body.lock().unwrap().clone();
    let messages = body["messages"].as_array().unwrap();
    let older = messages[0]["content"].as_str().expect("a reference line");
    assert!(older.contains("[attachment: image/png"), "{older}");
    let newest = messages.last().unwrap()["content"]
        .as_array()
        .expect("content parts");
    assert_eq!(newest[1]["type"], "file");
}

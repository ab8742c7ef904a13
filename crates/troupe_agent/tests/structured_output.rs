//! Typed answers (`Context::reply_as`): against the LiteLLM proxy (installed
//! by `make test` into `tests/litellm/.venv`, pinned with hashes, offline
//! with mock responses), and against our own server on 127.0.0.1 for the
//! answers that must be repaired or never fit. Also the GenAI token and
//! latency metrics, read from the Prometheus text, and the lease priority
//! sent in a configured request field.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::Response;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use troupe_agent::schemars::{self, JsonSchema};
use troupe_agent::{
    Agent, AgentError, AgentKey, AgentOptions, AgentSystem, Context, Dispatch, Inference,
    OpenAiBackend, OpenAiConfig, OutputSchema, Role, SessionConfig, SessionEvent, SessionItem,
    Sessions, Usage,
};
use troupe_journal::InMemoryJournal;

#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
enum Urgency {
    Low,
    High,
}

#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
struct Line {
    sku: String,
    quantity: u32,
}

/// What the triage agent must answer with.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
struct Ticket {
    customer: String,
    urgency: Urgency,
    lines: Vec<Line>,
}

const VALID: &str = r#"{"customer":"ada","urgency":"High","lines":[{"sku":"A-7","quantity":2}]}"#;
/// `urgency` is not one of the enum's values.
const BAD_URGENCY: &str = r#"{"customer":"ada","urgency":"Urgent","lines":[]}"#;
/// A negative quantity does not fit `u32`.
const BAD_QUANTITY: &str =
    r#"{"customer":"ada","urgency":"Low","lines":[{"sku":"A-7","quantity":-1}]}"#;

fn ticket() -> Ticket {
    Ticket {
        customer: "ada".into(),
        urgency: Urgency::High,
        lines: vec![Line {
            sku: "A-7".into(),
            quantity: 2,
        }],
    }
}

/// Answers every turn with a `Ticket` and keeps what it got.
struct Triage {
    got: Arc<Mutex<Vec<Ticket>>>,
}

impl Agent for Triage {
    type State = ();

    async fn on_turn(&self, _: &mut (), ctx: &mut Context<Self>) -> Result<(), AgentError> {
        let typed = ctx.reply_as::<Ticket>().await?;
        self.got.lock().unwrap().push(typed.value);
        Ok(())
    }
}

const TRIAGE: AgentKey<Triage> = AgentKey::new("triage");

/// The Prometheus recorder of this test process (the text `/metrics` serves).
fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(&[0.01, 0.1, 1.0, 10.0, 100.0])
            .unwrap()
            .build_recorder();
        let handle = recorder.handle();
        metrics::set_global_recorder(recorder).unwrap();
        handle
    })
}

/// The value of the sample `name{...}` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix('{')?;
        let (set, value) = rest.split_once("} ")?;
        labels
            .iter()
            .all(|(k, v)| set.split(',').any(|p| p == format!("{k}=\"{v}\"")))
            .then(|| value.trim().parse().ok())?
    })
}

/// Our own OpenAI-compatible server: answers by model name, keeps every body.
#[derive(Default)]
struct Mock {
    bodies: Mutex<Vec<Value>>,
}

fn sse(text: &str) -> Response {
    let mid = text.len() / 2;
    let mut lines: Vec<String> = [&text[..mid], &text[mid..]]
        .iter()
        .map(|t| json!({"choices": [{"index": 0, "delta": {"content": t}}]}).to_string())
        .collect();
    lines.push(
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 11, "completion_tokens": 7}})
        .to_string(),
    );
    lines.push("[DONE]".into());
    let chunks: Vec<Result<Bytes, std::io::Error>> = lines
        .into_iter()
        .map(|l| Ok(Bytes::from(format!("data: {l}\n\n"))))
        .collect();
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(futures::stream::iter(chunks)))
        .unwrap()
}

async fn completions(State(mock): State<Arc<Mock>>, Json(body): Json<Value>) -> Response {
    mock.bodies.lock().unwrap().push(body.clone());
    let last_user = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    match body["model"].as_str().unwrap_or_default() {
        // Wrong first, right once told what was wrong.
        "repair" if last_user.contains("does not match") => sse(VALID),
        "repair" => sse(BAD_URGENCY),
        // Never right.
        _ => sse(BAD_QUANTITY),
    }
}

async fn mock() -> (String, Arc<Mock>) {
    let mock = Arc::new(Mock::default());
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(completions))
        .with_state(mock.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, mock)
}

struct Setup {
    sys: AgentSystem,
    got: Arc<Mutex<Vec<Ticket>>>,
    journal: Arc<InMemoryJournal>,
}

async fn setup(config: OpenAiConfig, model: &str) -> Setup {
    let journal = Arc::new(InMemoryJournal::new());
    let sessions = Sessions::new(journal.clone(), SessionConfig::default());
    let inference = Inference::new().with_backend(OpenAiBackend::new(config).unwrap());
    let sys = AgentSystem::new(sessions, inference);
    let got = Arc::new(Mutex::new(Vec::new()));
    let options = AgentOptions::default().model("openai", model);
    sys.register(&TRIAGE, Triage { got: got.clone() }, options)
        .await
        .unwrap();
    Setup { sys, got, journal }
}

/// Posts one question and waits for the turn's end.
async fn ask(s: &Setup) -> (String, Result<troupe_agent::TurnOutcome, AgentError>) {
    let id = s.sys.sessions().create("triage", None).await.unwrap();
    let posted = s
        .sys
        .sessions()
        .post_with(
            &id,
            "Two A-7 for ada, fast please",
            Vec::new(),
            Dispatch::Later,
        )
        .await
        .unwrap();
    let agent = s.sys.agent(&TRIAGE).unwrap();
    let r = agent.get(&id).answer(posted.turn).await;
    (id, r)
}

async fn events(sys: &AgentSystem, id: &str) -> Vec<SessionEvent> {
    let last = sys.sessions().view(id).await.unwrap().seq;
    let mut s = sys.sessions().subscribe(id, 0).await.unwrap();
    let mut out = Vec::new();
    while let Some(item) = s.next().await {
        if let SessionItem::Event(rec) = item.unwrap() {
            out.push(rec.event.clone());
            if rec.seq == last {
                break;
            }
        }
    }
    out
}

#[tokio::test]
async fn a_wrong_answer_is_repaired_journaled_and_replayed() {
    let metrics = prometheus();
    let (url, mock) = mock().await;
    let s = setup(OpenAiConfig::new(&url).priority_field("priority"), "repair").await;
    let (id, r) = ask(&s).await;
    let outcome = r.unwrap();
    assert_eq!(*s.got.lock().unwrap(), vec![ticket()]);
    assert_eq!(
        outcome.usage,
        Some(Usage {
            prompt_tokens: 22,
            completion_tokens: 14
        }),
        "both model calls of the turn"
    );

    let bodies = mock.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 2, "one repair");
    let schema = OutputSchema::of::<Ticket>();
    assert_eq!(
        bodies[0]["response_format"],
        json!({"type": "json_schema",
               "json_schema": {"name": "Ticket", "schema": schema.schema(), "strict": true}})
    );
    // Lease priority 1 of 0..=3, sent lower-first as vLLM reads it.
    assert_eq!(bodies[0]["priority"], 2);
    let second = bodies[1]["messages"].as_array().unwrap();
    let n = second.len();
    assert_eq!(second[n - 2]["role"], "assistant");
    assert_eq!(second[n - 2]["content"], BAD_URGENCY);
    assert_eq!(second[n - 1]["role"], "user");
    let repair = second[n - 1]["content"].as_str().unwrap();
    assert!(
        repair.contains("`urgency`") && repair.contains("Urgent"),
        "{repair}"
    );

    let evs = events(&s.sys, &id).await;
    let rejected: Vec<&SessionEvent> = evs
        .iter()
        .filter(|e| matches!(e, SessionEvent::AnswerRejected { .. }))
        .collect();
    assert!(
        matches!(rejected[..], [SessionEvent::AnswerRejected { field, .. }] if field == "urgency"),
        "{rejected:?}"
    );
    assert!(matches!(
        evs.last(),
        Some(SessionEvent::TurnCompleted { usage: Some(u), .. }) if u.prompt_tokens == 22
    ));

    // Replayed from the journal by a fresh process: the same context.
    let again = Sessions::new(s.journal.clone(), SessionConfig::default());
    let view = again.view(&id).await.unwrap();
    let roles: Vec<Role> = view.messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [Role::User, Role::Assistant, Role::User, Role::Assistant]
    );
    assert_eq!(view.messages[1].content, BAD_URGENCY);
    assert_eq!(view.messages[3].content, VALID);
    assert_eq!(view.completed, 1);

    let text = metrics.render();
    let model = [("gen_ai_request_model", "repair")];
    let input = [
        model[0],
        ("gen_ai_token_type", "input"),
        ("source", "server"),
    ];
    assert_eq!(
        sample(&text, "gen_ai_client_token_usage_sum", &input),
        Some(22.0)
    );
    assert_eq!(
        sample(&text, "gen_ai_client_token_usage_count", &input),
        Some(2.0)
    );
    let first = "gen_ai_client_operation_time_to_first_chunk_seconds_count";
    assert_eq!(sample(&text, first, &model), Some(2.0));
    let duration = "gen_ai_client_operation_duration_seconds_count";
    assert_eq!(sample(&text, duration, &model), Some(2.0));
}

#[tokio::test]
async fn an_answer_that_never_fits_fails_the_turn_naming_the_field() {
    let (url, mock) = mock().await;
    let s = setup(OpenAiConfig::new(&url), "never").await;
    let (id, r) = ask(&s).await;
    match r {
        Err(AgentError::InvalidAnswer {
            field,
            attempts,
            schema,
            message,
            ..
        }) => {
            assert_eq!(field, "lines[0].quantity");
            assert_eq!(schema, "Ticket");
            assert_eq!(attempts, 3, "the answer and max_repairs = 2 repairs");
            assert!(message.contains("-1"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(mock.bodies.lock().unwrap().len(), 3);
    assert!(
        mock.bodies.lock().unwrap()[0].get("priority").is_none(),
        "no priority field configured"
    );
    assert!(s.got.lock().unwrap().is_empty());
    let evs = events(&s.sys, &id).await;
    let rejected = evs
        .iter()
        .filter(|e| matches!(e, SessionEvent::AnswerRejected { .. }))
        .count();
    assert_eq!(rejected, 2);
    match evs.last() {
        Some(SessionEvent::TurnFailed { error, .. }) => {
            assert!(error.contains("lines[0].quantity"), "{error}")
        }
        other => panic!("{other:?}"),
    }
}

/// The LiteLLM proxy, killed when dropped.
struct LiteLlm {
    url: String,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

fn litellm_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/litellm/.venv/bin/litellm");
    assert!(
        p.exists(),
        "the LiteLLM proxy is not installed at {}: run `make test` (or scripts/install-deps.sh)",
        p.display()
    );
    p
}

async fn litellm() -> LiteLlm {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n\
             \x20 - model_name: good\n\
             \x20   litellm_params: {{model: openai/good, api_key: none, mock_response: '{VALID}'}}\n\
             \x20 - model_name: bad\n\
             \x20   litellm_params: {{model: openai/bad, api_key: none, mock_response: '{BAD_URGENCY}'}}\n\
             general_settings:\n\
             \x20 master_key: sk-troupe-test\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new(litellm_bin())
        .args(["--config", config.to_str().unwrap()])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_TELEMETRY", "False")
        .env("NO_DOCS", "True")
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    // Its Python start-up takes seconds; bounded at 3 minutes.
    for _ in 0..900 {
        let ok = client
            .get(format!("{url}/health/liveliness"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return LiteLlm {
                url: format!("{url}/v1"),
                _child: child,
                _dir: dir,
            };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the LiteLLM proxy did not start on {url}");
}

#[tokio::test]
async fn litellm_serves_typed_answers_and_wrong_ones_are_named() {
    let metrics = prometheus();
    let proxy = litellm().await;
    let config = || {
        OpenAiConfig::new(&proxy.url)
            .api_key("sk-troupe-test")
            .priority_field("priority")
    };

    let good = setup(config(), "good").await;
    let (_, r) = ask(&good).await;
    let outcome = r.unwrap();
    assert_eq!(*good.got.lock().unwrap(), vec![ticket()]);
    let usage = outcome.usage.expect("LiteLLM reports usage");
    assert!(
        usage.prompt_tokens > 0 && usage.completion_tokens > 0,
        "{usage:?}"
    );

    let bad = setup(config(), "bad").await;
    let (_, r) = ask(&bad).await;
    match r {
        Err(AgentError::InvalidAnswer {
            field, attempts, ..
        }) => {
            assert_eq!(field, "urgency");
            assert_eq!(attempts, 3);
        }
        other => panic!("{other:?}"),
    }

    let text = metrics.render();
    let output = [
        ("gen_ai_request_model", "good"),
        ("gen_ai_token_type", "output"),
        ("source", "server"),
    ];
    assert_eq!(
        sample(&text, "gen_ai_client_token_usage_sum", &output),
        Some(f64::from(usage.completion_tokens))
    );
    let bad_calls = [("gen_ai_request_model", "bad")];
    assert_eq!(
        sample(
            &text,
            "gen_ai_client_operation_duration_seconds_count",
            &bad_calls
        ),
        Some(3.0)
    );
}

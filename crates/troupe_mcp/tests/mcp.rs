//! The MCP client against servers nobody on the project wrote: the
//! reference server `@modelcontextprotocol/server-everything` from npm
//! (installed by `make test` into `tests/mcp`), over stdio and over
//! Streamable HTTP, its tools called by agents in real turns, the server
//! killed and started again under them. Then the malformed cases, against a
//! small mock of our own (`tests/mcp/mock_server.py`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use troupe_agent::{
    Agent, AgentError, AgentKey, AgentOptions, AgentSystem, Context, Inference, LocalBackend, Role,
    SessionConfig, Sessions, ToolSource, Tools,
};
use troupe_journal::InMemoryJournal;
use troupe_mcp::{Backoff, McpError, McpServer, McpServerConfig, McpStatus};

/// Long enough for node to start on a loaded machine; only a bound on
/// waiting for something that does happen, never what a test decides on.
const PATIENCE: Duration = Duration::from_secs(60);

/// Restarts within a fraction of a second, for the tests.
fn fast(initial_ms: u64, max_ms: u64) -> Backoff {
    Backoff {
        initial: Duration::from_millis(initial_ms),
        max: Duration::from_millis(max_ms),
        reset_after: Duration::from_secs(10),
    }
}

fn tests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/mcp")
}

fn everything() -> String {
    let p = tests_dir().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    assert!(
        p.exists(),
        "the MCP reference server is not installed at {}: run `make test` (or `npm ci --prefix tests/mcp`)",
        p.display()
    );
    p.to_string_lossy().into_owned()
}

/// Replies with the model and the tools it is given.
struct Desk;

const DESK: AgentKey<Desk> = AgentKey::new("desk");

impl Agent for Desk {
    type State = ();

    async fn on_turn(&self, _: &mut (), ctx: &mut Context<Self>) -> Result<(), AgentError> {
        ctx.reply().await?;
        Ok(())
    }
}

/// A system whose model calls `get-sum` when asked for a sum and `echo`
/// when asked to echo, if it is offered those tools.
async fn desk(tools: Tools) -> AgentSystem {
    let model = LocalBackend::default()
        .words(4, 1)
        .call_tool_when("sum", "get-sum", json!({"a": 2, "b": 40}))
        .call_tool_when("echo", "echo", json!({"message": "hello"}));
    let sessions = Sessions::new(Arc::new(InMemoryJournal::new()), SessionConfig::default());
    let sys = AgentSystem::new(sessions, Inference::new().with_backend(model));
    sys.register(&DESK, Desk, AgentOptions::default().tools(tools))
        .await
        .unwrap();
    sys
}

/// Asks one question in a new session; the tool results the turn
/// journaled, in order.
async fn ask(sys: &AgentSystem, question: &str) -> Vec<String> {
    let id = sys.sessions().create(DESK.name(), None).await.unwrap();
    let posted = sys.sessions().post(&id, question).await.unwrap();
    sys.wait_turn_end(&id, posted.turn).await.unwrap();
    let view = sys.sessions().view(&id).await.unwrap();
    view.messages
        .into_iter()
        .filter(|m| m.role == Role::Tool)
        .map(|m| m.content)
        .collect()
}

fn names(source: &dyn ToolSource) -> Vec<String> {
    source
        .list()
        .into_iter()
        .map(|t| t.spec().name.clone())
        .collect()
}

/// Waits until `f` holds, checking as the status changes.
async fn until(server: &McpServer, what: &str, f: impl Fn(&McpServer) -> bool) {
    let mut rx = server.watch();
    let waited = tokio::time::timeout(PATIENCE, async {
        while !f(server) {
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{what}: not within {PATIENCE:?}; status {:?}, stats {:?}",
        server.status(),
        server.stats()
    );
}

fn kill(pid: u32) {
    let ok = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -KILL {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_server_over_stdio_serves_an_agent_through_a_kill_and_a_restart() {
    // The child is started through a shell that runs the server only while
    // a flag file exists, so the test decides when a restart can succeed.
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("up");
    std::fs::write(&flag, "").unwrap();
    let script = format!(
        "test -e '{}' || {{ echo 'flag file gone: not starting' >&2; exit 3; }}; exec node '{}' stdio",
        flag.display(),
        everything()
    );
    let server = McpServer::start(
        McpServerConfig::stdio("everything", "sh", ["-c", script.as_str()]).backoff(fast(100, 400)),
    )
    .unwrap();
    server.wait_up(PATIENCE).await.unwrap();
    match server.status() {
        McpStatus::Up { protocol, tools } => {
            assert_eq!(protocol, "2025-11-25", "the revision agreed");
            assert!(tools >= 10, "{tools} tools");
        }
        other => panic!("{other:?}"),
    }
    let all = names(&*server.tools());
    for tool in [
        "echo",
        "get-sum",
        "get-tiny-image",
        "get-structured-content",
    ] {
        assert!(all.iter().any(|n| n == tool), "{tool} in {all:?}");
    }
    // The server registers more tools once the handshake is done and says
    // so: the list is read again.
    until(&server, "the list change", |s| {
        s.stats().list_changes >= 1 && s.stats().listings >= 2
    })
    .await;
    until(&server, "the tool registered after the handshake", |s| {
        names(&*s.tools())
            .iter()
            .any(|n| n == "simulate-research-query")
    })
    .await;

    // Called directly: text, structured content, images named, errors typed.
    assert_eq!(
        server
            .call("get-sum", json!({"a": 2, "b": 3}))
            .await
            .unwrap(),
        "The sum of 2 and 3 is 5."
    );
    let weather = server
        .call("get-structured-content", json!({"location": "New York"}))
        .await
        .unwrap();
    let weather: serde_json::Value = serde_json::from_str(&weather).unwrap();
    assert!(weather["temperature"].is_number(), "{weather}");
    let image = server.call("get-tiny-image", json!({})).await.unwrap();
    assert!(image.contains("[image image/png, "), "{image}");
    match server.call("get-sum", json!({"a": "two"})).await {
        Err(e @ (McpError::ToolFailed { .. } | McpError::Request { .. })) => {
            assert!(e.to_string().contains("get-sum"), "{e}")
        }
        other => panic!("bad arguments: {other:?}"),
    }
    assert!(matches!(
        server.call("get-sum", json!([1, 2])).await,
        Err(McpError::Arguments {
            found: "an array",
            ..
        })
    ));

    // An agent allowed `get-sum` only: its model is offered that and calls
    // it in a real turn; `echo` is never offered to it.
    let allowed = server.allow(["get-sum"]);
    assert_eq!(names(&*allowed), ["get-sum"]);
    let sys = desk(Tools::new().with_source(allowed)).await;
    assert_eq!(
        ask(&sys, "what is the sum?").await,
        ["The sum of 2 and 40 is 42."]
    );
    assert!(
        ask(&sys, "please echo").await.is_empty(),
        "echo is not allowed"
    );

    // Killed under the running agent, with its restarts held back: the
    // agent is offered nothing of it, and a direct call says it is down.
    std::fs::remove_file(&flag).unwrap();
    let first = server.pid().expect("a child process");
    kill(first);
    until(&server, "the failed restart", |s| {
        matches!(s.status(), McpStatus::Down { reason, .. } if reason.contains("flag file gone"))
    })
    .await;
    assert!(names(&*server.tools()).is_empty());
    assert!(
        ask(&sys, "what is the sum?").await.is_empty(),
        "nothing offered while down"
    );
    assert!(matches!(
        server.call("get-sum", json!({"a": 1, "b": 1})).await,
        Err(McpError::Down { .. })
    ));
    // Allowed to start again: the same agent, with nothing registered again,
    // calls the new process.
    std::fs::write(&flag, "").unwrap();
    server.wait_up(PATIENCE).await.unwrap();
    let second = server.pid().expect("a new child");
    assert_ne!(first, second);
    assert!(server.stats().starts >= 3, "{:?}", server.stats());
    assert_eq!(
        ask(&sys, "what is the sum?").await,
        ["The sum of 2 and 40 is 42."]
    );
    server.shutdown().await;
    assert_eq!(server.status(), McpStatus::Stopped);
    assert!(server.pid().is_none());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the reference server over Streamable HTTP on `port`; returns
/// once it accepts connections.
async fn http_everything(port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new("node")
        .arg(everything())
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(PATIENCE, async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the HTTP server listens");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_server_over_streamable_http_comes_back_after_it_was_killed() {
    let port = free_port();
    let mut node = http_everything(port).await;
    let server = McpServer::start(
        McpServerConfig::http("everything-http", &format!("http://127.0.0.1:{port}/mcp"))
            .prefix("ev_")
            .health_interval(Duration::from_millis(500))
            .backoff(fast(100, 400)),
    )
    .unwrap();
    server.wait_up(PATIENCE).await.unwrap();
    let offered = names(&*server.tools());
    assert!(offered.iter().any(|n| n == "ev_get-sum"), "{offered:?}");
    assert!(offered.iter().all(|n| n.starts_with("ev_")));
    // The server's own name is used on the wire, the prefixed one by agents.
    assert_eq!(
        server
            .call("get-sum", json!({"a": 1, "b": 2}))
            .await
            .unwrap(),
        "The sum of 1 and 2 is 3."
    );
    let tool = server.tools().find("ev_echo").unwrap();
    assert_eq!(tool.call(r#"{"message": "hi"}"#).await.unwrap(), "Echo: hi");

    node.kill().await.unwrap();
    node.wait().await.unwrap();
    until(&server, "noticing the server is gone", |s| {
        !matches!(s.status(), McpStatus::Up { .. })
    })
    .await;
    assert!(
        server
            .call("get-sum", json!({"a": 1, "b": 2}))
            .await
            .is_err()
    );
    let _node = http_everything(port).await;
    server.wait_up(PATIENCE).await.unwrap();
    assert_eq!(
        server
            .call("get-sum", json!({"a": 4, "b": 5}))
            .await
            .unwrap(),
        "The sum of 4 and 5 is 9."
    );
    assert!(server.stats().starts >= 2);
    server.shutdown().await;
}

/// Our own mock, for what the reference server never does.
fn mock(name: &str) -> McpServerConfig {
    let script = tests_dir().join("mock_server.py");
    McpServerConfig::stdio(name, "python3", [script.to_string_lossy().into_owned()])
        .call_timeout(Duration::from_millis(500))
        .max_result(64 * 1024)
        .backoff(fast(50, 200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_servers_get_typed_errors_and_bounded_results() {
    let server = McpServer::start(mock("mock")).unwrap();
    server.wait_up(PATIENCE).await.unwrap();
    // A name no model API takes is left out, and said so.
    let offered = names(&*server.tools());
    assert!(!offered.iter().any(|n| n.contains('.')), "{offered:?}");
    assert!(
        server
            .stats()
            .left_out
            .iter()
            .any(|w| w.contains("bad.name")),
        "{:?}",
        server.stats()
    );
    // A result past the limit is refused, not cut silently.
    match server.call("big", json!({})).await {
        Err(McpError::TooLarge { size, limit, .. }) => {
            assert_eq!(limit, 64 * 1024);
            assert!(size > limit);
        }
        other => panic!("{other:?}"),
    }
    // A call that never answers times out, and the server was told to stop.
    assert!(matches!(
        server.call("hang", json!({})).await,
        Err(McpError::Timeout { .. })
    ));
    assert_eq!(
        server.call("cancelled", json!({})).await.unwrap(),
        "1 cancelled"
    );
    // The tool's own error is the model's to read.
    match server.call("fail", json!({})).await {
        Err(McpError::ToolFailed { message, .. }) => assert_eq!(message, "the printer is on fire"),
        other => panic!("{other:?}"),
    }
    // A line that is not JSON-RPC does not take the connection down.
    assert_eq!(
        server.call("garbage", json!({})).await.unwrap(),
        "after the noise"
    );
    assert_eq!(server.stats().starts, 1);
    // Through a turn: the call of a tool that fails is journaled as failed,
    // the model is told, the turn still ends.
    let model = LocalBackend::default().call_tool_when("print", "fail", json!({}));
    let sessions = Sessions::new(Arc::new(InMemoryJournal::new()), SessionConfig::default());
    let sys = AgentSystem::new(sessions, Inference::new().with_backend(model));
    sys.register(
        &DESK,
        Desk,
        AgentOptions::default().tools(Tools::new().with_source(server.tools())),
    )
    .await
    .unwrap();
    let results = ask(&sys, "print it").await;
    assert_eq!(results.len(), 1);
    assert!(
        results[0].starts_with("error: ") && results[0].contains("the printer is on fire"),
        "{results:?}"
    );
    // A server that exits under a call: the call fails, it is started again.
    assert!(server.call("exit", json!({})).await.is_err());
    until(&server, "the restart", |s| {
        s.stats().starts >= 2 && matches!(s.status(), McpStatus::Up { .. })
    })
    .await;
    // The new process answers (with the tool's own error, as before).
    assert!(matches!(
        server.call("fail", json!({})).await,
        Err(McpError::ToolFailed { .. })
    ));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_lists_without_end_or_floods_stderr_is_bounded() {
    let server = McpServer::start(mock("endless").env("MOCK_ENDLESS", "1").max_tools(5)).unwrap();
    server.wait_up(PATIENCE).await.unwrap();
    assert_eq!(names(&*server.tools()), ["t0", "t1", "t2", "t3", "t4"]);
    let left_out = server.stats().left_out;
    assert!(
        left_out.iter().any(|w| w.contains("further pages")),
        "{left_out:?}"
    );
    server.shutdown().await;
    // One that floods its standard error and dies before the handshake:
    // the reason carries its last lines, each cut to 512 bytes.
    let dying = McpServer::start(mock("dying").env("MOCK_DIE", "1").max_failures(1)).unwrap();
    let reason = match dying.wait_up(PATIENCE).await {
        Err(McpError::Down { reason, .. }) => reason,
        other => panic!("{other:?}"),
    };
    assert!(
        reason.contains("; its last words: "),
        "{}",
        &reason[..reason.len().min(2000)]
    );
    assert!(
        reason.ends_with("last line"),
        "{}",
        &reason[reason.len().saturating_sub(200)..]
    );
    assert!(reason.len() < 2 * 1024, "{} bytes of reason", reason.len());
}

#[tokio::test]
async fn a_server_that_cannot_start_is_given_up_with_the_reason() {
    let server = McpServer::start(
        McpServerConfig::stdio("nowhere", "/nonexistent/mcp-server", Vec::<String>::new())
            .max_failures(2)
            .backoff(fast(10, 20)),
    )
    .unwrap();
    match server.wait_up(PATIENCE).await {
        Err(McpError::Down { reason, .. }) => {
            assert!(reason.contains("/nonexistent/mcp-server"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(server.status(), McpStatus::Failed { .. }));
    assert_eq!(server.stats().starts, 2);
    assert!(server.tools().list().is_empty());
    // A bad configuration is refused before anything starts.
    assert!(matches!(
        McpServer::start(McpServerConfig::http("web", "localhost:80")),
        Err(McpError::Config { .. })
    ));
}

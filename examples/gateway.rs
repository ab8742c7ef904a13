//! The gateway, driven as an HTTP client would: a session whose reply
//! streams over SSE, a connection dropped in the middle of the stream and
//! resumed with `Last-Event-ID` (every event once, none lost), a one-off
//! inference task polled to completion, a workflow waiting for a human
//! signal, and the errors a client meets (400, 404, 409).
//!
//! Run with `cargo run --release --example gateway`.
//! `--quick` and `--data-dir DIR` are accepted like the other examples.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use troupe::gateway::{GatewayConfig, ModelConfig, Server, Tenant};

const TOKEN: &str = "acme-example-token-0123456789abcdef";

// ANCHOR: config
/// A tenant whose tasks may ask for GPU priority 2 (the default quota
/// stops at 1; session turns run at 2).
fn tenant() -> Tenant {
    let mut acme = Tenant::new("acme", TOKEN);
    acme.quota.max_priority = 2;
    acme
}

fn config(data_dir: PathBuf, quick: bool) -> GatewayConfig {
    let mut config = GatewayConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        data_dir,
        tenants: vec![tenant()],
        heartbeat_ms: 200,
        model: ModelConfig::Local {
            words: 16,
            chunk_ms: if quick { 5 } else { 40 },
        },
        ..GatewayConfig::default()
    };
    config.gpus.force_simulated = true;
    config
}
// ANCHOR_END: config

struct Client {
    base: String,
    http: reqwest::Client,
}

/// An HTTP client's failure, as the program reports it.
fn http(e: impl std::fmt::Display) -> troupe::Error {
    troupe::Error::Other(format!("HTTP: {e}"))
}

impl Client {
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> troupe::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(
                method.parse().map_err(http)?,
                format!("{}{path}", self.base),
            )
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(http)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(http)?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn wait_task(&self, id: &str) -> troupe::Result<Value> {
        for _ in 0..6_000 {
            let (_, t) = self.call("GET", &format!("/v1/tasks/{id}"), None).await?;
            if !matches!(t["state"]["status"].as_str(), Some("queued" | "running")) {
                return Ok(t);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!("task {id} did not finish").into())
    }
}

// ANCHOR: sse
/// Reads SSE events until `stop` of them (or the stream ends); returns
/// `(sequence, event type)` pairs.
async fn read_events(resp: reqwest::Response, stop: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let (mut buf, mut id, mut kind) = (String::new(), None, String::new());
    let mut body = resp.bytes_stream();
    while out.len() < stop {
        let Some(Ok(bytes)) = body.next().await else {
            break;
        };
        buf.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            let line = line.trim_end();
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse::<u64>().ok();
            } else if let Some(v) = line.strip_prefix("event:") {
                kind = v.trim().to_owned();
            } else if line.is_empty()
                && let Some(seq) = id.take()
            {
                out.push((seq, std::mem::take(&mut kind)));
            }
        }
    }
    out
}
// ANCHOR_END: sse

#[tokio::main]
async fn main() -> troupe::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let tmp = tempfile::tempdir()?;
    let data_dir = args
        .iter()
        .position(|a| a == "--data-dir")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let _ = std::fs::remove_dir_all(&data_dir);

    let gateway = Server::start(config(data_dir.clone(), quick)).await?;
    let client = Client {
        base: format!("http://{}", gateway.addr()),
        http: reqwest::Client::new(),
    };
    println!(
        "gateway on http://{} (data in {})",
        gateway.addr(),
        data_dir.display()
    );

    // ANCHOR: session
    let (status, session) = client.call("POST", "/v1/sessions", None).await?;
    let id = session["id"].as_str().ok_or("no id")?.to_owned();
    println!("\nPOST /v1/sessions -> {status}, session {id}");
    let (status, accepted) = client
        .call(
            "POST",
            &format!("/v1/sessions/{id}/messages"),
            Some(json!({"content": "my parcel never arrived"})),
        )
        .await?;
    println!(
        "POST .../messages -> {status}, task {} (turn journaled at seq {})",
        accepted["task_id"], accepted["seq"]
    );

    // Follow the reply, then drop the connection after a few events...
    let events_url = format!("{}/v1/sessions/{id}/events", client.base);
    let first = client
        .http
        .get(&events_url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .map_err(http)?;
    let seen = read_events(first, 5).await;
    let last = seen.last().map_or(0, |(s, _)| *s);
    println!(
        "SSE: {} events, then the connection drops at seq {last}",
        seen.len()
    );
    for (seq, kind) in &seen {
        println!("    id: {seq:<3} event: {kind}");
    }
    // ...and resume from the last event seen.
    client
        .wait_task(accepted["task_id"].as_str().ok_or("no task")?)
        .await?;
    let (_, view) = client
        .call("GET", &format!("/v1/sessions/{id}"), None)
        .await?;
    let end = view["seq"].as_u64().ok_or("no seq")?;
    let resumed = client
        .http
        .get(&events_url)
        .bearer_auth(TOKEN)
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .map_err(http)?;
    let rest = read_events(resumed, (end - last) as usize).await;
    println!(
        "SSE resumed with Last-Event-ID: {last}: {} more events, seq {}..={}",
        rest.len(),
        last + 1,
        end
    );
    let all: Vec<u64> = seen.iter().chain(&rest).map(|(s, _)| *s).collect();
    if all != (1..=end).collect::<Vec<_>>() {
        return Err(format!("the resumed stream lost or repeated events: {all:?}").into());
    }
    println!(
        "    every event 1..={end} exactly once; reply: {:?}",
        view["messages"][1]["content"]
    );
    // ANCHOR_END: session

    // ANCHOR: task
    let (status, task) = client
        .call(
            "POST",
            "/v1/tasks",
            Some(json!({"prompt": "summarize ticket 4711", "priority": 2})),
        )
        .await?;
    println!("\nPOST /v1/tasks -> {status}, task {}", task["task_id"]);
    let done = client
        .wait_task(task["task_id"].as_str().ok_or("no task")?)
        .await?;
    println!(
        "    {} after {} attempt(s): {}",
        done["state"]["status"], done["attempts"], done["state"]["result"]["text"]
    );
    // ANCHOR_END: task

    // A workflow that waits for a human.
    let (status, wf) = client
        .call(
            "POST",
            "/v1/workflows",
            Some(json!({"definition": "review", "input": {"topic": "refund policy"}})),
        )
        .await?;
    let wid = wf["workflow_id"].as_str().ok_or("no workflow")?.to_owned();
    println!("\nPOST /v1/workflows -> {status}, workflow {wid}");
    let mut signalled = false;
    for _ in 0..6_000 {
        let (s, _) = client
            .call(
                "POST",
                &format!("/v1/workflows/{wid}/signals/approve"),
                Some(json!({"by": "editor"})),
            )
            .await?;
        if s == 202 {
            signalled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if !signalled {
        return Err("the workflow never waited for its approval".into());
    }
    let mut phase = Value::Null;
    for _ in 0..6_000 {
        let (_, w) = client
            .call("GET", &format!("/v1/workflows/{wid}"), None)
            .await?;
        phase = w["phase"].clone();
        if phase == "Completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("    signal `approve` delivered; workflow {phase}");

    // ANCHOR: errors
    println!("\nwhat a client meets when something is wrong:");
    for (what, method, path, body) in [
        (
            "a missing field",
            "POST",
            "/v1/tasks".to_owned(),
            json!({"priority": 1}),
        ),
        (
            "an unknown task",
            "GET",
            "/v1/tasks/4711".to_owned(),
            Value::Null,
        ),
        (
            "a second turn too early",
            "POST",
            format!("/v1/sessions/{id}/messages"),
            json!({"content": "?"}),
        ),
    ] {
        let body = (!body.is_null()).then_some(body);
        if what.starts_with("a second") {
            client.call(method, &path, body.clone()).await?;
        }
        let (status, err) = client.call(method, &path, body).await?;
        println!("    {what:<24} -> {status} {}", err["error"]["message"]);
    }
    // ANCHOR_END: errors
    gateway.shutdown().await?;
    println!("\ngateway stopped; journal flushed");
    Ok(())
}

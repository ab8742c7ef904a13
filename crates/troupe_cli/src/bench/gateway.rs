//! The gateway suite (loopback only, bounded in count and time): a gateway
//! with an fsync journal holds 1,000 SSE streams, one per session, while
//! clients submit inference tasks and session messages; every submission
//! is timed to its `202 Accepted`. The nearest baseline, measured in the
//! same run: a bare axum handler that journals one event with the same
//! durability and answers 202.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use troupe_gateway::{GatewayConfig, ModelConfig, Server};
use troupe_journal::{Durability, Journal, NewEvent, PersistenceId, RocksConfig, RocksJournal};

use super::{Report, rss_kib};

type BoxError = Box<dyn std::error::Error>;

const STREAMS: usize = 1_000;
const SUBMITTERS: usize = 64;

#[derive(serde::Serialize, serde::Deserialize)]
struct Accepted {
    n: u64,
}

impl troupe_journal::Schema for Accepted {
    const TYPE_NAME: &'static str = "bench.Accepted";
}

/// Sends `n` POSTs from `SUBMITTERS` clients; returns (accepted per second,
/// p99 ms, errors).
async fn submit(
    http: &reqwest::Client,
    urls: Arc<Vec<(String, serde_json::Value)>>,
    token: Option<&str>,
) -> (f64, f64, u64) {
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..SUBMITTERS {
        let (http, urls, next, errors) = (http.clone(), urls.clone(), next.clone(), errors.clone());
        let token = token.map(str::to_owned);
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some((url, body)) = urls.get(i) else {
                    break;
                };
                let mut req = http.post(url).json(body).timeout(Duration::from_secs(30));
                if let Some(t) = &token {
                    req = req.bearer_auth(t);
                }
                let t = Instant::now();
                match req.send().await {
                    Ok(r) if r.status() == reqwest::StatusCode::ACCEPTED => {
                        lat.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await.unwrap_or_default());
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let p99 = lat
        .get(((lat.len().max(1) - 1) as f64 * 0.99).round() as usize)
        .copied()
        .unwrap_or(0.0);
    (
        lat.len() as f64 / elapsed,
        p99,
        errors.load(Ordering::Relaxed),
    )
}

pub fn run(quick: bool) -> Result<(), BoxError> {
    let report = Report;
    let tasks = if quick { 2_000 } else { 10_000 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let base = tempfile::Builder::new().prefix("troupe-bench-").tempdir()?;
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(SUBMITTERS)
            .build()?;

        // Baseline: a bare axum handler that journals one event per request.
        let raw_journal = RocksJournal::open(
            RocksConfig::new(base.path().join("raw")).durability(Durability::Fsync),
        )?;
        let counter = Arc::new(AtomicU64::new(0));
        let app = axum::Router::new().route(
            "/t",
            axum::routing::post({
                let (j, c) = (raw_journal.clone(), counter.clone());
                move |axum::Json(_body): axum::Json<serde_json::Value>| {
                    let (j, c) = (j.clone(), c.clone());
                    async move {
                        let n = c.fetch_add(1, Ordering::Relaxed);
                        let id = PersistenceId::new("task", &format!("{n:x}")).expect("id");
                        let ev = NewEvent::new(&Accepted { n }).expect("event");
                        match j.append(&id, 0, vec![ev]).await {
                            Ok(_) => axum::http::StatusCode::ACCEPTED,
                            Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        }
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let raw_addr = listener.local_addr()?;
        let raw_server = tokio::spawn(async move { axum::serve(listener, app).await });
        let body = json!({ "prompt": "summarize the last order" });
        let raw_urls: Arc<Vec<_>> = Arc::new(
            (0..tasks)
                .map(|_| (format!("http://{raw_addr}/t"), body.clone()))
                .collect(),
        );
        let (raw, raw_p99, raw_errors) = submit(&http, raw_urls, None).await;
        raw_server.abort();
        raw_journal.close().await;

        // The gateway, with 1,000 SSE streams open.
        let mut config = GatewayConfig {
            listen: "127.0.0.1:0".parse()?,
            data_dir: base.path().join("gateway"),
            heartbeat_ms: 1_000,
            task_queue: tasks * 2,
            task_workers: 128,
            model: ModelConfig::Local {
                words: 12,
                chunk_ms: 0,
            },
            ..GatewayConfig::default()
        };
        config.gpus.force_simulated = true;
        config.gpus.simulated = 4;
        config.gpus.lease_memory_mib = 256;
        config.gpus.lease_compute_pct = 1;
        config.degrade.refuse_lowest_above_pct = 100;
        config.degrade.top_only_above_pct = 100;
        // One client, the anonymous tenant: its quota must hold the load.
        config.quota.max_tasks = tasks * 2;
        config.quota.max_streams = STREAMS * 2;
        config.http.max_streams = STREAMS * 2;
        config.http.max_connections = STREAMS * 4;
        let gw = Server::start(config).await?;
        let url = format!("http://{}", gw.addr());
        let mut sessions = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS {
            let r: serde_json::Value = http
                .post(format!("{url}/v1/sessions"))
                .send()
                .await?
                .json()
                .await?;
            sessions.push(r["id"].as_str().ok_or("no session id")?.to_owned());
        }
        let stream_errors = Arc::new(AtomicU64::new(0));
        let events = Arc::new(AtomicU64::new(0));
        let sse = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()?;
        let mut streams = Vec::with_capacity(STREAMS);
        for id in &sessions {
            let resp = sse
                .get(format!("{url}/v1/sessions/{id}/events"))
                .send()
                .await?;
            if !resp.status().is_success() {
                stream_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let (errors, events) = (stream_errors.clone(), events.clone());
            streams.push(tokio::spawn(async move {
                let mut body = resp.bytes_stream();
                while let Some(chunk) = body.next().await {
                    match chunk {
                        Ok(b) => {
                            let n = b
                                .windows(4)
                                .filter(|w| w == b"id: " || w == b"id:1")
                                .count();
                            events.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            }));
        }
        eprintln!("gateway: {STREAMS} SSE streams open; submitting {tasks} tasks and messages");
        // Every 10th submission is a message to a session (its stream sees
        // the turn); the rest are inference tasks.
        let urls: Arc<Vec<_>> = Arc::new(
            (0..tasks)
                .map(|i| {
                    if i % 10 == 0 && i / 10 < STREAMS {
                        (
                            format!("{url}/v1/sessions/{}/messages", sessions[i / 10]),
                            json!({ "content": "where is my order?" }),
                        )
                    } else {
                        (format!("{url}/v1/tasks"), body.clone())
                    }
                })
                .collect(),
        );
        let (accepted, p99, errors) = submit(&http, urls, None).await;
        // Let the work finish (bounded), then check the streams stayed up.
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let done = streams.iter().filter(|s| s.is_finished()).count();
            let metrics = http
                .get(format!("{url}/metrics"))
                .send()
                .await?
                .text()
                .await?;
            let finished: f64 = metrics
                .lines()
                .filter(|l| l.starts_with("troupe_gateway_tasks_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if finished as usize >= tasks || done > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rss = rss_kib().unwrap_or(0) as f64 / 1024.0;
        let closed_early = streams.iter().filter(|s| s.is_finished()).count() as u64;
        report.figure("gateway_accepted", accepted, "tasks/s");
        report.figure("gateway_accept_p99", p99, "ms");
        report.figure(
            "gateway_errors",
            (errors + stream_errors.load(Ordering::Relaxed) + closed_early) as f64,
            "count",
        );
        report.figure("gateway_rss", rss, "MiB");
        report.figure(
            "gateway_sse_events_delivered",
            events.load(Ordering::Relaxed) as f64,
            "events",
        );
        report.figure("raw_axum_journal_accepted", raw, "requests/s");
        report.figure("raw_axum_journal_p99", raw_p99, "ms");
        report.figure("raw_axum_journal_errors", raw_errors as f64, "count");
        report.ratio("gateway_accepted", accepted, raw);
        for s in streams {
            s.abort();
        }
        gw.shutdown().await?;
        Ok::<_, BoxError>(())
    })
}

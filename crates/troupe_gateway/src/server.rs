//! What lives below a router: the accept loop, the connection cap, the
//! header-read and write time-outs, graceful shutdown.
//!
//! `axum::serve` has none of these settings, and a server without them
//! falls to the cheapest attacks: a client that sends one header byte a
//! second holds a connection forever (slowloris, before any token is
//! checked), and one that stops reading an event stream parks its writer.
//! [`serve`] runs hyper's HTTP/1 connection directly, with
//!
//! | bound | setting | past it |
//! |---|---|---|
//! | connections open at once | `http.max_connections` | new ones wait in the listen backlog |
//! | time to send a request's headers, and idle time between kept-alive requests | `http.header_read_timeout_ms` | the connection is closed |
//! | time a write waits for the client to read | `http.write_timeout_ms` | the connection is closed (its event stream ends) |
//! | request header size | 64 KiB | 431 |

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;

use crate::config::HttpSection;

/// Largest request head (start line and headers) a client may send.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Raises this process's open-file limit (the soft one, up to the hard
/// one) so that `connections` sockets fit beside the journal's files; a
/// default soft limit of 1,024 would otherwise refuse connections well
/// before `http.max_connections`. Returns the limit now in force.
pub fn fit_open_files(connections: usize) -> Option<u64> {
    #[cfg(unix)]
    {
        let want = connections as u64 + 1_024;
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit read and write the struct given.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return None;
            }
            if lim.rlim_cur < want {
                let cur = lim.rlim_cur;
                lim.rlim_cur = want.min(lim.rlim_max);
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    lim.rlim_cur = cur;
                }
            }
        }
        if lim.rlim_cur < want {
            tracing::warn!(
                limit = lim.rlim_cur,
                wanted = want,
                "the open-file limit is below http.max_connections: raise it (ulimit -n) or lower the setting"
            );
        }
        Some(lim.rlim_cur)
    }
    #[cfg(not(unix))]
    {
        let _ = connections;
        None
    }
}

/// The connection-level limits of [`serve`], from an [`HttpSection`].
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Header-read (and keep-alive idle) time-out.
    pub header_read_timeout: Duration,
    /// Write time-out.
    pub write_timeout: Duration,
    /// Kernel send buffer per connection (`None`: the system's).
    pub send_buffer_bytes: Option<usize>,
}

impl From<&HttpSection> for ServeLimits {
    fn from(h: &HttpSection) -> Self {
        Self {
            max_connections: h.max_connections.max(1),
            header_read_timeout: Duration::from_millis(h.header_read_timeout_ms.max(1)),
            write_timeout: Duration::from_millis(h.write_timeout_ms.max(1)),
            send_buffer_bytes: h.send_buffer_bytes,
        }
    }
}

impl Default for ServeLimits {
    fn default() -> Self {
        (&HttpSection::default()).into()
    }
}

/// Serves `router` on `listener` with `limits` until `stop` resolves, then
/// stops accepting and waits for in-flight requests to finish (bound that
/// wait yourself: an event stream ends only when its client leaves;
/// dropping the returned future closes every connection).
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ServeLimits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let open = metrics::gauge!("troupe_gateway_connections");
    let mut stop: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(stop);
    loop {
        while connections.try_join_next().is_some() {}
        // A slot first: at the cap, connections wait in the backlog.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => tcp,
                Err(e) => {
                    // Out of file descriptors, a connection reset before
                    // it was accepted: not the listener's end.
                    tracing::warn!(error = %e, "accept failed");
                    metrics::counter!("troupe_gateway_accept_errors_total").increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = tcp.set_nodelay(true);
        if let Some(n) = limits.send_buffer_bytes {
            let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(n);
        }
        let mut io = TimeoutStream::new(tcp);
        io.set_write_timeout(Some(limits.write_timeout));
        let io = TokioIo::new(Box::pin(io));
        let conn = http.serve_connection(io, TowerToHyperService::new(router.clone()));
        let conn = graceful.watch(conn);
        let guard = Open::new(open.clone(), slot);
        connections.spawn(async move {
            if let Err(e) = conn.await {
                let kind = if e.is_timeout() {
                    "header_timeout"
                } else if e.is_parse() || e.is_parse_too_large() {
                    "malformed"
                } else {
                    "io"
                };
                tracing::debug!(error = %e, kind, "connection closed");
                metrics::counter!("troupe_gateway_connections_cut_total", "reason" => kind)
                    .increment(1);
            }
            drop(guard);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// A connection's slot and its count in `troupe_gateway_connections`,
/// given back however its task ends (closed, or aborted by a shutdown).
struct Open {
    gauge: metrics::Gauge,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Open {
    fn new(gauge: metrics::Gauge, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        gauge.increment(1.0);
        Self { gauge, _slot: slot }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

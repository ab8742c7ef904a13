//! `troupe serve`: the gateway, with logs, until a signal.

use std::path::Path;
use std::process::ExitCode;

use troupe_gateway::{GatewayConfig, LogFormat, Server};

pub fn run(config: Option<&Path>) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let config = match config {
        Some(path) => GatewayConfig::load(path)?,
        None => GatewayConfig::default(),
    };
    crate::init_logs("info", config.log_format == LogFormat::Json);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let gateway = Server::start(config).await?;
        eprintln!("troupe gateway listening on http://{}", gateway.addr());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down: draining requests and flushing the journal");
        gateway.shutdown().await?;
        Ok::<_, Box<dyn std::error::Error>>(ExitCode::SUCCESS)
    })
}

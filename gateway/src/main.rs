//! `apollo-gateway` binary: parse flags, set up logging and the shutdown signal, run.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use apollo_gateway::{Args, Settings};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on the first SIGINT or SIGTERM.
fn watch_signals(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot watch SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        shutdown.cancel();
    });
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let format = args
        .log_format
        .parse()
        .unwrap_or(apollo_telemetry::LogFormat::Text);
    // Exports spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set; flushed when dropped.
    let _telemetry = apollo_telemetry::init("apollo-gateway", format);
    let settings = match Settings::from_args(&args) {
        Ok(settings) => settings,
        Err(error) => {
            tracing::error!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    watch_signals(shutdown.clone());
    match apollo_gateway::run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

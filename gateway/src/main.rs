//! `apollo-gateway` binary: parse flags, set up logging and the shutdown signal, run.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use apollo_gateway::{Args, Settings};
use clap::Parser;
use tokio_util::sync::CancellationToken;

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
    if let Err(error) = apollo_runtime::cancel_on_signals(shutdown.clone()) {
        tracing::error!(%error, "cannot install the SIGTERM/SIGINT handlers");
        return ExitCode::FAILURE;
    }
    match apollo_gateway::run(settings, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

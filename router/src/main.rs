//! `apollo-router` binary: parse flags, set up logging, run until SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = apollo_router::Args::parse();
    let format = args
        .log_format
        .parse()
        .unwrap_or(apollo_telemetry::LogFormat::Text);
    let _telemetry = apollo_telemetry::init("apollo-router", format);
    let shutdown = CancellationToken::new();
    if let Err(error) = apollo_runtime::cancel_on_signals(shutdown.clone()) {
        tracing::error!(%error, "cannot install the SIGTERM/SIGINT handlers");
        eprintln!("apollo-router: cannot install the SIGTERM/SIGINT handlers: {error}");
        return std::process::ExitCode::FAILURE;
    }
    match apollo_router::run(args, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "apollo-router failed");
            eprintln!("apollo-router: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

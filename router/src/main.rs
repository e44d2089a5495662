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
    tokio::spawn(forward_signals(shutdown.clone()));
    match apollo_router::run(args, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "apollo-router failed");
            eprintln!("apollo-router: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One shutdown source: the first SIGTERM or SIGINT cancels the token.
async fn forward_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}

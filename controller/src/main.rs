//! `apollo-controller`: keeps one DeviceProcess per NetworkSwitch selected by each
//! DeviceProcessDeployment.
#![forbid(unsafe_code)]

use anyhow::Context as _;
use apollo_controller::args::{Args, LogFormat};
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let format = match args.log_format {
        LogFormat::Text => apollo_telemetry::LogFormat::Text,
        LogFormat::Json => apollo_telemetry::LogFormat::Json,
    };
    // Logs to stderr; spans over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let _telemetry = apollo_telemetry::init("apollo-controller", format);
    args.validate().map_err(anyhow::Error::msg)?;

    let shutdown = CancellationToken::new();
    apollo_runtime::cancel_on_signals(shutdown.clone())
        .context("installing the SIGTERM/SIGINT handlers")?;
    apollo_controller::run(args, shutdown)
        .await
        .context("apollo-controller failed")
}

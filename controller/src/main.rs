//! `apollo-controller`: keeps one DeviceProcess per NetworkSwitch selected by each
//! DeviceProcessDeployment.
#![forbid(unsafe_code)]

use anyhow::Context as _;
use apollo_controller::args::{Args, LogFormat};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    args.validate().map_err(anyhow::Error::msg)?;

    let shutdown = CancellationToken::new();
    apollo_controller::run::cancel_on_signal(shutdown.clone());
    apollo_controller::run(args, shutdown)
        .await
        .context("apollo-controller failed")
}

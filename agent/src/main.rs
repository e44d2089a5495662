//! `apollo-agent`: one device agent, configured from the environment (or the equivalent flags).
//! Exit codes: 0 after SIGTERM/SIGINT, 2 for missing or invalid configuration, 1 otherwise.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use apollo_agent::config::{
    ENV_BACKOFF_BASE_MS, ENV_BACKOFF_MAX_SECONDS, ENV_DEVICE_NAME, ENV_DEVICE_TOKEN,
    ENV_DEVICE_TOKEN_FILE, ENV_GATEWAY_URL, ENV_HEARTBEAT_INTERVAL_SECONDS,
    ENV_MIN_POLL_INTERVAL_MS, ENV_POLL_WAIT_SECONDS, ENV_REQUEST_TIMEOUT_SECONDS,
};
use apollo_agent::{Agent, AgentConfig, AgentMetrics, RawConfig};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Values are validated by the library, not by clap, so that every configuration error is one
/// line naming the environment variable to fix.
#[derive(Debug, Parser)]
#[command(name = "apollo-agent", version, about = "Apollo device agent")]
struct Args {
    /// Name of this device (its NetworkSwitch object name). Required.
    #[arg(long, env = ENV_DEVICE_NAME)]
    device_name: Option<String>,
    /// Base URL of the gateway or router [default: http://127.0.0.1:8080].
    #[arg(long, env = ENV_GATEWAY_URL)]
    gateway_url: Option<String>,
    /// Device token (HMAC of the device name); prefer the file form.
    #[arg(long, env = ENV_DEVICE_TOKEN, hide_env_values = true)]
    device_token: Option<String>,
    /// File holding the device token.
    #[arg(long, env = ENV_DEVICE_TOKEN_FILE)]
    device_token_file: Option<String>,
    /// Long-poll wait in seconds, 0..=60 [default: 30].
    #[arg(long, env = ENV_POLL_WAIT_SECONDS)]
    poll_wait_seconds: Option<String>,
    /// Heartbeat interval until the gateway announces one [default: 15].
    #[arg(long, env = ENV_HEARTBEAT_INTERVAL_SECONDS)]
    heartbeat_interval_seconds: Option<String>,
    /// Shortest spacing between unchanged polls, in milliseconds [default: 1000].
    #[arg(long, env = ENV_MIN_POLL_INTERVAL_MS)]
    min_poll_interval_ms: Option<String>,
    /// Timeout of connect and report calls, in seconds [default: 10].
    #[arg(long, env = ENV_REQUEST_TIMEOUT_SECONDS)]
    request_timeout_seconds: Option<String>,
    /// Ceiling of the first retry wait, in milliseconds [default: 500].
    #[arg(long, env = ENV_BACKOFF_BASE_MS)]
    backoff_base_ms: Option<String>,
    /// Largest retry wait, in seconds [default: 30].
    #[arg(long, env = ENV_BACKOFF_MAX_SECONDS)]
    backoff_max_seconds: Option<String>,
}

impl Args {
    fn into_raw(self) -> RawConfig {
        RawConfig {
            device_name: self.device_name,
            gateway_url: self.gateway_url,
            device_token: self.device_token,
            device_token_file: self.device_token_file,
            poll_wait_seconds: self.poll_wait_seconds,
            heartbeat_interval_seconds: self.heartbeat_interval_seconds,
            min_poll_interval_ms: self.min_poll_interval_ms,
            request_timeout_seconds: self.request_timeout_seconds,
            backoff_base_ms: self.backoff_base_ms,
            backoff_max_seconds: self.backoff_max_seconds,
        }
    }
}

/// How long shutdown waits for stray blocking work (a DNS lookup) before exiting anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

fn main() -> ExitCode {
    let mut config = match AgentConfig::from_raw(&Args::parse().into_raw()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("apollo-agent: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    // Logs to stderr; with the standard OTEL_* variables each report is also an exported span
    // (`agent.report`), the root of the trace the router and gateway continue.
    let telemetry = apollo_telemetry::init("apollo-agent", apollo_telemetry::LogFormat::Text);
    if telemetry.exporting() {
        config.traceparent_source = Some(apollo_telemetry::current_traceparent);
    }

    // One agent needs one thread; a device has better uses for its cores.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("apollo-agent: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(config));
    // Dropping a runtime waits for blocking tasks without limit; shutdown must stay prompt.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    // Flushes the spans of the last reports.
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("apollo-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let signals =
        apollo_runtime::cancel_on_signals(cancel.clone()).context("installing signal handlers")?;
    let agent = Agent::new(
        config,
        apollo_agent::http_client()?,
        Arc::new(AgentMetrics::default()),
    )?;
    tracing::info!(
        device = %agent.config().device_name,
        gateway = %agent.config().gateway_url,
        "apollo-agent starting"
    );
    agent.run(cancel).await;
    signals.abort();
    tracing::info!("apollo-agent stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn args_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn flags_map_onto_raw_config() {
        let args = Args::try_parse_from([
            "apollo-agent",
            "--device-name",
            "tor1-01",
            "--poll-wait-seconds",
            "5",
        ])
        .expect("parse");
        let raw = args.into_raw();
        assert_eq!(raw.device_name.as_deref(), Some("tor1-01"));
        assert_eq!(raw.poll_wait_seconds.as_deref(), Some("5"));
    }
}

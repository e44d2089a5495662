//! `apollo-agent`: one device agent, configured from the environment (or the equivalent flags).
//! Exit codes: 0 after SIGTERM/SIGINT, 2 for missing or invalid configuration, 1 otherwise.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use apollo_agent::config::{
    ENV_BACKOFF_BASE, ENV_BACKOFF_BASE_MS, ENV_BACKOFF_MAX, ENV_BACKOFF_MAX_SECONDS,
    ENV_DEVICE_NAME, ENV_DEVICE_TOKEN, ENV_DEVICE_TOKEN_FILE, ENV_GATEWAY_URL,
    ENV_HEARTBEAT_INTERVAL, ENV_HEARTBEAT_INTERVAL_SECONDS, ENV_MIN_POLL_INTERVAL,
    ENV_MIN_POLL_INTERVAL_MS, ENV_POLL_WAIT, ENV_POLL_WAIT_SECONDS, ENV_REQUEST_TIMEOUT,
    ENV_REQUEST_TIMEOUT_SECONDS,
};
use apollo_agent::{Agent, AgentConfig, AgentMetrics, RawConfig};
use apollo_runtime::shell::{self, Failure, LogArgs};
use clap::Parser;
use tokio_util::sync::CancellationToken;

const PROGRAM: &str = "apollo-agent";

/// Values are validated by the library, not by clap, so that every configuration error is one
/// line naming the environment variable to fix. Durations take the shared syntax (`500ms`, `15s`,
/// `2m`); the old `*_SECONDS` / `*_MS` spellings stay accepted (hidden), a bare number in their
/// unit.
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
    /// Long-poll wait, whole seconds up to 60s (0 turns long polling off) [default: 30s].
    #[arg(long, env = ENV_POLL_WAIT)]
    poll_wait: Option<String>,
    /// Heartbeat interval until the gateway announces one, 1s..1h [default: 15s].
    #[arg(long, env = ENV_HEARTBEAT_INTERVAL)]
    heartbeat_interval: Option<String>,
    /// Shortest spacing between unchanged polls, 10ms..10m [default: 1s].
    #[arg(long, env = ENV_MIN_POLL_INTERVAL)]
    min_poll_interval: Option<String>,
    /// Timeout of connect and report calls, 1s..10m [default: 10s].
    #[arg(long, env = ENV_REQUEST_TIMEOUT)]
    request_timeout: Option<String>,
    /// Ceiling of the first retry wait, 10ms..1m [default: 500ms].
    #[arg(long, env = ENV_BACKOFF_BASE)]
    backoff_base: Option<String>,
    /// Largest retry wait, 1s..1h [default: 30s].
    #[arg(long, env = ENV_BACKOFF_MAX)]
    backoff_max: Option<String>,
    /// Old spelling of --poll-wait: seconds.
    #[arg(long, env = ENV_POLL_WAIT_SECONDS, hide = true)]
    poll_wait_seconds: Option<String>,
    /// Old spelling of --heartbeat-interval: seconds.
    #[arg(long, env = ENV_HEARTBEAT_INTERVAL_SECONDS, hide = true)]
    heartbeat_interval_seconds: Option<String>,
    /// Old spelling of --min-poll-interval: milliseconds.
    #[arg(long, env = ENV_MIN_POLL_INTERVAL_MS, hide = true)]
    min_poll_interval_ms: Option<String>,
    /// Old spelling of --request-timeout: seconds.
    #[arg(long, env = ENV_REQUEST_TIMEOUT_SECONDS, hide = true)]
    request_timeout_seconds: Option<String>,
    /// Old spelling of --backoff-base: milliseconds.
    #[arg(long, env = ENV_BACKOFF_BASE_MS, hide = true)]
    backoff_base_ms: Option<String>,
    /// Old spelling of --backoff-max: seconds.
    #[arg(long, env = ENV_BACKOFF_MAX_SECONDS, hide = true)]
    backoff_max_seconds: Option<String>,
    #[command(flatten)]
    log: LogArgs,
}

impl Args {
    fn into_raw(self) -> RawConfig {
        RawConfig {
            device_name: self.device_name,
            gateway_url: self.gateway_url,
            device_token: self.device_token,
            device_token_file: self.device_token_file,
            poll_wait: self.poll_wait,
            heartbeat_interval: self.heartbeat_interval,
            min_poll_interval: self.min_poll_interval,
            request_timeout: self.request_timeout,
            backoff_base: self.backoff_base,
            backoff_max: self.backoff_max,
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
    let args = Args::parse();
    let log = args.log;
    // Checked before logging starts, so a bad value is exactly one line on stderr.
    let mut config = match AgentConfig::from_raw(&args.into_raw()) {
        Ok(config) => config,
        Err(error) => return shell::exit(PROGRAM, Err(Failure::config(error))),
    };
    // Logs to stderr; with the standard OTEL_* variables each report is also an exported span
    // (`agent.report`), the root of the trace the router and gateway continue.
    let telemetry = log.init(PROGRAM);
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
            return shell::exit(
                PROGRAM,
                Err(Failure::runtime(format!("starting the runtime: {error}"))),
            )
        }
    };
    let result = runtime.block_on(run(config));
    // Dropping a runtime waits for blocking tasks without limit; shutdown must stay prompt.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    let status = shell::exit(
        PROGRAM,
        result.map_err(|error| Failure::runtime(format!("{error:#}"))),
    );
    // Flushes the spans of the last reports.
    drop(telemetry);
    status
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
    fn log_format_is_the_shared_flag_and_refuses_unknown_formats() {
        let args = Args::try_parse_from(["apollo-agent", "--log-format", "json"]).expect("parse");
        assert_eq!(args.log.log_format, apollo_runtime::shell::LogFormat::Json);
        let error =
            Args::try_parse_from(["apollo-agent", "--log-format", "bogus"]).expect_err("refused");
        assert_eq!(error.exit_code(), 2);
        assert!(
            error.to_string().contains("[possible values: text, json]"),
            "{error}"
        );
    }

    #[test]
    fn old_spellings_are_hidden_but_accepted() {
        let args = Args::try_parse_from([
            "apollo-agent",
            "--poll-wait",
            "5s",
            "--min-poll-interval-ms",
            "100",
        ])
        .expect("parse");
        let raw = args.into_raw();
        assert_eq!(raw.poll_wait.as_deref(), Some("5s"));
        assert_eq!(raw.min_poll_interval_ms.as_deref(), Some("100"));
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("[env: APOLLO_POLL_WAIT="), "{help}");
        assert!(!help.contains("_SECONDS"), "{help}");
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

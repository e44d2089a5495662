//! The process shell every Apollo binary shares (in the spirit of kubert's `Runtime`): argument
//! groups flattened into each binary's `Args`, logging set up from them, the one shutdown signal,
//! and one way to end the process.
//!
//! ```no_run
//! use apollo_runtime::shell::{self, Failure, LogArgs};
//! use clap::Parser;
//!
//! #[derive(Parser)]
//! struct Args {
//!     #[command(flatten)]
//!     log: LogArgs,
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::process::ExitCode {
//!     let args = Args::parse();
//!     shell::run("apollo-example", args.log, |shutdown| async move {
//!         shutdown.cancelled().await;
//!         Ok::<(), Failure>(())
//!     })
//!     .await
//! }
//! ```
//!
//! - [`LogArgs`]: `--log-format text|json` (`APOLLO_LOG_FORMAT`); an unknown format is a usage
//!   error naming the accepted ones.
//! - `AdminArgs` and `admin::router` (feature `admin`): `--admin-listen` and the one admin router
//!   (`/healthz`, `/readyz` with a JSON body, `/metrics`).
//! - `KubeArgs` (feature `kube-client`): `--kubeconfig`, and the client built from it.
//! - [`Failure`], [`exit`] and [`run`]: configuration errors end with status 2 (as clap's own
//!   usage errors do), failures while running with 1, the message on stderr and in the log.
//! - Durations use [`crate::duration`]'s syntax through its `DurationParser`, a clap value parser.

#[cfg(feature = "admin")]
pub mod admin;
#[cfg(feature = "kube-client")]
mod kube_args;

use std::fmt;
use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

#[cfg(feature = "admin")]
pub use admin::AdminArgs;
pub use apollo_telemetry::{Guard as TelemetryGuard, LogFormat};
#[cfg(feature = "kube-client")]
pub use kube_args::KubeArgs;

/// `--log-format`, shared by every binary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// Log line format on stderr. `RUST_LOG` filters (default `info`); with the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` spans are also exported over OTLP/HTTP.
    #[arg(long, env = "APOLLO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs logging (and span export when configured) for `program`; keep the guard for the
    /// life of the process, dropping it flushes spans.
    pub fn init(&self, program: &str) -> TelemetryGuard {
        apollo_telemetry::init(program, self.log_format)
    }

    /// [`LogArgs::init`] with another filter than `info` when `RUST_LOG` is unset.
    pub fn init_with_default_filter(&self, program: &str, filter: &str) -> TelemetryGuard {
        apollo_telemetry::init_with_default_filter(program, self.log_format, filter)
    }
}

/// Why a process ends with a non-zero status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The configuration is wrong: status 2, like clap's own usage errors.
    Config(String),
    /// Something failed while running: status 1.
    Runtime(String),
}

impl Failure {
    /// A configuration error (status 2).
    pub fn config(error: impl fmt::Display) -> Self {
        Self::Config(error.to_string())
    }

    /// A failure while running (status 1). `{:#}` of an `anyhow::Error` keeps its causes.
    pub fn runtime(error: impl fmt::Display) -> Self {
        Self::Runtime(error.to_string())
    }

    /// The exit status.
    pub fn status(&self) -> u8 {
        match self {
            Self::Config(_) => 2,
            Self::Runtime(_) => 1,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(message) => write!(f, "invalid configuration: {message}"),
            Self::Runtime(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Failure {}

/// Ends `main`: status 0 on `Ok`; otherwise the failure goes to the log (which may be JSON read
/// by machines, or not set up yet) and to stderr as one `program: message` line for people, and
/// the process ends with the failure's status.
pub fn exit(program: &str, result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            tracing::error!(status = failure.status(), "{failure}");
            eprintln!("{program}: {failure}");
            ExitCode::from(failure.status())
        }
    }
}

/// Runs `main` as `program`: logging from `log`, the SIGTERM/SIGINT handlers cancelling the
/// token `main` is given, then [`exit`] with its result (spans flushed last). Must be called
/// inside a Tokio runtime.
pub async fn run<F, Fut>(program: &str, log: LogArgs, main: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let telemetry = log.init(program);
    let shutdown = CancellationToken::new();
    let result = match crate::cancel_on_signals(shutdown.clone()) {
        Ok(_signals) => main(shutdown).await,
        Err(error) => Err(Failure::runtime(format!(
            "cannot install the SIGTERM/SIGINT handlers: {error}"
        ))),
    };
    let status = exit(program, result);
    drop(telemetry);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    #[command(name = "apollo-test")]
    struct Args {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn args_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn log_format_is_text_json_or_a_usage_error() {
        let args = Args::try_parse_from(["apollo-test"]).expect("parse");
        assert_eq!(args.log.log_format, LogFormat::Text);
        let args = Args::try_parse_from(["apollo-test", "--log-format", "json"]).expect("parse");
        assert_eq!(args.log.log_format, LogFormat::Json);
        let error = Args::try_parse_from(["apollo-test", "--log-format", "bogus"])
            .expect_err("an unknown format is refused");
        assert_eq!(error.kind(), clap::error::ErrorKind::InvalidValue);
        assert_eq!(error.exit_code(), 2);
        let message = error.to_string();
        assert!(message.contains("'bogus'"), "{message}");
        assert!(
            message.contains("[possible values: text, json]"),
            "{message}"
        );
    }

    const REFRESH: crate::duration::DurationParser = crate::duration::DurationParser::new()
        .at_least(std::time::Duration::from_millis(10))
        .at_most(std::time::Duration::from_secs(10));

    /// A duration flag with its old spelling kept as a hidden alias, as the binaries do it.
    #[derive(Debug, Parser)]
    #[command(name = "apollo-test")]
    struct Timed {
        /// How often.
        #[arg(long, env = "APOLLO_TEST_REFRESH", default_value = "250ms", value_parser = REFRESH)]
        refresh: std::time::Duration,
        /// Old spelling of --refresh: milliseconds.
        #[arg(long, env = "APOLLO_TEST_REFRESH_MS", hide = true, conflicts_with = "refresh",
              value_parser = REFRESH.bare_millis())]
        refresh_ms: Option<std::time::Duration>,
    }

    impl Timed {
        fn refresh(&self) -> std::time::Duration {
            self.refresh_ms.unwrap_or(self.refresh)
        }
    }

    #[test]
    fn a_duration_flag_keeps_its_old_spelling_as_a_hidden_alias() {
        use std::time::Duration;
        Timed::command().debug_assert();
        let parse = |argv: &[&str]| {
            Timed::try_parse_from(std::iter::once("apollo-test").chain(argv.iter().copied()))
        };
        assert_eq!(
            parse(&[]).expect("default").refresh(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse(&["--refresh", "2s"]).expect("new").refresh(),
            Duration::from_secs(2)
        );
        assert_eq!(
            parse(&["--refresh-ms", "100"]).expect("old").refresh(),
            Duration::from_millis(100)
        );
        let both = parse(&["--refresh", "2s", "--refresh-ms", "100"]).expect_err("both");
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
        let bounds = parse(&["--refresh", "20s"]).expect_err("too long");
        assert_eq!(bounds.kind(), clap::error::ErrorKind::ValueValidation);
        let message = bounds.to_string();
        assert!(message.contains("--refresh"), "{message}");
        assert!(message.contains("10s"), "{message}");
        assert!(
            parse(&["--refresh-ms", "5"]).is_err(),
            "the alias keeps the bounds"
        );
        let help = Timed::command().render_long_help().to_string();
        assert!(help.contains("--refresh <REFRESH>"), "{help}");
        assert!(!help.contains("refresh-ms"), "{help}");
    }

    #[test]
    fn failures_carry_their_status_and_message() {
        let config = Failure::config("--ordinal 3 must be below --replicas 3");
        assert_eq!(config.status(), 2);
        assert_eq!(
            config.to_string(),
            "invalid configuration: --ordinal 3 must be below --replicas 3"
        );
        let runtime = Failure::runtime("cannot listen on 127.0.0.1:1");
        assert_eq!(runtime.status(), 1);
        assert_eq!(runtime.to_string(), "cannot listen on 127.0.0.1:1");
        assert_eq!(exit("apollo-test", Ok(())), ExitCode::SUCCESS);
        assert_eq!(exit("apollo-test", Err(config)), ExitCode::from(2));
        assert_eq!(exit("apollo-test", Err(runtime)), ExitCode::from(1));
    }
}

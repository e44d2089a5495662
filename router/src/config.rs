//! Command line of `apollo-router`. Every flag can also be set through its `APOLLO_*` variable.
//! Durations take the shared syntax (`250ms`, `5s`); the old `--*-ms` / `--drain-seconds`
//! spellings and their variables stay accepted, hidden, a bare number in their old unit.

use std::net::SocketAddr;
use std::time::Duration;

use apollo_runtime::duration::DurationParser;
use apollo_runtime::shell::{AdminArgs, LogArgs};
use clap::Parser;

const MEMBERSHIP_REFRESH: DurationParser = DurationParser::new()
    .at_least(Duration::from_millis(10))
    .at_most(Duration::from_secs(10));
const UPSTREAM_CONNECT_TIMEOUT: DurationParser = DurationParser::new()
    .at_least(Duration::from_millis(10))
    .at_most(Duration::from_secs(30));
const FALLBACK_HOLD: DurationParser = DurationParser::new().at_most(Duration::from_secs(60));
const DRAIN: DurationParser = DurationParser::new().at_most(Duration::from_secs(120));
const HEADER_READ_TIMEOUT: DurationParser = DurationParser::new()
    .at_least(Duration::from_millis(100))
    .at_most(Duration::from_secs(300));
const BODY_READ_TIMEOUT: DurationParser = DurationParser::new()
    .at_least(Duration::from_millis(100))
    .at_most(Duration::from_secs(300));
const IDLE_TIMEOUT: DurationParser = DurationParser::new()
    .at_least(Duration::from_secs(1))
    .at_most(Duration::from_secs(3600));

/// Consistent-hash L7 router in front of the Apollo gateway replicas.
#[derive(Parser, Debug, Clone)]
#[command(name = "apollo-router", version, about)]
pub struct Args {
    /// Address agents connect to (HTTP/1.1 and h2c).
    #[arg(long, env = "APOLLO_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub admin: AdminArgs,

    /// Redis holding the gateway membership (the same Redis the gateways use).
    #[arg(long, env = "APOLLO_REDIS_URL")]
    pub redis_url: String,

    /// How often the membership is re-read from Redis (10ms..10s).
    #[arg(long, env = "APOLLO_MEMBERSHIP_REFRESH", default_value = "250ms",
          value_parser = MEMBERSHIP_REFRESH)]
    membership_refresh: Duration,

    /// Connect timeout to a gateway replica (10ms..30s); past it the fallback is tried.
    #[arg(long, env = "APOLLO_UPSTREAM_CONNECT_TIMEOUT", default_value = "500ms",
          value_parser = UPSTREAM_CONNECT_TIMEOUT)]
    upstream_connect_timeout: Duration,

    /// After a replica fails a request, send its devices to the fallback for this long (up to
    /// 1m) without trying it first, until the membership shows it alive and healthy again.
    #[arg(long, env = "APOLLO_FALLBACK_HOLD", default_value = "2s", value_parser = FALLBACK_HOLD)]
    fallback_hold: Duration,

    /// On shutdown, how long in-flight requests (long polls) may take to finish (up to 2m).
    #[arg(long, env = "APOLLO_DRAIN", default_value = "5s", value_parser = DRAIN)]
    drain: Duration,

    /// HTTP/1.1: longest time from a connection's accept, or from the first byte of a request on a
    /// kept-alive one, until the request head is complete (100ms..5m); past it the connection is
    /// closed.
    #[arg(long, env = "APOLLO_HEADER_READ_TIMEOUT", default_value = "10s",
          value_parser = HEADER_READ_TIMEOUT)]
    pub header_read_timeout: Duration,

    /// Longest time to receive a request body once its head is in (100ms..5m); past it 408.
    #[arg(long, env = "APOLLO_BODY_READ_TIMEOUT", default_value = "10s",
          value_parser = BODY_READ_TIMEOUT)]
    pub body_read_timeout: Duration,

    /// A client connection with no request in flight is closed after this long (1s..1h):
    /// HTTP/2 GOAWAY, HTTP/1.1 close. Longer than clients keep idle connections (reqwest: 90s).
    #[arg(long, env = "APOLLO_IDLE_TIMEOUT", default_value = "2m", value_parser = IDLE_TIMEOUT)]
    pub idle_timeout: Duration,

    /// Most client connections open at once; past it new ones are closed on accept.
    #[arg(long, env = "APOLLO_MAX_CONNECTIONS", default_value_t = 50_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Largest request head in bytes (HTTP/1.1 read buffer, HTTP/2 header list), 8192..1048576;
    /// a larger one gets 431. The default is the gateway's own HTTP/2 header-list limit, so what
    /// the router forwards the gateway takes.
    #[arg(long, env = "APOLLO_MAX_HEADER_BYTES", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(8192..=1_048_576))]
    pub max_header_bytes: u32,

    /// Old spelling of --membership-refresh: milliseconds.
    #[arg(long, env = "APOLLO_MEMBERSHIP_REFRESH_MS", hide = true,
          conflicts_with = "membership_refresh", value_parser = MEMBERSHIP_REFRESH.bare_millis())]
    membership_refresh_ms: Option<Duration>,

    /// Old spelling of --upstream-connect-timeout: milliseconds.
    #[arg(long, env = "APOLLO_UPSTREAM_CONNECT_TIMEOUT_MS", hide = true,
          conflicts_with = "upstream_connect_timeout",
          value_parser = UPSTREAM_CONNECT_TIMEOUT.bare_millis())]
    upstream_connect_timeout_ms: Option<Duration>,

    /// Old spelling of --fallback-hold: milliseconds.
    #[arg(long, env = "APOLLO_FALLBACK_HOLD_MS", hide = true, conflicts_with = "fallback_hold",
          value_parser = FALLBACK_HOLD.bare_millis())]
    fallback_hold_ms: Option<Duration>,

    /// Old spelling of --drain: seconds.
    #[arg(long, env = "APOLLO_DRAIN_SECONDS", hide = true, conflicts_with = "drain",
          value_parser = DRAIN)]
    drain_seconds: Option<Duration>,

    #[command(flatten)]
    pub log: LogArgs,
}

impl Args {
    /// Membership refresh period.
    pub fn membership_refresh(&self) -> Duration {
        self.membership_refresh_ms
            .unwrap_or(self.membership_refresh)
    }

    /// Upstream connect timeout.
    pub fn upstream_connect_timeout(&self) -> Duration {
        self.upstream_connect_timeout_ms
            .unwrap_or(self.upstream_connect_timeout)
    }

    /// How long a failed replica is skipped.
    pub fn fallback_hold(&self) -> Duration {
        self.fallback_hold_ms.unwrap_or(self.fallback_hold)
    }

    /// Drain period on shutdown.
    pub fn drain(&self) -> Duration {
        self.drain_seconds.unwrap_or(self.drain)
    }

    /// Limits of the public listener.
    pub fn limits(&self) -> crate::listen::Limits {
        crate::listen::Limits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections as usize,
            max_header_bytes: self.max_header_bytes as usize,
            // Agents' long polls are multiplexed per client connection when they speak HTTP/2.
            max_concurrent_streams: 10_000,
            drain: self.drain(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn interface_flags_parse() {
        let a = Args::try_parse_from([
            "apollo-router",
            "--listen",
            "127.0.0.1:1",
            "--admin-listen",
            "127.0.0.1:2",
            "--redis-url",
            "redis://127.0.0.1:3/",
        ])
        .expect("parse");
        assert_eq!(a.listen.port(), 1);
        assert_eq!(a.admin.listen.port(), 2);
        assert_eq!(a.membership_refresh(), Duration::from_millis(250));
        assert_eq!(a.upstream_connect_timeout(), Duration::from_millis(500));
        assert_eq!(a.fallback_hold(), Duration::from_secs(2));
        assert_eq!(a.drain(), Duration::from_secs(5));
        let limits = a.limits();
        assert_eq!(limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(a.body_read_timeout, Duration::from_secs(10));
        assert_eq!(limits.idle_timeout, Duration::from_secs(120));
        assert_eq!(limits.max_connections, 50_000);
        assert_eq!(limits.max_header_bytes, 16_384);
    }

    #[test]
    fn hardening_flags_parse_and_keep_their_bounds() {
        let a = parse(&[
            "--header-read-timeout",
            "500ms",
            "--body-read-timeout",
            "2s",
            "--idle-timeout",
            "1m",
            "--max-connections",
            "10",
            "--max-header-bytes",
            "65536",
        ])
        .expect("parse");
        let limits = a.limits();
        assert_eq!(limits.header_read_timeout, Duration::from_millis(500));
        assert_eq!(a.body_read_timeout, Duration::from_secs(2));
        assert_eq!(limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(limits.max_connections, 10);
        assert_eq!(limits.max_header_bytes, 65_536);
        assert!(parse(&["--header-read-timeout", "10ms"]).is_err());
        assert!(parse(&["--idle-timeout", "2h"]).is_err());
        assert!(parse(&["--max-connections", "0"]).is_err());
        assert!(parse(&["--max-header-bytes", "100"]).is_err());
    }

    #[test]
    fn redis_url_is_required() {
        let err = Args::try_parse_from(["apollo-router"]).expect_err("must fail");
        assert!(err.to_string().contains("--redis-url"), "{err}");
    }

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(
            ["apollo-router", "--redis-url", "redis://127.0.0.1:3/"]
                .into_iter()
                .chain(extra.iter().copied()),
        )
    }

    #[test]
    fn durations_take_the_shared_syntax_and_old_spellings_their_old_units() {
        let a = parse(&[
            "--membership-refresh",
            "100ms",
            "--upstream-connect-timeout",
            "1s",
            "--fallback-hold",
            "0s",
            "--drain",
            "1m",
        ])
        .expect("new spellings");
        assert_eq!(a.membership_refresh(), Duration::from_millis(100));
        assert_eq!(a.upstream_connect_timeout(), Duration::from_secs(1));
        assert_eq!(a.fallback_hold(), Duration::ZERO);
        assert_eq!(a.drain(), Duration::from_secs(60));

        let a = parse(&[
            "--membership-refresh-ms",
            "100",
            "--upstream-connect-timeout-ms",
            "250",
            "--fallback-hold-ms",
            "0",
            "--drain-seconds",
            "7",
        ])
        .expect("old spellings");
        assert_eq!(a.membership_refresh(), Duration::from_millis(100));
        assert_eq!(a.upstream_connect_timeout(), Duration::from_millis(250));
        assert_eq!(a.fallback_hold(), Duration::ZERO);
        assert_eq!(a.drain(), Duration::from_secs(7));

        // The old spelling keeps the bounds: 5 ms is below the 10 ms floor.
        assert!(parse(&["--membership-refresh-ms", "5"]).is_err());
        assert!(parse(&["--membership-refresh", "20s"]).is_err());
        assert!(parse(&["--drain", "1s", "--drain-seconds", "1"]).is_err());
        let help = Args::command().render_long_help().to_string();
        assert!(!help.contains("-ms"), "{help}");
    }

    #[test]
    fn an_unknown_log_format_is_refused_naming_the_accepted_ones() {
        let error = parse(&["--log-format", "bogus"]).expect_err("refused");
        assert_eq!(error.exit_code(), 2);
        assert!(
            error.to_string().contains("[possible values: text, json]"),
            "{error}"
        );
    }
}

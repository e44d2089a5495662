//! Command line of `apollo-router`. Every flag can also be set through its `APOLLO_*` variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// Consistent-hash L7 router in front of the Apollo gateway replicas.
#[derive(Parser, Debug, Clone)]
#[command(name = "apollo-router", version, about)]
pub struct Args {
    /// Address agents connect to (HTTP/1.1 and h2c).
    #[arg(long, env = "APOLLO_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "APOLLO_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,

    /// Redis holding the gateway membership (the same Redis the gateways use).
    #[arg(long, env = "APOLLO_REDIS_URL")]
    pub redis_url: String,

    /// How often the membership is re-read from Redis, in milliseconds.
    #[arg(long, env = "APOLLO_MEMBERSHIP_REFRESH_MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(10..=10_000))]
    pub membership_refresh_ms: u64,

    /// Connect timeout to a gateway replica, in milliseconds; past it the fallback is tried.
    #[arg(long, env = "APOLLO_UPSTREAM_CONNECT_TIMEOUT_MS", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(10..=30_000))]
    pub upstream_connect_timeout_ms: u64,

    /// After a replica fails a request, send its devices to the fallback for this long (ms)
    /// without trying it first, until the membership shows it alive and healthy again.
    #[arg(long, env = "APOLLO_FALLBACK_HOLD_MS", default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub fallback_hold_ms: u64,

    /// On shutdown, how long in-flight requests (long polls) may take to finish, in seconds.
    #[arg(long, env = "APOLLO_DRAIN_SECONDS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=120))]
    pub drain_seconds: u64,

    /// Log format: `text` or `json`.
    #[arg(long, env = "APOLLO_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl Args {
    /// Membership refresh period.
    pub fn membership_refresh(&self) -> Duration {
        Duration::from_millis(self.membership_refresh_ms)
    }

    /// Upstream connect timeout.
    pub fn upstream_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_connect_timeout_ms)
    }

    /// How long a failed replica is skipped.
    pub fn fallback_hold(&self) -> Duration {
        Duration::from_millis(self.fallback_hold_ms)
    }

    /// Drain period on shutdown.
    pub fn drain(&self) -> Duration {
        Duration::from_secs(self.drain_seconds)
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
        assert_eq!(a.admin_listen.port(), 2);
        assert_eq!(a.membership_refresh(), Duration::from_millis(250));
    }

    #[test]
    fn redis_url_is_required() {
        let err = Args::try_parse_from(["apollo-router"]).expect_err("must fail");
        assert!(err.to_string().contains("--redis-url"), "{err}");
    }
}

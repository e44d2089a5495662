//! Command-line flags (each also an `APOLLO_*` environment variable) and the settings derived
//! from them ([`Settings`], in `config/settings.rs`). The shared groups (`--admin-listen`,
//! `--kubeconfig`, `--log-format`) come from the runtime's process shell. Durations take the
//! shared syntax (`500ms`, `15s`, `5m`); the old `--*-seconds` spellings and their
//! `APOLLO_*_SECONDS` variables stay accepted, hidden, a bare number (decimals allowed) in
//! seconds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use apollo_runtime::duration::DurationParser;
use apollo_runtime::shell::{AdminArgs, KubeArgs, LogArgs};
use clap::Parser;

mod settings;

pub use settings::{ordinal_from_pod_name, Settings};

/// Longest of the gateway's periods and timeouts (as the old `--*-seconds` flags allowed).
const YEAR: Duration = Duration::from_secs(86_400 * 365);
/// Sent to agents in whole seconds.
const HEARTBEAT: DurationParser = DurationParser::new()
    .at_least(Duration::from_secs(1))
    .at_most(Duration::from_secs(3600))
    .whole_seconds();
/// Lease durations are whole seconds.
const SHARD_LEASE: DurationParser = DurationParser::new()
    .at_least(Duration::from_secs(1))
    .at_most(Duration::from_secs(600))
    .whole_seconds();
/// A positive period or timeout.
const PERIOD: DurationParser = DurationParser::new().positive().at_most(YEAR);
/// A delay that may be zero.
const GRACE: DurationParser = DurationParser::new().at_most(YEAR);

/// `apollo-gateway`: the device-facing HTTP API of Apollo.
#[derive(Parser, Debug, Clone)]
#[command(name = "apollo-gateway", version, about)]
pub struct Args {
    /// Address of the device API (`/v1/devices/...`).
    #[arg(long, env = "APOLLO_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub admin: AdminArgs,

    #[command(flatten)]
    pub kube: KubeArgs,

    /// Redis holding the state shared by all replicas. Without it an in-memory store serves a
    /// single replica.
    #[arg(long, env = "APOLLO_REDIS_URL")]
    pub redis_url: Option<String>,

    /// File whose bytes (surrounding whitespace trimmed) are the HMAC key of device tokens.
    #[arg(long, env = "APOLLO_AUTH_SECRET_FILE")]
    pub auth_secret_file: Option<PathBuf>,

    /// File holding one token every device may use (development only).
    #[arg(long, env = "APOLLO_DEV_SHARED_TOKEN_FILE")]
    pub dev_shared_token_file: Option<PathBuf>,

    /// Serve devices without any authentication (development only; logs a warning).
    #[arg(
        long,
        env = "APOLLO_INSECURE_NO_AUTH",
        conflicts_with_all = ["auth_secret_file", "dev_shared_token_file"]
    )]
    pub insecure_no_auth: bool,

    /// How often agents must report (1s..1h, whole seconds); sent to them in every desired
    /// document and report ack.
    #[arg(long, env = "APOLLO_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = HEARTBEAT)]
    heartbeat_interval: Duration,

    /// A device is stale after this many heartbeat intervals without a report.
    #[arg(long, env = "APOLLO_STALE_MULTIPLIER", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub stale_multiplier: u32,

    /// How often the stale sweep runs.
    #[arg(long, env = "APOLLO_SWEEP_INTERVAL", default_value = "5s", value_parser = PERIOD)]
    sweep_interval: Duration,

    /// How often the level-triggered resync compares every status with the shared state.
    #[arg(long, env = "APOLLO_RESYNC_INTERVAL", default_value = "5m", value_parser = PERIOD)]
    resync_interval: Duration,

    /// How long a spec change waits before its status write, so that an agent observing the new
    /// spec within this window costs one write instead of two.
    #[arg(long, env = "APOLLO_STATUS_DEBOUNCE", default_value = "2s", value_parser = PERIOD)]
    status_debounce: Duration,

    /// Kubernetes writes (status patches and Events) per second, across this replica.
    #[arg(long, env = "APOLLO_KUBE_WRITES_PER_SECOND", default_value_t = 50.0)]
    pub kube_writes_per_second: f64,

    /// Timeout of each Kubernetes call.
    #[arg(long, env = "APOLLO_KUBE_WRITE_TIMEOUT", default_value = "10s", value_parser = PERIOD)]
    kube_write_timeout: Duration,

    /// DeviceProcesses that may wait for a status write at once (one entry per object).
    #[arg(long, env = "APOLLO_STATUS_QUEUE_CAPACITY", default_value_t = 65_536)]
    pub status_queue_capacity: usize,

    /// Status writes in flight at once.
    #[arg(long, env = "APOLLO_STATUS_WRITERS", default_value_t = 8)]
    pub status_writers: usize,

    /// Device requests served at once, long polls apart (reports, connects, desired documents
    /// answered at once); above it such requests get 503 `overloaded`.
    #[arg(long, env = "APOLLO_MAX_CONCURRENT_REQUESTS", default_value_t = 65_536)]
    pub max_concurrent_requests: usize,

    /// Long polls held at once (their own budget: they never take the reports' budget); above it
    /// a long poll gets 503 `overloaded`.
    #[arg(long, env = "APOLLO_MAX_LONG_POLLS", default_value_t = 100_000)]
    pub max_long_polls: usize,

    /// Long polls one device may hold at once; another gets 429 `too_many_long_polls`.
    #[arg(long, env = "APOLLO_MAX_LONG_POLLS_PER_DEVICE", default_value_t = 2)]
    pub max_long_polls_per_device: u32,

    /// The longest agents wait between retries (their APOLLO_BACKOFF_MAX). After reports could
    /// not be heard (the store unreachable, the cache not synced, the process stopped), no device
    /// is marked stale until this plus a heartbeat interval has passed, or a stale window if that
    /// is longer: agents in back-off come back within it.
    #[arg(long, env = "APOLLO_AGENT_BACKOFF_MAX", default_value = "30s", value_parser = GRACE)]
    pub agent_backoff_max: Duration,

    /// A report whose `timestamp` is further than this from the gateway's clock (Redis' clock)
    /// is refused with 400 on field `timestamp` (a replayed or far-future report); `0s` accepts
    /// any. Generous by default: a device whose clock is off still reports.
    #[arg(long, env = "APOLLO_MAX_REPORT_CLOCK_SKEW", default_value = "24h", value_parser = GRACE)]
    pub max_report_clock_skew: Duration,

    /// Only watch and write DeviceProcesses in this namespace (default: all namespaces).
    #[arg(long, env = "APOLLO_NAMESPACE")]
    pub namespace: Option<String>,

    /// This replica's ordinal, i.e. its shard; sent as X-Apollo-Gateway on every response.
    /// Defaults to the trailing number of --pod-name (StatefulSet pod `apollo-gateway-2` is 2), else 0.
    #[arg(long, env = "APOLLO_ORDINAL")]
    pub ordinal: Option<u32>,

    /// Pod name (from the downward API); its trailing `-<n>` is the ordinal when --ordinal is absent.
    #[arg(long, env = "APOLLO_POD_NAME")]
    pub pod_name: Option<String>,

    /// Replica count before the membership in Redis is first read. With --redis-url the count
    /// follows the replicas registered in Redis (`kubectl scale statefulset apollo-gateway`);
    /// without it only 1 is allowed.
    #[arg(long, env = "APOLLO_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub replicas: u32,

    /// Address routers use to reach this replica's device API. Defaults to --listen, or to
    /// `<--pod-ip>:<port>` when --listen is a wildcard address.
    #[arg(long, env = "APOLLO_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// This pod's IP (from the downward API), used to build the advertised address.
    #[arg(long, env = "APOLLO_POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,

    /// Namespace of the per-shard Leases (defaults to POD_NAMESPACE, else `default`).
    #[arg(long, env = "APOLLO_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// Duration of the per-shard Leases (1s..10m, whole seconds): a dead replica's shard is swept
    /// by another replica this long after its last renewal.
    #[arg(long, env = "APOLLO_SHARD_LEASE", default_value = "15s", value_parser = SHARD_LEASE)]
    shard_lease: Duration,

    /// After start-up, wait this long before the first stale sweep (default: one stale window).
    /// After an outage of every replica each device's last report is old although its agent is
    /// fine and only retrying; sweeping at once would mark the whole fleet disconnected. 0s sweeps
    /// at once.
    #[arg(long, env = "APOLLO_SWEEP_GRACE", value_parser = GRACE)]
    sweep_grace: Option<Duration>,

    /// Mass-staleness breaker: when more than this share (0..1) of a shard's connected devices
    /// would go stale in one sweep, their disconnection is held (one Warning Event on the
    /// shard's Lease, `apollo_gateway_stale_breaker_open`) until they report again or stay quiet
    /// for another stale window. A partition or a broken path looks like this; dead devices
    /// rarely do.
    #[arg(long, env = "APOLLO_STALE_BREAKER_SHARE", default_value_t = 0.2,
          value_parser = parse_share)]
    pub stale_breaker_share: f64,

    /// The breaker never opens for fewer stale devices than this.
    #[arg(long, env = "APOLLO_STALE_BREAKER_MIN_DEVICES", default_value_t = 10)]
    pub stale_breaker_min_devices: u64,

    /// A transition decided by the store but not delivered (status patch and Event) this long
    /// after it was decided is replayed by the shard's owner (the replica that decided it died,
    /// gave up or was shut down).
    #[arg(long, env = "APOLLO_PENDING_REPLAY_GRACE", default_value = "10s", value_parser = PERIOD)]
    pending_replay_grace: Duration,

    /// Log one line per device request (`GET /v1/devices/tor1-01/desired 304 0.4ms`) at info
    /// level under the `apollo_gateway::access` target. Off by default: at fleet scale it is noise.
    #[arg(long, env = "APOLLO_ACCESS_LOG")]
    pub access_log: bool,

    #[command(flatten)]
    pub log: LogArgs,

    /// Old spelling of --heartbeat-interval: seconds.
    #[arg(long, env = "APOLLO_HEARTBEAT_INTERVAL_SECONDS", hide = true,
          conflicts_with = "heartbeat_interval", value_parser = HEARTBEAT.bare_seconds())]
    heartbeat_interval_seconds: Option<Duration>,

    /// Old spelling of --sweep-interval: seconds.
    #[arg(long, env = "APOLLO_SWEEP_INTERVAL_SECONDS", hide = true,
          conflicts_with = "sweep_interval", value_parser = PERIOD.bare_seconds())]
    sweep_interval_seconds: Option<Duration>,

    /// Old spelling of --resync-interval: seconds.
    #[arg(long, env = "APOLLO_RESYNC_INTERVAL_SECONDS", hide = true,
          conflicts_with = "resync_interval", value_parser = PERIOD.bare_seconds())]
    resync_interval_seconds: Option<Duration>,

    /// Old spelling of --status-debounce: seconds.
    #[arg(long, env = "APOLLO_STATUS_DEBOUNCE_SECONDS", hide = true,
          conflicts_with = "status_debounce", value_parser = PERIOD.bare_seconds())]
    status_debounce_seconds: Option<Duration>,

    /// Old spelling of --kube-write-timeout: seconds.
    #[arg(long, env = "APOLLO_KUBE_WRITE_TIMEOUT_SECONDS", hide = true,
          conflicts_with = "kube_write_timeout", value_parser = PERIOD.bare_seconds())]
    kube_write_timeout_seconds: Option<Duration>,

    /// Old spelling of --shard-lease: seconds.
    #[arg(long, env = "APOLLO_SHARD_LEASE_SECONDS", hide = true,
          conflicts_with = "shard_lease", value_parser = SHARD_LEASE.bare_seconds())]
    shard_lease_seconds: Option<Duration>,

    /// Old spelling of --sweep-grace: seconds.
    #[arg(long, env = "APOLLO_SWEEP_GRACE_SECONDS", hide = true,
          conflicts_with = "sweep_grace", value_parser = GRACE.bare_seconds())]
    sweep_grace_seconds: Option<Duration>,

    /// Old spelling of --pending-replay-grace: seconds.
    #[arg(long, env = "APOLLO_PENDING_REPLAY_GRACE_SECONDS", hide = true,
          conflicts_with = "pending_replay_grace", value_parser = PERIOD.bare_seconds())]
    pending_replay_grace_seconds: Option<Duration>,
}

impl Args {
    /// How often agents must report.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval_seconds
            .unwrap_or(self.heartbeat_interval)
    }

    /// Stale sweep period.
    pub fn sweep_interval(&self) -> Duration {
        self.sweep_interval_seconds.unwrap_or(self.sweep_interval)
    }

    /// Resync period.
    pub fn resync_interval(&self) -> Duration {
        self.resync_interval_seconds.unwrap_or(self.resync_interval)
    }

    /// Debounce of spec-change writes.
    pub fn status_debounce(&self) -> Duration {
        self.status_debounce_seconds.unwrap_or(self.status_debounce)
    }

    /// Timeout of each Kubernetes call.
    pub fn kube_write_timeout(&self) -> Duration {
        self.kube_write_timeout_seconds
            .unwrap_or(self.kube_write_timeout)
    }

    /// Shard Lease duration.
    pub fn shard_lease(&self) -> Duration {
        self.shard_lease_seconds.unwrap_or(self.shard_lease)
    }

    /// Delay of the first stale sweep, when given (the default is one stale window).
    pub fn sweep_grace(&self) -> Option<Duration> {
        self.sweep_grace_seconds.or(self.sweep_grace)
    }

    /// Age after which undelivered transitions are replayed.
    pub fn pending_replay_grace(&self) -> Duration {
        self.pending_replay_grace_seconds
            .unwrap_or(self.pending_replay_grace)
    }

    /// staleMultiplier x heartbeat interval.
    pub fn stale_window(&self) -> Duration {
        self.heartbeat_interval() * self.stale_multiplier
    }
}

/// A share between 0 and 1.
pub fn parse_share(s: &str) -> Result<f64, String> {
    let value: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=1.0).contains(&value) {
        return Err(format!("{s:?} must be between 0 and 1"));
    }
    Ok(value)
}
#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn args_are_consistent() {
        Args::command().debug_assert();
    }

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec!["apollo-gateway"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn insecure_conflicts_with_a_secret() {
        assert!(parse(&["--insecure-no-auth", "--auth-secret-file", "/x"]).is_err());
    }

    #[test]
    fn durations_take_the_shared_syntax_and_old_spellings_their_seconds() {
        let args = parse(&[
            "--insecure-no-auth",
            "--heartbeat-interval",
            "2s",
            "--sweep-interval",
            "250ms",
            "--resync-interval",
            "1m",
            "--status-debounce",
            "500ms",
            "--kube-write-timeout",
            "3s",
            "--shard-lease",
            "5s",
            "--sweep-grace",
            "0s",
            "--pending-replay-grace",
            "1m",
        ])
        .expect("new spellings");
        assert_eq!(args.heartbeat_interval(), Duration::from_secs(2));
        assert_eq!(args.sweep_interval(), Duration::from_millis(250));
        assert_eq!(args.resync_interval(), Duration::from_secs(60));
        assert_eq!(args.status_debounce(), Duration::from_millis(500));
        assert_eq!(args.kube_write_timeout(), Duration::from_secs(3));
        assert_eq!(args.shard_lease(), Duration::from_secs(5));
        assert_eq!(args.sweep_grace(), Some(Duration::ZERO));
        assert_eq!(args.pending_replay_grace(), Duration::from_secs(60));

        let args = parse(&[
            "--insecure-no-auth",
            "--heartbeat-interval-seconds",
            "2",
            "--sweep-interval-seconds",
            "0.25",
            "--resync-interval-seconds",
            "60",
            "--status-debounce-seconds",
            "0.5",
            "--kube-write-timeout-seconds",
            "3",
            "--shard-lease-seconds",
            "5",
            "--sweep-grace-seconds",
            "0",
            "--pending-replay-grace-seconds",
            "60",
        ])
        .expect("old spellings");
        assert_eq!(args.heartbeat_interval(), Duration::from_secs(2));
        assert_eq!(args.sweep_interval(), Duration::from_millis(250));
        assert_eq!(args.resync_interval(), Duration::from_secs(60));
        assert_eq!(args.status_debounce(), Duration::from_millis(500));
        assert_eq!(args.kube_write_timeout(), Duration::from_secs(3));
        assert_eq!(args.shard_lease(), Duration::from_secs(5));
        assert_eq!(args.sweep_grace(), Some(Duration::ZERO));
        assert_eq!(args.pending_replay_grace(), Duration::from_secs(60));

        // Bounds hold for both spellings; both at once is refused.
        for refused in [
            &["--heartbeat-interval", "1500ms"][..],
            &["--heartbeat-interval-seconds", "0"],
            &["--heartbeat-interval-seconds", "3601"],
            &["--shard-lease", "11m"],
            &["--sweep-interval", "0s"],
            &["--sweep-interval-seconds", "0"],
            &["--sweep-interval-seconds", "soon"],
            &["--sweep-interval-seconds", "-1"],
            &["--sweep-interval", "1s", "--sweep-interval-seconds", "1"],
        ] {
            let argv: Vec<&str> = std::iter::once("--insecure-no-auth")
                .chain(refused.iter().copied())
                .collect();
            assert!(parse(&argv).is_err(), "{refused:?} must be refused");
        }
        let help = Args::command().render_long_help().to_string();
        assert!(!help.contains("-seconds"), "{help}");
        assert!(help.contains("--sweep-interval <SWEEP_INTERVAL>"), "{help}");
    }

    #[test]
    fn an_unknown_log_format_is_refused_naming_the_accepted_ones() {
        let error = parse(&["--insecure-no-auth", "--log-format", "bogus"]).expect_err("refused");
        assert_eq!(error.exit_code(), 2);
        assert!(
            error.to_string().contains("[possible values: text, json]"),
            "{error}"
        );
    }
}

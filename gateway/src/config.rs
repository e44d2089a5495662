//! Command-line flags (each also an `APOLLO_*` environment variable) and the settings derived
//! from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::api::auth::Auth;
use crate::error::Error;

/// `apollo-gateway`: the device-facing HTTP API of Apollo.
#[derive(Parser, Debug, Clone)]
#[command(name = "apollo-gateway", version, about)]
pub struct Args {
    /// Address of the device API (`/v1/devices/...`).
    #[arg(long, env = "APOLLO_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address of the admin endpoints (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "APOLLO_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,

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

    /// How often agents must report; sent to them in every desired document and report ack.
    #[arg(long, env = "APOLLO_HEARTBEAT_INTERVAL_SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_interval_seconds: u64,

    /// A device is stale after this many heartbeat intervals without a report.
    #[arg(long, env = "APOLLO_STALE_MULTIPLIER", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub stale_multiplier: u32,

    /// How often the stale sweep runs (decimal seconds allowed).
    #[arg(long, env = "APOLLO_SWEEP_INTERVAL_SECONDS", default_value = "5", value_parser = parse_seconds)]
    pub sweep_interval_seconds: Duration,

    /// How often the level-triggered resync compares every status with the shared state.
    #[arg(long, env = "APOLLO_RESYNC_INTERVAL_SECONDS", default_value = "300", value_parser = parse_seconds)]
    pub resync_interval_seconds: Duration,

    /// How long a spec change waits before its status write, so that an agent observing the new
    /// spec within this window costs one write instead of two.
    #[arg(long, env = "APOLLO_STATUS_DEBOUNCE_SECONDS", default_value = "2", value_parser = parse_seconds)]
    pub status_debounce_seconds: Duration,

    /// Kubernetes writes (status patches and Events) per second, across this replica.
    #[arg(long, env = "APOLLO_KUBE_WRITES_PER_SECOND", default_value_t = 50.0)]
    pub kube_writes_per_second: f64,

    /// Timeout of each Kubernetes call.
    #[arg(long, env = "APOLLO_KUBE_WRITE_TIMEOUT_SECONDS", default_value = "10", value_parser = parse_seconds)]
    pub kube_write_timeout_seconds: Duration,

    /// DeviceProcesses that may wait for a status write at once (one entry per object).
    #[arg(long, env = "APOLLO_STATUS_QUEUE_CAPACITY", default_value_t = 65_536)]
    pub status_queue_capacity: usize,

    /// Status writes in flight at once.
    #[arg(long, env = "APOLLO_STATUS_WRITERS", default_value_t = 8)]
    pub status_writers: usize,

    /// Device requests (long polls included) served at once; above it requests get 503.
    #[arg(long, env = "APOLLO_MAX_CONCURRENT_REQUESTS", default_value_t = 65_536)]
    pub max_concurrent_requests: usize,

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

    /// Duration of the per-shard Leases: a dead replica's shard is swept by another replica this
    /// long after its last renewal.
    #[arg(long, env = "APOLLO_SHARD_LEASE_SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub shard_lease_seconds: u64,

    /// After start-up, wait this long before the first stale sweep (default: one stale window).
    /// After an outage of every replica each device's last report is old although its agent is
    /// fine and only retrying; sweeping at once would mark the whole fleet disconnected. 0 sweeps
    /// at once.
    #[arg(long, env = "APOLLO_SWEEP_GRACE_SECONDS", value_parser = parse_seconds_or_zero)]
    pub sweep_grace_seconds: Option<Duration>,

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
    #[arg(long, env = "APOLLO_PENDING_REPLAY_GRACE_SECONDS", default_value = "10", value_parser = parse_seconds)]
    pub pending_replay_grace_seconds: Duration,

    /// Log one line per device request (`GET /v1/devices/tor1-01/desired 304 0.4ms`) at info
    /// level under the `apollo_gateway::access` target. Off by default: at fleet scale it is noise.
    #[arg(long, env = "APOLLO_ACCESS_LOG")]
    pub access_log: bool,

    /// Log format: `text` or `json`.
    #[arg(long, env = "APOLLO_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
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

/// Like [`parse_seconds`], but also accepts 0.
pub fn parse_seconds_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim().parse::<f64>().is_ok_and(|v| v == 0.0) {
        return Ok(Duration::ZERO);
    }
    parse_seconds(s)
}

/// Parses decimal seconds (`"15"`, `"0.25"`) into a positive duration.
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let value: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !value.is_finite() || value <= 0.0 || value > 86_400.0 * 365.0 {
        return Err(format!("{s:?} must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(value))
}

/// Validated settings the gateway runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Device API address.
    pub listen: SocketAddr,
    /// Admin address.
    pub admin_listen: SocketAddr,
    /// Redis URL, or None for the in-memory store.
    pub redis_url: Option<String>,
    /// Authentication of device requests.
    pub auth: Auth,
    /// Heartbeat interval told to agents.
    pub heartbeat_interval_seconds: u64,
    /// staleMultiplier x heartbeat interval.
    pub stale_window: Duration,
    /// Stale sweep period.
    pub sweep_interval: Duration,
    /// Resync period.
    pub resync_interval: Duration,
    /// Debounce of spec-change writes.
    pub status_debounce: Duration,
    /// Kubernetes writes per second.
    pub kube_writes_per_second: f64,
    /// Timeout of each Kubernetes call.
    pub kube_timeout: Duration,
    /// Status queue capacity.
    pub status_queue_capacity: usize,
    /// Concurrent status writes.
    pub status_writers: usize,
    /// Concurrent device requests.
    pub max_concurrent_requests: usize,
    /// Namespace scope.
    pub namespace: Option<String>,
    /// This replica's ordinal.
    pub ordinal: u32,
    /// Replica count before the membership is read (the only count without Redis).
    pub replicas: u32,
    /// Address advertised to routers.
    pub advertise_addr: String,
    /// Namespace of the shard Leases.
    pub lease_namespace: String,
    /// Shard Lease duration.
    pub shard_lease: Duration,
    /// Per-request info log.
    pub access_log: bool,
    /// Delay of the first stale sweep after start-up.
    pub sweep_grace: Duration,
    /// The mass-staleness breaker.
    pub breaker: crate::cluster::sweep::Breaker,
    /// Age after which undelivered transitions are replayed.
    pub pending_replay_grace: Duration,
}

/// The ordinal at the end of a StatefulSet pod name (`apollo-gateway-2` -> 2).
pub fn ordinal_from_pod_name(name: &str) -> Option<u32> {
    name.rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}

impl Settings {
    /// Checks the flags and reads the secret files they name.
    pub fn from_args(args: &Args) -> Result<Self, Error> {
        let ordinal = match (args.ordinal, args.pod_name.as_deref()) {
            (Some(o), _) => o,
            (None, Some(pod)) => ordinal_from_pod_name(pod).ok_or_else(|| {
                Error::InvalidConfig(format!(
                    "cannot read an ordinal from pod name {pod:?}; give --ordinal"
                ))
            })?,
            (None, None) => 0,
        };
        if args.redis_url.is_none() && ordinal >= args.replicas {
            return Err(Error::InvalidConfig(format!(
                "--ordinal {ordinal} must be below --replicas {}",
                args.replicas
            )));
        }
        let advertise_addr = match (&args.advertise_addr, args.pod_ip) {
            (Some(a), _) => a.clone(),
            (None, Some(ip)) if args.listen.ip().is_unspecified() => {
                std::net::SocketAddr::new(ip, args.listen.port()).to_string()
            }
            (None, _) if args.listen.ip().is_unspecified() && args.redis_url.is_some() => {
                return Err(Error::InvalidConfig(
                    "--listen is a wildcard address: give --advertise-addr or --pod-ip so routers \
                     can reach this replica"
                        .into(),
                ))
            }
            (None, _) => args.listen.to_string(),
        };
        let lease_namespace = args
            .lease_namespace
            .clone()
            .or_else(|| {
                std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| "default".to_owned());
        if args.replicas > 1 && args.redis_url.is_none() {
            return Err(Error::InvalidConfig(
                "the in-memory state store serves a single replica; give --redis-url when \
                 --replicas is above 1"
                    .into(),
            ));
        }
        if !(args.kube_writes_per_second.is_finite() && args.kube_writes_per_second > 0.0) {
            return Err(Error::InvalidConfig(
                "--kube-writes-per-second must be positive".into(),
            ));
        }
        for (flag, value) in [
            ("--status-queue-capacity", args.status_queue_capacity),
            ("--status-writers", args.status_writers),
            ("--max-concurrent-requests", args.max_concurrent_requests),
        ] {
            if value == 0 {
                return Err(Error::InvalidConfig(format!("{flag} must be at least 1")));
            }
        }
        let auth = Auth::from_flags(
            args.auth_secret_file.as_deref(),
            args.dev_shared_token_file.as_deref(),
            args.insecure_no_auth,
        )?;
        let heartbeat = Duration::from_secs(args.heartbeat_interval_seconds);
        Ok(Self {
            listen: args.listen,
            admin_listen: args.admin_listen,
            redis_url: args.redis_url.clone(),
            auth,
            heartbeat_interval_seconds: args.heartbeat_interval_seconds,
            stale_window: heartbeat * args.stale_multiplier,
            sweep_interval: args.sweep_interval_seconds,
            resync_interval: args.resync_interval_seconds,
            status_debounce: args.status_debounce_seconds,
            kube_writes_per_second: args.kube_writes_per_second,
            kube_timeout: args.kube_write_timeout_seconds,
            status_queue_capacity: args.status_queue_capacity,
            status_writers: args.status_writers,
            max_concurrent_requests: args.max_concurrent_requests,
            namespace: args.namespace.clone(),
            ordinal,
            replicas: args.replicas,
            advertise_addr,
            lease_namespace,
            shard_lease: Duration::from_secs(args.shard_lease_seconds),
            access_log: args.access_log,
            sweep_grace: args
                .sweep_grace_seconds
                .unwrap_or(heartbeat * args.stale_multiplier),
            breaker: crate::cluster::sweep::Breaker {
                share: args.stale_breaker_share,
                min_devices: args.stale_breaker_min_devices,
            },
            pending_replay_grace: args.pending_replay_grace_seconds,
        })
    }
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
    fn defaults_match_the_documented_interface() {
        let args = parse(&["--insecure-no-auth"]).expect("parse");
        assert_eq!(args.heartbeat_interval_seconds, 15);
        assert_eq!(args.stale_multiplier, 3);
        assert_eq!(args.ordinal, None);
        assert_eq!(args.replicas, 1);
        let settings = Settings::from_args(&args).expect("settings");
        assert_eq!(settings.ordinal, 0);
        assert_eq!(settings.shard_lease, Duration::from_secs(15));
        assert_eq!(settings.stale_window, Duration::from_secs(45));
        assert!(settings.auth.is_insecure());
    }

    #[test]
    fn no_auth_at_all_is_refused() {
        let args = parse(&[]).expect("parse");
        let err = Settings::from_args(&args).expect_err("must refuse");
        assert!(err.to_string().contains("--insecure-no-auth"), "{err}");
    }

    #[test]
    fn insecure_conflicts_with_a_secret() {
        assert!(parse(&["--insecure-no-auth", "--auth-secret-file", "/x"]).is_err());
    }

    #[test]
    fn memory_store_is_refused_for_several_replicas() {
        let args =
            parse(&["--insecure-no-auth", "--replicas", "3", "--ordinal", "1"]).expect("parse");
        let err = Settings::from_args(&args).expect_err("must refuse");
        assert!(err.to_string().contains("--redis-url"), "{err}");
        let args = parse(&[
            "--insecure-no-auth",
            "--replicas",
            "3",
            "--ordinal",
            "1",
            "--redis-url",
            "redis://127.0.0.1:1",
            "--advertise-addr",
            "10.0.0.7:8080",
        ])
        .expect("parse");
        assert!(Settings::from_args(&args).is_ok());
    }

    #[test]
    fn ordinal_comes_from_the_statefulset_pod_name() {
        assert_eq!(ordinal_from_pod_name("apollo-gateway-12"), Some(12));
        assert_eq!(ordinal_from_pod_name("gateway"), None);
        let args = parse(&[
            "--insecure-no-auth",
            "--redis-url",
            "redis://127.0.0.1:1",
            "--pod-name",
            "apollo-gateway-2",
            "--pod-ip",
            "10.1.2.3",
        ])
        .expect("parse");
        let settings = Settings::from_args(&args).expect("settings");
        assert_eq!(settings.ordinal, 2);
        assert_eq!(settings.advertise_addr, "10.1.2.3:8080");
        let bad = parse(&["--insecure-no-auth", "--pod-name", "gateway"]).expect("parse");
        assert!(Settings::from_args(&bad).is_err());
    }

    #[test]
    fn a_wildcard_listen_address_needs_something_to_advertise_with_redis() {
        let args =
            parse(&["--insecure-no-auth", "--redis-url", "redis://127.0.0.1:1"]).expect("parse");
        let err = Settings::from_args(&args).expect_err("must refuse");
        assert!(err.to_string().contains("--advertise-addr"), "{err}");
        let args = parse(&[
            "--insecure-no-auth",
            "--redis-url",
            "redis://127.0.0.1:1",
            "--listen",
            "127.0.0.1:9000",
        ])
        .expect("parse");
        assert_eq!(
            Settings::from_args(&args).expect("ok").advertise_addr,
            "127.0.0.1:9000"
        );
    }

    #[test]
    fn ordinal_must_be_below_replicas() {
        let args = parse(&["--insecure-no-auth", "--ordinal", "1"]).expect("parse");
        assert!(Settings::from_args(&args).is_err());
    }

    #[test]
    fn sweep_grace_defaults_to_the_stale_window_and_accepts_zero() {
        let args = parse(&["--insecure-no-auth"]).expect("parse");
        assert_eq!(
            Settings::from_args(&args).expect("ok").sweep_grace,
            Duration::from_secs(45)
        );
        let args = parse(&["--insecure-no-auth", "--sweep-grace-seconds", "0"]).expect("parse");
        assert_eq!(
            Settings::from_args(&args).expect("ok").sweep_grace,
            Duration::ZERO
        );
        assert!(parse(&["--insecure-no-auth", "--sweep-grace-seconds", "-1"]).is_err());
    }

    #[test]
    fn seconds_accept_decimals_and_refuse_nonsense() {
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_seconds("15"), Ok(Duration::from_secs(15)));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("NaN").is_err());
    }
}

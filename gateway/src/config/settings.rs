//! The settings derived from the flags once they are checked: the authentication, this
//! replica's ordinal and advertised address, the Lease namespace, and the budgets and breaker
//! built from their flags. Everything else is read from the parsed [`Args`].

use std::time::Duration;

use super::Args;
use crate::api::auth::Auth;
use crate::error::Error;

/// What the gateway runs with: the parsed flags, and what is derived from them once they are
/// checked (the flags themselves are read from [`Settings::args`]).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The flags, durations through their accessors ([`Args::sweep_interval`], ...).
    pub args: Args,
    /// Authentication of device requests.
    pub auth: Auth,
    /// This replica's ordinal (from --ordinal or the pod name).
    pub ordinal: u32,
    /// Address advertised to routers.
    pub advertise_addr: String,
    /// Namespace of the shard Leases.
    pub lease_namespace: String,
    /// Delay of the first stale sweep after start-up.
    pub sweep_grace: Duration,
    /// Request budgets of the device API.
    pub budgets: crate::api::budget::Limits,
    /// The mass-staleness breaker.
    pub breaker: crate::cluster::sweep::Breaker,
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
            ("--max-long-polls", args.max_long_polls),
            (
                "--max-long-polls-per-device",
                args.max_long_polls_per_device as usize,
            ),
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
        Ok(Self {
            auth,
            ordinal,
            advertise_addr,
            lease_namespace,
            sweep_grace: args.sweep_grace().unwrap_or(args.stale_window()),
            budgets: crate::api::budget::Limits {
                requests: args.max_concurrent_requests,
                long_polls: args.max_long_polls,
                long_polls_per_device: args.max_long_polls_per_device,
            },
            breaker: crate::cluster::sweep::Breaker {
                share: args.stale_breaker_share,
                min_devices: args.stale_breaker_min_devices,
            },
            args: args.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec!["apollo-gateway"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn defaults_match_the_documented_interface() {
        let args = parse(&["--insecure-no-auth"]).expect("parse");
        assert_eq!(args.heartbeat_interval(), Duration::from_secs(15));
        assert_eq!(args.stale_multiplier, 3);
        assert_eq!(args.ordinal, None);
        assert_eq!(args.replicas, 1);
        assert_eq!(args.admin.listen.port(), 9090);
        assert_eq!(args.sweep_interval(), Duration::from_secs(5));
        assert_eq!(args.resync_interval(), Duration::from_secs(300));
        assert_eq!(args.status_debounce(), Duration::from_secs(2));
        assert_eq!(args.kube_write_timeout(), Duration::from_secs(10));
        assert_eq!(args.pending_replay_grace(), Duration::from_secs(10));
        let settings = Settings::from_args(&args).expect("settings");
        assert_eq!(settings.ordinal, 0);
        assert_eq!(settings.args.shard_lease(), Duration::from_secs(15));
        assert_eq!(settings.args.stale_window(), Duration::from_secs(45));
        assert!(settings.auth.is_insecure());
    }

    #[test]
    fn no_auth_at_all_is_refused() {
        let args = parse(&[]).expect("parse");
        let err = Settings::from_args(&args).expect_err("must refuse");
        assert!(err.to_string().contains("--insecure-no-auth"), "{err}");
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
}

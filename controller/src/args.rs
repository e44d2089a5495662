//! Command line and environment (`APOLLO_*`) of `apollo-controller`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// DeviceProcessDeployment controller: keeps one DeviceProcess per selected NetworkSwitch.
#[derive(Debug, Clone, Parser)]
#[command(name = "apollo-controller", version, about)]
pub struct Args {
    /// Kubeconfig file. Without it: $KUBECONFIG, ~/.kube/config, then in-cluster configuration.
    #[arg(long, env = "APOLLO_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Watch and manage only this namespace (default: all namespaces).
    #[arg(long, env = "APOLLO_NAMESPACE")]
    pub namespace: Option<String>,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "APOLLO_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,

    /// Identity written into the leader Lease. Default: $POD_NAME, else the hostname, plus a
    /// per-process suffix so two processes on one host never share an identity.
    #[arg(long, env = "APOLLO_IDENTITY")]
    pub identity: Option<String>,

    /// Name of the leader Lease.
    #[arg(long, env = "APOLLO_LEASE_NAME", default_value = "apollo-controller")]
    pub lease_name: String,

    /// Namespace of the leader Lease (default: --namespace, else the client's default namespace).
    #[arg(long, env = "APOLLO_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a leader's lease stays valid without renewal (e.g. 15s, 1500ms).
    #[arg(long, env = "APOLLO_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// How long the leader keeps acting without a successful renewal; below --lease-duration.
    #[arg(long, env = "APOLLO_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub lease_renew_deadline: Duration,

    /// Time between attempts to acquire or renew the lease; below --lease-renew-deadline.
    #[arg(long, env = "APOLLO_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub lease_retry_period: Duration,

    /// Level-triggered resync of every deployment.
    #[arg(long, env = "APOLLO_RESYNC_PERIOD", default_value = "5m", value_parser = parse_duration)]
    pub resync_period: Duration,

    /// Bound on each Kubernetes API call (watches excepted).
    #[arg(long, env = "APOLLO_API_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub api_timeout: Duration,

    /// Shortest time between two status writes of one deployment that only change the agent
    /// counts (Connected, Observed). Bounds status writes during rollout waves; rollout progress
    /// itself is written at once.
    #[arg(long, env = "APOLLO_AGENT_COUNT_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub agent_count_interval: Duration,

    /// First retry delay after a failed reconcile (doubled per failure).
    #[arg(long, env = "APOLLO_BACKOFF_BASE", default_value = "500ms", value_parser = parse_duration)]
    pub backoff_base: Duration,

    /// Longest retry delay after failed reconciles.
    #[arg(long, env = "APOLLO_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    pub backoff_max: Duration,

    /// Log format.
    #[arg(long, env = "APOLLO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Args {
    /// Check relations between flags that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_renew_deadline >= self.lease_duration {
            return Err(format!(
                "--lease-renew-deadline ({:?}) must be below --lease-duration ({:?}), or a leader could act after others may take over",
                self.lease_renew_deadline, self.lease_duration
            ));
        }
        if self.lease_retry_period >= self.lease_renew_deadline {
            return Err(format!(
                "--lease-retry-period ({:?}) must be below --lease-renew-deadline ({:?})",
                self.lease_retry_period, self.lease_renew_deadline
            ));
        }
        if self.api_timeout >= self.lease_renew_deadline {
            return Err(format!(
                "--api-timeout ({:?}) must be below --lease-renew-deadline ({:?}), or one slow call could outlive leadership",
                self.api_timeout, self.lease_renew_deadline
            ));
        }
        Ok(())
    }
}

/// Parse `250ms`, `2s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 15s, 5m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn defaults_are_consistent_and_bad_timings_are_refused() {
        let args = Args::parse_from(["apollo-controller"]);
        assert_eq!(args.validate(), Ok(()));
        let bad = Args::parse_from([
            "apollo-controller",
            "--lease-duration",
            "2s",
            "--lease-renew-deadline",
            "3s",
        ]);
        assert!(bad.validate().is_err());
    }
}

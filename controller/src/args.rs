//! Command line and environment (`APOLLO_*`) of `apollo-controller`. Durations take the syntax
//! every Apollo binary shares (`500ms`, `15s`, `5m`; a bare number is seconds).

use std::time::Duration;

use apollo_runtime::duration::parse_duration;
use apollo_runtime::shell::{AdminArgs, KubeArgs, LogArgs};
use clap::Parser;

/// DeviceProcessDeployment controller: keeps one DeviceProcess per selected NetworkSwitch.
#[derive(Debug, Clone, Parser)]
#[command(name = "apollo-controller", version, about)]
pub struct Args {
    #[command(flatten)]
    pub kube: KubeArgs,

    /// Watch and manage only this namespace (default: all namespaces).
    #[arg(long, env = "APOLLO_NAMESPACE")]
    pub namespace: Option<String>,

    #[command(flatten)]
    pub admin: AdminArgs,

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

    #[command(flatten)]
    pub log: LogArgs,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn shared_flags_parse_from_the_flattened_groups() {
        let args = Args::parse_from([
            "apollo-controller",
            "--kubeconfig",
            "/etc/apollo/kubeconfig",
            "--admin-listen",
            "127.0.0.1:9999",
            "--log-format",
            "json",
            "--lease-renew-deadline",
            "1500ms",
            "--lease-retry-period",
            "1",
        ]);
        assert_eq!(
            args.kube.kubeconfig.as_deref(),
            Some(std::path::Path::new("/etc/apollo/kubeconfig"))
        );
        assert_eq!(args.admin.listen.port(), 9999);
        assert_eq!(args.log.log_format, apollo_runtime::shell::LogFormat::Json);
        assert_eq!(args.lease_renew_deadline, Duration::from_millis(1500));
        assert_eq!(args.lease_retry_period, Duration::from_secs(1));
        let error = Args::try_parse_from(["apollo-controller", "--log-format", "bogus"])
            .expect_err("refused");
        assert_eq!(error.exit_code(), 2);
        assert!(
            error.to_string().contains("[possible values: text, json]"),
            "{error}"
        );
        assert!(Args::try_parse_from(["apollo-controller", "--resync-period", "5d"]).is_err());
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

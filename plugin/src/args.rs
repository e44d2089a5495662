//! Command line of `kubectl-apollo`, with kubectl's connection flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::Error;

/// kubectl plugin for Apollo: rollouts of DeviceProcessDeployments.
#[derive(Debug, Clone, Parser)]
#[command(name = "kubectl-apollo", bin_name = "kubectl apollo", version, about)]
pub struct Args {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, global = true, env = "APOLLO_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true, env = "APOLLO_CONTEXT")]
    pub context: Option<String>,
    /// Namespace of the deployment (default: the context's).
    #[arg(short = 'n', long, global = true, env = "APOLLO_NAMESPACE")]
    pub namespace: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Manage the rollout of a DeviceProcessDeployment.
    #[command(subcommand)]
    Rollout(Rollout),
    /// List every selected device whose DeviceProcess is not available: why, and since when.
    Stragglers(Target),
}

/// `rollout` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum Rollout {
    /// Follow the rollout until it completes (exit 0) or halts (exit 1).
    Status(StatusArgs),
    /// Hold every update back (`spec.paused: true`).
    Pause(Target),
    /// Let the rollout go on (`spec.paused: false`).
    Resume(Target),
}

/// A DeviceProcessDeployment: `dpd/NAME`, or `dpd NAME`.
#[derive(Debug, Clone, ClapArgs)]
pub struct Target {
    /// `dpd/NAME` (also `deviceprocessdeployment/NAME`), or the type and the name apart.
    #[arg(required = true, num_args = 1..=2)]
    pub target: Vec<String>,
}

/// `rollout status` options.
#[derive(Debug, Clone, ClapArgs)]
pub struct StatusArgs {
    /// The deployment.
    #[command(flatten)]
    pub target: Target,
    /// Follow the rollout (`--watch=false`: print the state once and exit).
    #[arg(short = 'w', long, default_value_t = true, action = clap::ArgAction::Set)]
    pub watch: bool,
    /// Give up after this long (e.g. 90s, 5m; 0 waits forever).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Parse `90s`, `5m`, `1h`, `250ms` (the project's one duration syntax).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    apollo_runtime::duration::parse_duration(text)
}

impl Args {
    /// The client, and the namespace of the kubeconfig context.
    pub async fn client(&self) -> Result<(kube::Client, String), Error> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let kubeconfig =
                    Kubeconfig::read_from(path).map_err(|e| Error::Config(e.to_string()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| Error::Config(e.to_string()))?
            }
            None if self.context.is_some() => kube::Config::from_kubeconfig(&options)
                .await
                .map_err(|e| Error::Config(e.to_string()))?,
            None => kube::Config::infer()
                .await
                .map_err(|e| Error::Config(e.to_string()))?,
        };
        let namespace = config.default_namespace.clone();
        let client = kube::Client::try_from(config).map_err(Error::Client)?;
        Ok((client, namespace))
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
    fn kubectl_style_command_lines_parse() {
        let args = Args::parse_from([
            "kubectl-apollo",
            "rollout",
            "status",
            "dpd/bgp",
            "-n",
            "fabric",
            "--timeout",
            "5m",
        ]);
        assert_eq!(args.namespace.as_deref(), Some("fabric"));
        let Command::Rollout(Rollout::Status(status)) = args.command else {
            panic!("rollout status");
        };
        assert_eq!(status.target.target, ["dpd/bgp"]);
        assert_eq!(status.timeout, Duration::from_secs(300));
        assert!(status.watch);
        let args = Args::parse_from(["kubectl-apollo", "-n", "x", "stragglers", "dpd", "bgp"]);
        assert!(matches!(args.command, Command::Stragglers(t) if t.target == ["dpd", "bgp"]));
        let args = Args::parse_from([
            "kubectl-apollo",
            "rollout",
            "status",
            "dpd/a",
            "--watch=false",
        ]);
        assert!(matches!(args.command, Command::Rollout(Rollout::Status(s)) if !s.watch));
    }
}

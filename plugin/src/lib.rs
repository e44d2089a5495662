//! `kubectl apollo`: a kubectl plugin for Apollo's rollouts.
//!
//! kubectl runs `kubectl-apollo` (found on `PATH`) for `kubectl apollo ...`, passing every argument
//! after `apollo`. The plugin talks to the cluster of the current kubeconfig context (or
//! `--kubeconfig`, `--context`, `-n`), as kubectl does:
//!
//! - `rollout status dpd/NAME`: follow the rollout; exit 0 once it is complete, 1 when it halts
//!   (or the `--timeout` passes), like `kubectl rollout status`.
//! - `rollout pause dpd/NAME` / `rollout resume dpd/NAME`: set `spec.paused`.
//! - `stragglers dpd/NAME`: every selected device whose DeviceProcess is not available, why, and
//!   since when.
//!
//! Devices are judged by the controller's own pure code ([`apollo_controller::availability`],
//! [`apollo_controller::rollout`]), so the plugin and the controller never disagree.
#![forbid(unsafe_code)]

pub mod args;
pub mod pause;
pub mod status;
pub mod stragglers;
pub mod target;

use std::process::ExitCode;

pub use args::Args;

/// Everything that can go wrong, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line names no DeviceProcessDeployment we understand.
    #[error("{0}")]
    Target(String),
    /// Loading kubeconfig.
    #[error("loading the kubeconfig: {0}")]
    Config(String),
    /// Building the client.
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// Reading from the apiserver.
    #[error("reading {what}: {source}")]
    Read {
        /// What was read.
        what: String,
        /// Cause.
        source: kube::Error,
    },
    /// Writing to the apiserver.
    #[error("updating {what}: {source}")]
    Write {
        /// What was written.
        what: String,
        /// Cause.
        source: kube::Error,
    },
    /// Following the deployment.
    #[error("watching {what}: {source}")]
    Watch {
        /// What was watched.
        what: String,
        /// Cause.
        source: kube::runtime::watcher::Error,
    },
    /// The deployment does not exist (any more).
    #[error("deviceprocessdeployments.azure.com {0:?} not found")]
    NotFound(String),
    /// `rollout pause` of a paused deployment, `resume` of a running one.
    #[error("deviceprocessdeployments.azure.com {name:?} is already {state}")]
    Already {
        /// Deployment.
        name: String,
        /// `paused` or `resumed`.
        state: &'static str,
    },
    /// The rollout halted.
    #[error("deviceprocessdeployment {name:?} rollout halted: {reason}: {message}")]
    Halted {
        /// Deployment.
        name: String,
        /// Progressing reason.
        reason: String,
        /// Progressing message.
        message: String,
    },
    /// `--timeout` passed.
    #[error("timed out waiting for the rollout of deviceprocessdeployment {0:?}")]
    Timeout(String),
    /// Writing to stdout.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

/// Run the command; the exit code follows kubectl's (0 done, 1 failed).
pub async fn run(args: Args) -> Result<ExitCode, Error> {
    let (client, default_namespace) = args.client().await?;
    let namespace = args.namespace.clone().unwrap_or(default_namespace);
    match &args.command {
        args::Command::Rollout(args::Rollout::Status(status)) => {
            let name = target::deployment_name(&status.target.target)?;
            status::follow(client, &namespace, &name, status).await
        }
        args::Command::Rollout(args::Rollout::Pause(target)) => {
            let name = target::deployment_name(&target.target)?;
            pause::set_paused(client, &namespace, &name, true).await
        }
        args::Command::Rollout(args::Rollout::Resume(target)) => {
            let name = target::deployment_name(&target.target)?;
            pause::set_paused(client, &namespace, &name, false).await
        }
        args::Command::Stragglers(target) => {
            let name = target::deployment_name(&target.target)?;
            stragglers::print(client, &namespace, &name).await
        }
    }
}

//! DeviceProcessDeployment controller: one DeviceProcess per selected device (DaemonSet semantics).
//!
//! Pure decisions, each with its unit tests:
//! - [`names`]: child names (disambiguated when another owner holds one) and label values.
//! - [`selector`]: label selectors (kube's matching, Kubernetes' validation).
//! - [`plan`]: the desired set and its difference from what exists.
//! - [`availability`]: whether one DeviceProcess is available (from the gateway's conditions).
//! - [`rollout`]: the rollout step: which children get the new spec now, and how it stands.
//! - [`status`]: the deployment's status and conditions.
//!
//! I/O at the edges:
//! - [`reconcile`]: one deployment: read the caches, decide, write.
//! - [`writes`]: the writes (children, status, Events), bounded, counted, remembered.
//! - [`events`]: Events on deployments, named so the apiserver accepts them for any object name.
//! - [`expectations`]: our own writes that the caches have not shown yet.
//! - [`memory`]: per-deployment memory, forgotten with the deployment.
//! - [`lease`]: leader election through a `coordination.k8s.io/v1` Lease.
//! - [`run`]: wiring: watches, controller, elector, admin endpoints, shutdown.
#![forbid(unsafe_code)]

pub mod admin;
pub mod args;
pub mod availability;
pub mod events;
pub mod expectations;
#[cfg(test)]
mod fixtures;
pub mod lease;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod plan;
pub mod reconcile;
pub mod rollout;
pub mod run;
pub mod selector;
pub mod status;
pub mod writes;

use std::future::Future;
use std::time::Duration;

pub use args::Args;
pub use run::run;

/// Everything that can go wrong in the controller, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading kubeconfig or in-cluster configuration.
    #[error("loading Kubernetes client configuration: {0}")]
    LoadConfig(String),
    /// Building the Kubernetes client.
    #[error("building the Kubernetes client: {0}")]
    BuildClient(#[source] kube::Error),
    /// Binding the admin listener.
    #[error("binding the admin listener on {addr}: {source}")]
    BindAdmin {
        /// Address that could not be bound.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Computing the desired children of a deployment.
    #[error("deployment {0}: {1}")]
    Desired(String, #[source] plan::DesiredError),
    /// Creating a child DeviceProcess.
    #[error("creating DeviceProcess {name}: {source}")]
    CreateChild {
        /// Child name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Updating a child DeviceProcess.
    #[error("updating DeviceProcess {name}: {source}")]
    UpdateChild {
        /// Child name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Deleting a child DeviceProcess.
    #[error("deleting DeviceProcess {name}: {source}")]
    DeleteChild {
        /// Child name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// Encoding a patch body.
    #[error("encoding the patch for {name}: {source}")]
    EncodePatch {
        /// Object name.
        name: String,
        /// Cause.
        source: serde_json::Error,
    },
    /// Patching a deployment's status.
    #[error("patching the status of DeviceProcessDeployment {name}: {source}")]
    PatchStatus {
        /// Deployment name.
        name: String,
        /// Cause.
        source: kube::Error,
    },
    /// An API call did not finish in time.
    #[error("{step} timed out after {after:?}")]
    Timeout {
        /// What was being done.
        step: &'static str,
        /// The bound that was exceeded.
        after: Duration,
    },
    /// A write was about to happen while this replica is not the leader.
    #[error("not the leader")]
    NotLeader,
}

/// Bound `call` by `after`; every outbound API call goes through here.
pub async fn with_timeout<T>(
    step: &'static str,
    after: Duration,
    call: impl Future<Output = T>,
) -> Result<T, Error> {
    tokio::time::timeout(after, call)
        .await
        .map_err(|_| Error::Timeout { step, after })
}

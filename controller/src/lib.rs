//! DeviceProcessDeployment controller: one DeviceProcess per selected device (DaemonSet semantics).
//!
//! - [`desired`]: the pure decisions (child names, desired set, diff, status).
//! - [`selector`]: Kubernetes label selector matching.
//! - [`reconcile`]: apply the decisions through the API, reading only from watch caches.
//! - [`events`]: Events on deployments, named so the apiserver accepts them for any object name.
//! - [`expectations`]: our own writes that the caches have not shown yet.
//! - [`lease`]: leader election through a `coordination.k8s.io/v1` Lease.
//! - [`run`]: wiring: watches, controller, elector, admin endpoints, shutdown.
#![forbid(unsafe_code)]

pub mod admin;
pub mod args;
pub mod desired;
pub mod events;
pub mod expectations;
#[cfg(test)]
mod fixtures;
pub mod lease;
pub mod metrics;
pub mod reconcile;
pub mod run;
pub mod selector;

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
    /// Serving the admin endpoints.
    #[error("serving admin endpoints: {0}")]
    ServeAdmin(#[source] std::io::Error),
    /// Computing the desired children of a deployment.
    #[error("deployment {0}: {1}")]
    Desired(String, #[source] desired::DesiredError),
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

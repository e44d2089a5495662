//! The gateway's one error type. Variants are named after the step that failed.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong in the gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Flags that contradict each other or are out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A secret or token file could not be read.
    #[error("reading {what} from {path}: {source}")]
    ReadSecretFile {
        /// Which flag named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },

    /// A secret or token file is empty after trimming whitespace.
    #[error("{what} file {path} is empty")]
    EmptySecretFile {
        /// Which flag named the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },

    /// Binding a listening socket failed (typically: the port is taken).
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },

    /// Serving HTTP failed after the listener was bound.
    #[error("serving {what}: {source}")]
    Serve {
        /// Which listener.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },

    /// No usable Kubernetes configuration (neither KUBECONFIG nor in-cluster).
    #[error("loading the Kubernetes client configuration: {0}")]
    KubeConfig(#[source] kube::Error),

    /// The Redis URL could not be parsed (see `apollo_runtime::redis` for its forms).
    #[error("invalid Redis URL: {0}")]
    RedisUrl(String),

    /// A Redis command failed.
    #[error("Redis {op} failed: {source}")]
    RedisCommand {
        /// The state-store operation.
        op: &'static str,
        /// Redis' error.
        source: redis::RedisError,
    },

    /// A Redis command did not answer in time.
    #[error("Redis {op} timed out")]
    RedisTimeout {
        /// The state-store operation.
        op: &'static str,
    },

    /// A script ran so long after it was issued (queued while Redis was paused or unreachable)
    /// that it refused to act on what its caller knew then.
    #[error("Redis {op} ran {lag_ms} ms after it was issued (Redis was unreachable meanwhile); it changed nothing")]
    RedisLate {
        /// The state-store operation.
        op: &'static str,
        /// How late it ran.
        lag_ms: String,
    },

    /// Redis answered with a shape our scripts never produce.
    #[error("Redis {op} returned an unexpected reply: {detail}")]
    RedisReply {
        /// The state-store operation.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },

    /// A Kubernetes call failed.
    #[error("Kubernetes {op} of {object} failed: {source}")]
    KubeCall {
        /// The call (patch status, get, create event).
        op: &'static str,
        /// `namespace/name` of the object.
        object: String,
        /// The client's error.
        source: Box<kube::Error>,
    },

    /// A Kubernetes call did not answer in time.
    #[error("Kubernetes {op} of {object} timed out")]
    KubeTimeout {
        /// The call.
        op: &'static str,
        /// `namespace/name` of the object.
        object: String,
    },
}

impl Error {
    /// Whether a state-store call failed because the connection to Redis was lost or refused
    /// (a restarted or dead server), not because it answered late (paused, overloaded): a store
    /// that comes back after that may have lost its state.
    pub fn is_store_connection_lost(&self) -> bool {
        match self {
            Error::RedisCommand { source, .. } => {
                !source.is_timeout()
                    && (source.is_connection_dropped() || source.is_connection_refusal())
            }
            _ => false,
        }
    }

    /// Whether this is a Kubernetes 409 Conflict (stale resourceVersion).
    pub fn is_conflict(&self) -> bool {
        self.kube_status() == Some(409)
    }

    /// Whether this is a Kubernetes 404 Not Found.
    pub fn is_not_found(&self) -> bool {
        self.kube_status() == Some(404)
    }

    /// Whether Kubernetes refused the request as malformed or invalid (400, 422): sending the
    /// same request again cannot succeed.
    pub fn is_invalid(&self) -> bool {
        matches!(self.kube_status(), Some(400 | 422))
    }

    /// Whether Kubernetes refused the request for lack of rights (401, 403).
    pub fn is_forbidden(&self) -> bool {
        matches!(self.kube_status(), Some(401 | 403))
    }

    /// Whether Kubernetes throttled the request (429).
    pub fn is_throttled(&self) -> bool {
        self.kube_status() == Some(429)
    }

    /// The `retryAfterSeconds` Kubernetes asked for, if any (429s, some 5xx).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::KubeCall { source, .. } => match source.as_ref() {
                kube::Error::Api(status) => status
                    .details
                    .as_ref()
                    .map(|d| d.retry_after_seconds)
                    .filter(|s| *s > 0)
                    .map(|s| std::time::Duration::from_secs(u64::from(s))),
                _ => None,
            },
            _ => None,
        }
    }

    fn kube_status(&self) -> Option<u16> {
        match self {
            Error::KubeCall { source, .. } => match source.as_ref() {
                kube::Error::Api(status) => Some(status.code),
                _ => None,
            },
            _ => None,
        }
    }
}

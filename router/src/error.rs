//! Errors of the router, named after the step that failed.

use std::net::SocketAddr;

/// Why the router could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listen address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bound socket has no local address (should not happen).
    #[error("cannot read the bound address: {0}")]
    LocalAddr(std::io::Error),
    /// The Redis URL does not parse.
    #[error("invalid --redis-url: {0}")]
    RedisUrl(apollo_runtime::redis::RedisUrlError),
}

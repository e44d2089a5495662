//! The Apollo device agent.
//!
//! An [`Agent`] long-polls its desired document with `If-None-Match`, reports the spec hashes it
//! observed as soon as a new document arrives, and heartbeats on its own timer at the interval the
//! gateway announces. Errors back off exponentially with full jitter (honouring `Retry-After`),
//! and every wait ends as soon as its [`CancellationToken`](tokio_util::sync::CancellationToken)
//! fires.
//!
//! The HTTP client is passed in, so a process running thousands of agents (the loadtest harness)
//! shares one connection pool; [`AgentMetrics`] can likewise be shared and read with
//! [`AgentMetrics::snapshot`].
//!
//! ```no_run
//! # async fn example() -> Result<(), apollo_agent::AgentError> {
//! use std::sync::Arc;
//! use apollo_agent::{Agent, AgentConfig, AgentMetrics};
//! let http = apollo_agent::http_client()?;
//! let metrics = Arc::new(AgentMetrics::default());
//! let config = AgentConfig::new("tor1-01", "http://127.0.0.1:8080".parse().expect("url"));
//! let agent = Agent::new(config, http, metrics.clone())?;
//! let cancel = tokio_util::sync::CancellationToken::new();
//! agent.run(cancel).await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod agent;
pub mod backoff;
pub mod client;
pub mod config;
pub mod desired;
mod error;
pub mod metrics;
pub mod split;
pub mod trace;

use std::time::Duration;

pub use agent::Agent;
pub use config::{AgentConfig, RawConfig};
pub use error::AgentError;
pub use metrics::{
    AgentMetrics, LatencyHistogram, MetricsSnapshot, RequestCounts, RequestKind, RequestOutcome,
};

/// Time allowed to open a TCP connection to the gateway.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An HTTP client suited to agents: connect timeout, TCP keepalive (long polls sit idle for up to
/// a minute behind NATs and load balancers), and idle connections kept for reuse. One client can
/// serve any number of agents.
pub fn http_client() -> Result<reqwest::Client, AgentError> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_keepalive(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(90))
        .user_agent(concat!("apollo-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(AgentError::BuildHttpClient)
}

//! Process plumbing shared by Apollo's binaries (gateway, router, controller, agent, loadtest):
//!
//! - always: one shutdown signal source, [`duration`] (the one duration syntax of every flag and
//!   variable) and [`backoff`] (the one retry policy), all without dependencies beyond tokio, so
//!   the agent stays light;
//! - feature `http`: one HTTP accept loop that speaks HTTP/1.1 and HTTP/2 cleartext on the same
//!   port and drains gracefully;
//! - feature `lease`: one Lease client for leader election and shard ownership;
//! - features `cli`, `admin`, `kube-client` (all three: `shell`): the process [`shell`] — argument
//!   groups flattened into every binary's `Args`, logging, the admin router, the Kubernetes client,
//!   and one way to exit;
//! - feature `redis`: one `--redis-url` syntax (a single Redis or a Redis Cluster) and one
//!   connection for both ([`redis`]).
#![forbid(unsafe_code)]

pub mod backoff;
pub mod duration;
#[cfg(feature = "lease")]
pub mod lease;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "http")]
mod serve;
#[cfg(feature = "cli")]
pub mod shell;
mod signals;

#[cfg(feature = "http")]
pub use serve::{serve, ServeOptions};
pub use signals::cancel_on_signals;

//! apollo-gateway: the device-facing HTTP API of Apollo.
//!
//! - [`cache`]: watch of DeviceProcesses indexed by `spec.deviceRef.name`, desired documents
//!   prebuilt per device, long-poll waiters woken on change.
//! - [`state`]: the state shared by replicas (Redis or memory); transitions decided atomically.
//! - [`projection`]: pure status projection and Event decisions.
//! - [`queue`] and [`status`]: the coalescing, rate-limited status writer.
//! - [`sweep`]: stale sweep and level-triggered resync over the owned slots ([`ownership`]).
//! - [`cluster`]: membership in Redis and per-shard Leases deciding which slots this replica owns.
//! - [`http`]: the device API and admin endpoints; [`server`] wires everything together.
#![forbid(unsafe_code)]

pub mod auth;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod desired;
pub mod error;
pub mod http;
pub mod metrics;
pub mod model;
pub mod ownership;
pub mod projection;
pub mod queue;
pub mod server;
pub mod state;
pub mod status;
pub mod sweep;

pub use config::{Args, Settings};
pub use error::Error;
pub use server::run;

//! apollo-gateway: the device-facing HTTP API of Apollo. Three subsystems, a folder each:
//!
//! - [`api`]: the device API — handlers, parsing, device tokens, desired documents and ETags,
//!   the error envelope.
//! - [`status`]: what is written to Kubernetes — the pure status projection and Event decisions,
//!   the per-object coalescing queue and the rate-limited writer.
//! - [`cluster`]: membership in Redis, per-shard Leases deciding which slots this replica owns,
//!   and the stale sweep and resync over them.
//!
//! Beside them: [`cache`] (watch of DeviceProcesses indexed by `spec.deviceRef.name`, desired
//! documents prebuilt per device, long-poll waiters woken on change), [`state`] (the state shared
//! by replicas, Redis or memory, transitions decided atomically), [`admin`] (health, readiness,
//! metrics), [`config`], [`metrics`], [`model`], and [`server`], which wires everything together.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod error;
pub mod metrics;
pub mod model;
pub mod server;
pub mod state;
pub mod status;

pub use config::{Args, Settings};
pub use error::Error;
pub use server::run;

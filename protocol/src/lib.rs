//! The Apollo device protocol, defined once and shared by gateway, router, agent and loadtest.
//!
//! - [`wire`]: JSON bodies of the device HTTP API (v1) and its error envelope.
//! - [`hash`]: `specHash` (canonical-JSON SHA-256) and the desired document's ETag.
//! - [`token`]: per-device HMAC tokens.
//! - [`shard`]: the fixed slot hash and jump consistent hashing of slots onto replicas.
//! - [`membership`]: gateway registrations in Redis and the route (owner or fallback) of a slot.
//!
//! Everything here is pure: no I/O, no async, cheap to depend on.
#![forbid(unsafe_code)]

pub mod hash;
pub mod membership;
pub mod parse;
pub mod shard;
pub mod token;
pub mod wire;

/// Header carrying the device token (alternatively `Authorization: Bearer <token>`).
pub const DEVICE_TOKEN_HEADER: &str = "x-device-token";
/// Header naming the gateway ordinal that answered a device request.
pub const GATEWAY_HEADER: &str = "x-apollo-gateway";
/// Header (value `1`) on a gateway's 503 meaning "this replica is not ready yet" (its watch cache
/// has not synced): a router retries the request on the fallback replica instead of passing the
/// 503 on. Other 503s (request budget exhausted, state store down) are not retried elsewhere.
pub const NOT_READY_HEADER: &str = "x-apollo-not-ready";
/// Largest accepted `/report` or `/connect` body.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;
/// Longest long poll the gateway holds (`waitSeconds` is capped to this).
pub const MAX_WAIT_SECONDS: u64 = 60;

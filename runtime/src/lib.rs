//! Process plumbing shared by Apollo's servers (gateway, router, controller, agent): one shutdown
//! signal source, one HTTP accept loop that speaks HTTP/1.1 and HTTP/2 cleartext on the same port
//! and drains gracefully (feature `http`), and one Lease client for leader election and shard
//! ownership (feature `lease`).
#![forbid(unsafe_code)]

#[cfg(feature = "lease")]
pub mod lease;
#[cfg(feature = "http")]
mod serve;
mod signals;

#[cfg(feature = "http")]
pub use serve::{serve, ServeOptions};
pub use signals::cancel_on_signals;

//! Process plumbing shared by Apollo's servers (gateway, router, controller, agent): one shutdown
//! signal source, and one HTTP accept loop that speaks HTTP/1.1 and HTTP/2 cleartext on the same
//! port and drains gracefully.
#![forbid(unsafe_code)]

#[cfg(feature = "http")]
mod serve;
mod signals;

#[cfg(feature = "http")]
pub use serve::{serve, ServeOptions};
pub use signals::cancel_on_signals;

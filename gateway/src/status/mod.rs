//! What the gateway writes to Kubernetes and when: the pure status projection and Event
//! decisions ([`projection`]), the per-object coalescing queue ([`queue`]) and the rate-limited,
//! resourceVersion-guarded writer that drains it ([`writer`]).

pub mod projection;
pub mod queue;
pub mod writer;

pub use writer::{now_rfc3339, StatusWriter, WriterConfig};

//! The local Apollo stack, as separate processes on loopback: kubesim (or a real cluster), a
//! redis-server, the controller, a gateway "StatefulSet", the router and agents.
//!
//! Used by the `apollo-dev` binary (the README's run command) and by the end-to-end tests, so what
//! a person pokes at with kubectl is exactly what the tests prove.
//!
//! The gateway StatefulSet is a real `apps/v1` StatefulSet object: [`scaler`] plays the
//! StatefulSet controller, starting and stopping `apollo-gateway --ordinal i` processes to match
//! `spec.replicas` (so `kubectl scale statefulset apollo-gateway --replicas=N` works) and writing
//! its status.
#![forbid(unsafe_code)]

pub mod control;
pub mod fleet;
pub mod samples;
pub mod scaler;
pub mod stack;

pub use stack::{Ports, Stack, StackConfig};

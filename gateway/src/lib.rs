//! Device-facing HTTP API, indexed cache, Redis state, status projection, stale sweeps
#![forbid(unsafe_code)]

//! Shared test support: real processes on loopback, redis-server, kubesim, wait_until
#![forbid(unsafe_code)]

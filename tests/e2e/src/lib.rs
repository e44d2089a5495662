//! End-to-end tests live in `tests/`: the sharded cluster, the README's demo, tracing into Jaeger
//! and the deployment files, all against the real control plane through `apollo_dev::Stack`.
#![forbid(unsafe_code)]

//! `apollo-router` binary: parse flags, then run in the shared process shell (logging, one
//! shutdown signal, exit status) until SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use std::process::ExitCode;

/// Every request allocates and frees its head, buffers and futures; glibc's malloc was 10-15% of
/// the 304 path's CPU (`scripts/bench-vs-nginx.sh`, docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use apollo_runtime::shell::{self, Failure};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = apollo_router::Args::parse();
    shell::run("apollo-router", args.log, |shutdown| async move {
        apollo_router::run(args, shutdown)
            .await
            .map_err(Failure::runtime)
    })
    .await
}

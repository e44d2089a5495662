//! `apollo-gateway` binary: parse flags, then run in the shared process shell (logging, one
//! shutdown signal, exit status 2 for bad flags, 1 when running fails) until SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use std::process::ExitCode;

/// Every request allocates and frees its head, buffers and futures; glibc's malloc was 10-15% of
/// the 304 path's CPU (`scripts/bench-vs-nginx.sh`, docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use apollo_gateway::{Args, Error, Settings};
use apollo_runtime::shell::{self, Failure};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    shell::run("apollo-gateway", args.log, |shutdown| async move {
        let settings = Settings::from_args(&args).map_err(|error| match error {
            Error::InvalidConfig(message) => Failure::Config(message),
            // An unreadable or empty secret file is configuration too.
            other => Failure::config(other),
        })?;
        apollo_gateway::run(settings, shutdown)
            .await
            .map_err(Failure::runtime)
    })
    .await
}

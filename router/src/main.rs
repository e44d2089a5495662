//! `apollo-router` binary: parse flags, then run in the shared process shell (logging, one
//! shutdown signal, exit status) until SIGTERM/SIGINT.
#![forbid(unsafe_code)]

use std::process::ExitCode;

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

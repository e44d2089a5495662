//! `apollo-controller`: keeps one DeviceProcess per NetworkSwitch selected by each
//! DeviceProcessDeployment. Runs in the shared process shell: logging, one shutdown signal, exit
//! status 2 for bad flags, 1 when running fails.
#![forbid(unsafe_code)]

use std::process::ExitCode;

/// A reconcile over a large fleet builds and drops hundreds of thousands of small objects (the
/// desired children, their labels and names); with glibc's malloc most of its time went to the
/// allocator. `cargo bench -p apollo-controller --bench reconcile`, 100,000 children: 1.07 s ->
/// 0.39 s per reconcile's computing.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use apollo_controller::args::Args;
use apollo_runtime::shell::{self, Failure};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    shell::run("apollo-controller", args.log, |shutdown| async move {
        args.validate().map_err(Failure::config)?;
        apollo_controller::run(args, shutdown)
            .await
            .map_err(Failure::runtime)
    })
    .await
}

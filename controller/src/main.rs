//! `apollo-controller`: keeps one DeviceProcess per NetworkSwitch selected by each
//! DeviceProcessDeployment. Runs in the shared process shell: logging, one shutdown signal, exit
//! status 2 for bad flags, 1 when running fails.
#![forbid(unsafe_code)]

use std::process::ExitCode;

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

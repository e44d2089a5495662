//! `loadtest`: see the library docs. Prints a Markdown table of results (and JSON with --json).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use apollo_runtime::shell::{self, Failure};
use clap::Parser;

const PROGRAM: &str = "loadtest";

#[tokio::main]
async fn main() -> ExitCode {
    let args = apollo_loadtest::Args::parse();
    // Thousands of agents log a line each when they connect: warnings only unless RUST_LOG says.
    let _telemetry = args.log.init_with_default_filter(PROGRAM, "warn");
    shell::exit(PROGRAM, run(args).await)
}

async fn run(args: apollo_loadtest::Args) -> Result<(), Failure> {
    let json = args.json.clone();
    let results = apollo_loadtest::run(args)
        .await
        .map_err(|e| Failure::runtime(format!("{e:#}")))?;
    println!("{}", apollo_loadtest::render(&results));
    if let Some(path) = json {
        match serde_json::to_vec_pretty(&results) {
            Ok(bytes) => std::fs::write(&path, bytes)
                .map_err(|e| Failure::runtime(format!("cannot write {}: {e}", path.display())))?,
            Err(e) => eprintln!("loadtest: cannot encode results: {e}"),
        }
        let chart = apollo_loadtest::chart::path_next_to(&path);
        let title = format!(
            "loadtest: {} agents, {} gateways",
            results.devices, results.gateways
        );
        if let Err(e) = apollo_loadtest::chart::draw(&chart, &title, &results.timeline) {
            eprintln!("loadtest: cannot draw {}: {e:#}", chart.display());
        }
    }
    Ok(())
}

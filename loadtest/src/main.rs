//! `loadtest`: see the library docs. Prints a Markdown table of results (and JSON with --json).
#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = apollo_loadtest::Args::parse();
    let json = args.json.clone();
    match apollo_loadtest::run(args).await {
        Ok(results) => {
            println!("{}", apollo_loadtest::render(&results));
            if let Some(path) = json {
                match serde_json::to_vec_pretty(&results) {
                    Ok(bytes) => {
                        if let Err(e) = std::fs::write(&path, bytes) {
                            eprintln!("loadtest: cannot write {}: {e}", path.display());
                            return std::process::ExitCode::FAILURE;
                        }
                    }
                    Err(e) => eprintln!("loadtest: cannot encode results: {e}"),
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

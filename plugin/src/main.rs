//! `kubectl-apollo`: run as `kubectl apollo ...` (kubectl finds it on PATH).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = kubectl_apollo::Args::parse();
    match kubectl_apollo::run(args).await {
        Ok(code) => code,
        Err(error) => {
            // As kubectl reports errors.
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

//! `kubesim --listen 127.0.0.1:PORT --kubeconfig-out PATH`: the emulator as a process.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

/// Kubernetes API emulator over plain HTTP, for tests and the local stack.
#[derive(Debug, Parser)]
#[command(name = "kubesim", version)]
struct Args {
    /// Address to listen on (loopback; port 0 picks a free port).
    #[arg(long, env = "APOLLO_KUBESIM_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to write a kubeconfig pointing at this server.
    #[arg(long, env = "APOLLO_KUBESIM_KUBECONFIG_OUT")]
    kubeconfig_out: PathBuf,
    /// Watch events kept per resource; older resume points get 410 Expired.
    #[arg(long, env = "APOLLO_KUBESIM_HISTORY_WINDOW", default_value_t = 1000)]
    history_window: usize,
    /// Seconds between watch bookmarks.
    #[arg(
        long,
        env = "APOLLO_KUBESIM_BOOKMARK_INTERVAL_SECONDS",
        default_value_t = 5
    )]
    bookmark_interval_seconds: u64,
    /// Server URL to write into the kubeconfig instead of `http://<listen address>` (for clients
    /// that reach kubesim under another name, e.g. in docker compose).
    #[arg(long, env = "APOLLO_KUBESIM_ADVERTISE_URL")]
    advertise_url: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let options = kubesim::Options {
        listen: args.listen,
        kubeconfig_path: Some(args.kubeconfig_out.clone()),
        history_window: args.history_window,
        bookmark_interval: Duration::from_secs(args.bookmark_interval_seconds.max(1)),
        advertise_url: args.advertise_url.clone(),
    };
    let mut sim = kubesim::KubeSim::start(options)
        .await
        .with_context(|| format!("kubesim could not start on {}", args.listen))?;
    println!("kubesim listening on {}", sim.url());
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let token = sim.shutdown_token();
    tokio::select! {
        _ = terminate.recv() => token.cancel(),
        _ = interrupt.recv() => token.cancel(),
        stopped = sim.stopped() => return stopped.context("kubesim stopped serving"),
    }
    sim.shutdown()
        .await
        .context("kubesim shut down with an error")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn args_are_consistent() {
        Args::command().debug_assert();
    }
}

//! `apollo-bench-stack`: the local stack (real control plane, redis-server, controller, gateway
//! StatefulSet, router) with a fleet of DeviceProcesses and no agents, held for an external load
//! generator (`scripts/bench-vs-nginx.sh` drives it with wrk).
//!
//! Once every device's desired document is served, it writes into `--out`:
//! - `stack.env`: `ROUTER`, `GATEWAY_<i>` (host:port), `PID_<role>` for every process of the stack;
//! - `devices.tsv`: `device  token  etag  ordinal-of-the-gateway-that-answered`;
//!
//! then holds everything until SIGTERM or SIGINT, and stops it.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use apollo_crds::DeviceProcess;
use apollo_dev::{Kubernetes, Ports, Stack, StackConfig};
use apollo_loadtest::{clients, device_names, fleet, procstat};
use clap::Parser;
use futures::StreamExt;
use kube::api::Api;

#[derive(Parser, Debug)]
#[command(
    name = "apollo-bench-stack",
    about = "Hold the local stack with a fleet for a benchmark"
)]
struct Args {
    /// DeviceProcesses (one NetworkSwitch each).
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Gateway replicas.
    #[arg(long, default_value_t = 3)]
    gateways: u32,
    /// Device name prefix.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// Where the stack keeps its files, and where stack.env and devices.tsv go.
    #[arg(long, default_value = "target/bench-vs-nginx")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apollo-bench-stack: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    clients::raise_fd_limit()?;
    std::fs::create_dir_all(&args.out)?;
    let out = args.out.canonicalize()?;
    let _ = std::fs::remove_file(out.join("stack.env"));
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("no directory")?
        .to_path_buf();
    let mut cfg = StackConfig::demo(out.clone(), bin_dir);
    cfg.kubernetes = Kubernetes::Own {
        dir: out.join("control-plane"),
    };
    cfg.jaeger = false;
    cfg.gateways = args.gateways;
    cfg.devices = Vec::new();
    cfg.run_agents = false;
    cfg.install_samples = false;
    cfg.heartbeat_interval_seconds = 15;
    cfg.sweep_interval_seconds = 5;
    cfg.ports = Ports::ephemeral();
    // As in production: no access log line per request.
    cfg.server_env
        .push(("RUST_LOG".into(), "info,apollo_gateway::access=warn".into()));
    let stack = Stack::start(cfg).await?;
    let client = stack.client();
    let ns = stack.namespace().to_owned();
    let devices = device_names(&args.prefix, args.devices);
    let dep = fleet::create(&client, &ns, &devices, &args.prefix).await?;
    let watch = fleet::Fleet::start(Api::<DeviceProcess>::namespaced(client, &ns), &dep).await?;
    let n = devices.len();
    watch
        .wait("DeviceProcesses created", Duration::from_secs(600), |c| {
            c.existing == n
        })
        .await?;
    drop(watch);

    // Every device's document through the router, until each is served (the caches have it).
    let http = reqwest::Client::new();
    let router = stack.router_url();
    let rows = futures::stream::iter(devices.iter().cloned())
        .map(|device| {
            let http = http.clone();
            let token = stack.token(&device);
            let url = format!("{router}/v1/devices/{device}/desired");
            async move {
                for _ in 0..600 {
                    let resp = http
                        .get(&url)
                        .header(apollo_protocol::DEVICE_TOKEN_HEADER, &token)
                        .send()
                        .await;
                    if let Ok(resp) = resp {
                        let etag = resp.headers().get(reqwest::header::ETAG).cloned();
                        let ordinal = resp
                            .headers()
                            .get(apollo_protocol::GATEWAY_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("?")
                            .to_owned();
                        if let (true, Some(etag)) = (resp.status().is_success(), etag) {
                            let etag = etag.to_str().unwrap_or_default().to_owned();
                            return Ok(format!("{device}\t{token}\t{etag}\t{ordinal}\n"));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                bail!("{device}: no desired document within a minute")
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<anyhow::Result<String>>>()
        .await;
    let mut tsv = String::new();
    for row in rows {
        tsv.push_str(&row?);
    }
    std::fs::write(out.join("devices.tsv"), tsv)?;

    let mut env = String::new();
    writeln!(env, "ROUTER={}", router.trim_start_matches("http://"))?;
    for o in stack.gateways().ordinals() {
        if let Some(addr) = stack.gateways().addr(o) {
            writeln!(env, "GATEWAY_{o}={addr}")?;
        }
    }
    for p in procstat::stack_processes() {
        let role = p.role.replace(['-', '#'], "_");
        writeln!(env, "PID_{role}={}", p.pid)?;
    }
    // Written last, renamed into place: its presence means ready.
    std::fs::write(out.join("stack.env.tmp"), env)?;
    std::fs::rename(out.join("stack.env.tmp"), out.join("stack.env"))?;
    eprintln!(
        "apollo-bench-stack: ready ({n} devices, {} gateways); {}",
        args.gateways,
        out.join("stack.env").display()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = std::fs::remove_file(out.join("stack.env"));
    stack.shutdown().await;
    Ok(())
}

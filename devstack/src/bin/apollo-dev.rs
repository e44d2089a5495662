//! `apollo-dev`: runs the whole Apollo stack on this machine (what `scripts/dev.sh` starts).
//!
//! `apollo-dev up` starts the real control plane (etcd, kube-apiserver, kube-controller-manager),
//! redis-server, Jaeger, the controller, a 3-replica gateway StatefulSet, the router and two
//! agents, installs the CRDs, RBAC and the seed demo's objects, prints what to try, and stops
//! everything on Ctrl-C.
//! `apollo-dev agent stop|start DEVICE` and `apollo-dev status` talk to a running `up`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use apollo_dev::{Kubernetes, Ports, Stack, StackConfig, SYSTEM_NAMESPACE};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "apollo-dev", about = "Run the Apollo stack locally")]
struct Cli {
    /// Port of the control endpoint of a running `up`.
    #[arg(long, env = "APOLLO_DEV_CONTROL_PORT", default_value_t = Ports::dev().control, global = true)]
    control_port: u16,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the stack in the foreground (the default).
    Up(Up),
    /// Stop or start one agent of a running stack.
    Agent {
        /// `stop` or `start`.
        #[arg(value_parser = ["stop", "start"])]
        action: String,
        /// Device name, e.g. tor1-02.
        device: String,
    },
    /// Show what a running stack is running.
    Status,
}

#[derive(clap::Args, Debug, Default)]
struct Up {
    /// Where logs, the control plane (certificates, kubeconfig, audit log) and the HMAC key go.
    #[arg(long, env = "APOLLO_DEV_WORK_DIR", default_value = ".apollo-dev")]
    work_dir: PathBuf,
    /// Do not start Jaeger (components then export no traces).
    #[arg(long, env = "APOLLO_DEV_NO_JAEGER")]
    no_jaeger: bool,
    /// Do not start Prometheus.
    #[arg(long, env = "APOLLO_DEV_NO_PROMETHEUS")]
    no_prometheus: bool,
    /// Initial gateway replicas.
    #[arg(long, env = "APOLLO_DEV_GATEWAYS", default_value_t = 3)]
    gateways: u32,
    /// Devices (NetworkSwitches with an agent each).
    #[arg(
        long,
        env = "APOLLO_DEV_DEVICES",
        value_delimiter = ',',
        default_value = "tor1-01,tor1-02"
    )]
    devices: Vec<String>,
    /// Gateway heartbeat interval in seconds (stale after 3x).
    #[arg(long, env = "APOLLO_DEV_HEARTBEAT_SECONDS", default_value_t = 5)]
    heartbeat_interval_seconds: u64,
    /// Run a Redis Cluster of this many masters (3 or more, a replica each) instead of one
    /// redis-server.
    #[arg(long, env = "APOLLO_DEV_REDIS_CLUSTER",
          value_parser = clap::value_parser!(u8).range(3..))]
    redis_cluster: Option<u8>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Up(Up::default_from_env())) {
        Command::Up(up) => run_up(up, cli.control_port).await,
        Command::Agent { action, device } => {
            control(
                cli.control_port,
                reqwest::Method::POST,
                &format!("agents/{device}/{action}"),
            )
            .await
        }
        Command::Status => control(cli.control_port, reqwest::Method::GET, "status").await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apollo-dev: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

impl Up {
    fn default_from_env() -> Self {
        // `apollo-dev` with no subcommand behaves like `apollo-dev up` with its defaults.
        match Cli::try_parse_from(["apollo-dev", "up"]) {
            Ok(Cli {
                command: Some(Command::Up(up)),
                ..
            }) => up,
            _ => Up::default(),
        }
    }
}

async fn control(port: u16, method: reqwest::Method, path: &str) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{port}/{path}");
    let resp = reqwest::Client::new()
        .request(method, &url)
        .send()
        .await
        .with_context(|| format!("is `scripts/dev.sh` running? cannot reach {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
    }
    if !status.is_success() {
        bail!("{status}");
    }
    Ok(())
}

/// How often the local Prometheus scrapes (and evaluates the alert rules).
const PROMETHEUS_SCRAPE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

async fn run_up(up: Up, control_port: u16) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locate apollo-dev")?;
    let bin_dir = exe
        .parent()
        .context("apollo-dev has no parent directory")?
        .to_path_buf();
    std::fs::create_dir_all(&up.work_dir)
        .with_context(|| format!("create {}", up.work_dir.display()))?;
    let work_dir = up.work_dir.canonicalize()?;
    let mut ports = Ports::dev();
    ports.control = control_port;
    let mut cfg = StackConfig::demo(work_dir.clone(), bin_dir);
    cfg.kubernetes = Kubernetes::Own {
        dir: work_dir.join("control-plane"),
    };
    cfg.jaeger = !up.no_jaeger;
    cfg.prometheus = (!up.no_prometheus).then_some(PROMETHEUS_SCRAPE_INTERVAL);
    cfg.gateways = up.gateways;
    cfg.devices = up.devices.clone();
    cfg.heartbeat_interval_seconds = up.heartbeat_interval_seconds;
    if let Some(masters) = up.redis_cluster {
        cfg.redis = apollo_dev::RedisChoice::Cluster {
            masters: usize::from(masters),
            replicas: 1,
        };
    }
    cfg.ports = ports.clone();

    println!("Starting Apollo (logs in {}/logs) ...", work_dir.display());
    let stack = Stack::start(cfg).await?;
    let stack = Arc::new(stack);
    let shutdown = CancellationToken::new();
    let control = tokio::spawn(apollo_dev::control::serve(
        stack.clone(),
        ([127, 0, 0, 1], control_port).into(),
        shutdown.clone(),
    ));
    let version = stack
        .client()
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .unwrap_or_else(|e| format!("version unknown: {e}"));
    print_guide(&stack, &up, &version);

    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    println!("\nStopping Apollo ...");
    shutdown.cancel();
    let _ = control.await;
    match Arc::try_unwrap(stack) {
        Ok(stack) => stack.shutdown().await,
        Err(_) => eprintln!("apollo-dev: stack still in use; killing its processes"),
    }
    println!("Stopped. Nothing is left running.");
    Ok(())
}

fn print_guide(stack: &Stack, up: &Up, version: &str) {
    let kc = stack.kubeconfig();
    let kc = kc.display();
    let first = up.devices.first().map(String::as_str).unwrap_or("tor1-01");
    let second = up.devices.get(1).map(String::as_str).unwrap_or(first);
    let stale = up.heartbeat_interval_seconds * 3;
    let jaeger = stack
        .jaeger()
        .map(|j| format!("{} (OTLP {})", j.ui_url(), j.otlp_endpoint()))
        .unwrap_or_else(|| "off".into());
    let prometheus = stack
        .prometheus()
        .map(|p| {
            format!(
                "{} (scrapes every component every {}s; alert rules deploy/monitoring/alerts.yaml)",
                p.url(),
                p.scrape_interval().as_secs()
            )
        })
        .unwrap_or_else(|| "off".into());
    println!(
        r#"
Apollo is running.
  Kubernetes API : {k8s} (kube-apiserver {version}; logs and audit log in {cp})
  kubeconfig     : {kc}
  router (agents): {router}   (metrics: {router_admin}/metrics)
  redis          : {redis}
  jaeger         : {jaeger}
  prometheus     : {prometheus}
  gateways       : {gateways:?} (StatefulSet {sys}/apollo-gateway)
  agents         : {agents:?}
  logs           : {logs}

Try, in another terminal:
  export KUBECONFIG={kc}
  kubectl get nsw,dpd,dp
  kubectl describe dp {dep}-{first}
  kubectl get dp -w
  # edit the template: the agents observe the new specHash within a second
  kubectl patch dpd {dep} --type merge -p '{{"spec":{{"template":{{"spec":{{"execution":{{"args":["echo","updated"]}}}}}}}}}}'
  # stop an agent: AgentConnected=False and one Warning event after {stale}s; start it again
  scripts/dev.sh agent stop {second}
  scripts/dev.sh agent start {second}
  # ... and Prometheus: devices the gateways marked disconnected, per replica (a scrape later)
  curl -s {prometheus_url}/api/v1/query --data-urlencode 'query=sum by (pod) (apollo_gateway_transitions_total{{kind="disconnected"}})'
  # scale the gateways; the router rebalances devices
  kubectl -n {sys} scale statefulset apollo-gateway --replicas=5
  kubectl -n {sys} get sts,pods
  # ETags at work: 200 once, then 304s
  grep -h 'GET /v1/devices' {logs}/gateway-*.log | tail
  curl -s {router}/v1/devices/{first}/desired -H "X-Device-Token: $(cat {work}/tokens/{first})"
  # the trace of each report
  curl -s '{jaeger_ui}/api/traces?service=apollo-gateway&limit=5'

Press Ctrl-C to stop everything."#,
        k8s = stack.apiserver_url(),
        cp = stack.control_plane_dir().display(),
        router = stack.router_url(),
        router_admin = stack.router_admin_url(),
        redis = stack.redis_url(),
        gateways = stack.gateways().ordinals(),
        agents = stack.running_agents(),
        logs = stack.log_dir().display(),
        work = stack.config().work_dir.display(),
        dep = apollo_dev::samples::SAMPLE_DEPLOYMENT,
        sys = SYSTEM_NAMESPACE,
        jaeger_ui = stack.jaeger().map(|j| j.ui_url()).unwrap_or_default(),
        prometheus_url = stack.prometheus().map(|p| p.url()).unwrap_or_default(),
    );
}

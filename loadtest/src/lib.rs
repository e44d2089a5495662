//! The load test harness: thousands of real agents (the `apollo-agent` library, sharing one HTTP
//! connection pool) in one process, against a router.
//!
//! Two modes:
//! - `--local-stack` (default when no `--router-url` is given): starts the whole stack on loopback
//!   (the real control plane, redis-server, controller, N gateways, router), creates one
//!   NetworkSwitch per simulated device and a DeviceProcessDeployment selecting them all, and
//!   measures what matters to operators: time to converge, agent request rates and latencies, the
//!   200/304 split, and the Kubernetes API requests Apollo's components spent in steady state and
//!   per rollout wave (read from kube-apiserver's audit log).
//! - `--router-url URL --secret-file F`: drives an existing deployment; agent-side numbers only.
#![forbid(unsafe_code)]

pub mod rollout;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use apollo_agent::{Agent, AgentConfig, AgentMetrics, MetricsSnapshot, RequestCounts};
use apollo_crds::{DeviceProcess, DeviceProcessDeployment, NetworkSwitch};
use apollo_dev::{Kubernetes, Ports, Stack, StackConfig};
use apollo_runtime::duration::{DurationParser, Human};
use apollo_runtime::shell::LogArgs;
use clap::Parser;
use futures::StreamExt;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Command line of `loadtest`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadtest",
    about = "Simulate thousands of Apollo agents and report the numbers"
)]
pub struct Args {
    /// Simulated devices (one agent each).
    #[arg(long, env = "APOLLO_LT_DEVICES", default_value_t = 2000)]
    pub devices: usize,
    /// Steady-state measurement window (`60s`, `5m`).
    #[arg(long, env = "APOLLO_LT_DURATION", default_value = "60s", value_parser = WINDOW)]
    duration: Duration,
    /// Agents are started evenly over this long.
    #[arg(long, env = "APOLLO_LT_RAMP", default_value = "10s", value_parser = WINDOW)]
    ramp: Duration,
    /// Gateway replicas of the local stack.
    #[arg(long, env = "APOLLO_LT_GATEWAYS", default_value_t = 3)]
    pub gateways: u32,
    /// Heartbeat interval the gateways announce (local stack), whole seconds.
    #[arg(long, env = "APOLLO_LT_HEARTBEAT_INTERVAL", default_value = "15s",
          value_parser = HEARTBEAT)]
    heartbeat_interval: Duration,
    /// Long-poll wait of each agent, whole seconds.
    #[arg(long, env = "APOLLO_LT_POLL_WAIT", default_value = "30s", value_parser = POLL_WAIT)]
    poll_wait: Duration,
    /// Old spelling of --duration: seconds.
    #[arg(long, env = "APOLLO_LT_DURATION_SECONDS", hide = true, conflicts_with = "duration",
          value_parser = WINDOW)]
    duration_seconds: Option<Duration>,
    /// Old spelling of --ramp: seconds.
    #[arg(long, env = "APOLLO_LT_RAMP_SECONDS", hide = true, conflicts_with = "ramp",
          value_parser = WINDOW)]
    ramp_seconds: Option<Duration>,
    /// Old spelling of --heartbeat-interval: seconds.
    #[arg(long, env = "APOLLO_LT_HEARTBEAT_SECONDS", hide = true,
          conflicts_with = "heartbeat_interval", value_parser = HEARTBEAT)]
    heartbeat_interval_seconds: Option<Duration>,
    /// Old spelling of --poll-wait: seconds.
    #[arg(long, env = "APOLLO_LT_POLL_WAIT_SECONDS", hide = true, conflicts_with = "poll_wait",
          value_parser = POLL_WAIT)]
    poll_wait_seconds: Option<Duration>,
    /// Skip the rollout wave (template change) measurement.
    #[arg(long, env = "APOLLO_LT_NO_ROLLOUT")]
    pub no_rollout: bool,
    /// `maxUnavailable` of the measured rollout wave: a count or a percentage of the devices.
    #[arg(long, env = "APOLLO_LT_MAX_UNAVAILABLE", default_value = "25%")]
    pub max_unavailable: String,
    /// Measure an `AllAtOnce` wave instead of a rolling update.
    #[arg(long, env = "APOLLO_LT_ALL_AT_ONCE")]
    pub all_at_once: bool,
    /// Drive an existing router instead of starting the local stack.
    #[arg(long, env = "APOLLO_LT_ROUTER_URL", requires = "secret_file")]
    pub router_url: Option<String>,
    /// HMAC key file of the existing deployment (device tokens are derived from it).
    #[arg(long, env = "APOLLO_LT_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// The local stack's gateways and router use this Redis instead of a redis-server of their
    /// own: `redis://host:port`, or a Redis Cluster (`redis+cluster://host:port,host:port/` or a
    /// list of `redis://` URLs; see apollo_runtime::redis).
    #[arg(long, env = "APOLLO_LT_REDIS_URL", value_parser = redis_url,
          conflicts_with_all = ["redis_cluster", "router_url"])]
    pub redis_url: Option<String>,
    /// The local stack runs a Redis Cluster of this many masters (3 or more, one replica each)
    /// instead of one redis-server.
    #[arg(long, env = "APOLLO_LT_REDIS_CLUSTER", value_parser = clap::value_parser!(u8).range(3..),
          conflicts_with = "router_url")]
    pub redis_cluster: Option<u8>,
    /// Device name prefix.
    #[arg(long, env = "APOLLO_LT_PREFIX", default_value = "lt")]
    pub prefix: String,
    /// Where the local stack keeps its logs.
    #[arg(long, env = "APOLLO_LT_WORK_DIR", default_value = "target/loadtest")]
    pub work_dir: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long, env = "APOLLO_LT_JSON")]
    pub json: Option<PathBuf>,
    /// Warnings of the agents and the harness go to stderr (`RUST_LOG` for more).
    #[command(flatten)]
    pub log: LogArgs,
}

/// A `--redis-url` in any of its forms, checked here so that a typo exits before the stack starts.
fn redis_url(url: &str) -> Result<String, String> {
    apollo_runtime::redis::RedisTarget::parse(url)
        .map(|_| url.to_owned())
        .map_err(|e| e.to_string())
}

impl Args {
    /// The Redis of the local stack (`--redis-url`, `--redis-cluster`, else a redis-server).
    pub fn redis_choice(&self) -> apollo_dev::RedisChoice {
        match (&self.redis_url, self.redis_cluster) {
            (Some(url), _) => apollo_dev::RedisChoice::External(url.clone()),
            (None, Some(masters)) => apollo_dev::RedisChoice::Cluster {
                masters: usize::from(masters),
                replicas: 1,
            },
            (None, None) => apollo_dev::RedisChoice::Server,
        }
    }
}

/// Measurement windows and ramps.
const WINDOW: DurationParser = DurationParser::new().at_most(Duration::from_secs(24 * 3600));
/// The gateways announce whole seconds.
const HEARTBEAT: DurationParser = DurationParser::new()
    .at_least(Duration::from_secs(1))
    .at_most(Duration::from_secs(3600))
    .whole_seconds();
/// Sent as `waitSeconds`.
const POLL_WAIT: DurationParser = DurationParser::new()
    .at_most(Duration::from_secs(apollo_protocol::MAX_WAIT_SECONDS))
    .whole_seconds();

impl Args {
    /// Steady-state measurement window (`--duration`, or its old spelling).
    pub fn duration(&self) -> Duration {
        self.duration_seconds.unwrap_or(self.duration)
    }

    /// Ramp of the agents' start (`--ramp`, or its old spelling).
    pub fn ramp(&self) -> Duration {
        self.ramp_seconds.unwrap_or(self.ramp)
    }

    /// Heartbeat interval of the local stack (`--heartbeat-interval`, or its old spelling).
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval_seconds
            .unwrap_or(self.heartbeat_interval)
    }

    /// Long-poll wait of each agent (`--poll-wait`, or its old spelling).
    pub fn poll_wait(&self) -> Duration {
        self.poll_wait_seconds.unwrap_or(self.poll_wait)
    }
}

/// Device names of the run.
pub fn device_names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// Agent-side numbers over one window.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Window {
    /// Window length in seconds.
    pub seconds: f64,
    /// Requests per second of every kind.
    pub requests_per_second: f64,
    /// /desired answered 200.
    pub desired_200: u64,
    /// /desired answered 304.
    pub desired_304: u64,
    /// /report calls.
    pub reports: u64,
    /// Reports per second.
    pub reports_per_second: f64,
    /// Mean report latency, ms.
    pub report_mean_ms: f64,
    /// Report latency p50 (upper bound of its histogram bucket), ms.
    pub report_p50_ms: f64,
    /// Report latency p99 (upper bound of its histogram bucket), ms.
    pub report_p99_ms: f64,
    /// Failed requests of every kind.
    pub errors: u64,
}

fn diff(after: RequestCounts, before: RequestCounts) -> RequestCounts {
    RequestCounts {
        ok: after.ok - before.ok,
        not_modified: after.not_modified - before.not_modified,
        http_error: after.http_error - before.http_error,
        transport_error: after.transport_error - before.transport_error,
        latency_micros_total: after.latency_micros_total - before.latency_micros_total,
    }
}

/// Numbers between two snapshots taken `elapsed` apart.
pub fn window(before: &MetricsSnapshot, after: &MetricsSnapshot, elapsed: Duration) -> Window {
    let desired = diff(after.desired, before.desired);
    let report = diff(after.report, before.report);
    let connect = diff(after.connect, before.connect);
    let secs = elapsed.as_secs_f64().max(1e-9);
    let latency = after.report_latency.since(&before.report_latency);
    let q = |p: f64| {
        latency
            .quantile_upper_bound(p)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let total = desired.total() + report.total() + connect.total();
    Window {
        seconds: secs,
        requests_per_second: total as f64 / secs,
        desired_200: desired.ok,
        desired_304: desired.not_modified,
        reports: report.total(),
        reports_per_second: report.total() as f64 / secs,
        report_mean_ms: if report.total() == 0 {
            0.0
        } else {
            report.latency_micros_total as f64 / report.total() as f64 / 1000.0
        },
        errors: desired.errors() + report.errors() + connect.errors(),
        report_p50_ms: q(0.5),
        report_p99_ms: q(0.99),
    }
}

/// Kubernetes API requests of Apollo's components over a window, from the apiserver's audit log.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApiCost {
    /// create/update/patch/delete on deviceprocesses (incl. /status).
    pub deviceprocess_writes: u64,
    /// Of those, writes of `/status` (the gateways' status patches).
    pub status_writes: u64,
    /// Events created or patched.
    pub event_writes: u64,
    /// Lease writes (leader election and shard leases).
    pub lease_writes: u64,
    /// List calls on any resource.
    pub lists: u64,
    /// Get calls on deviceprocesses.
    pub deviceprocess_gets: u64,
}

/// What Apollo's components (their ServiceAccounts) asked of the apiserver since the last reset.
async fn api_cost(stack: &Stack) -> ApiCost {
    let mut cost = ApiCost::default();
    for r in stack.system().requests().await {
        match (r.resource.as_str(), r.is_write()) {
            ("deviceprocesses", true) => {
                cost.deviceprocess_writes += 1;
                if r.subresource == "status" {
                    cost.status_writes += 1;
                }
            }
            ("events", true) => cost.event_writes += 1,
            ("leases", true) => cost.lease_writes += 1,
            ("deviceprocesses", false) if r.verb == "get" => cost.deviceprocess_gets += 1,
            _ => {}
        }
        if r.verb == "list" {
            cost.lists += 1;
        }
    }
    cost
}

/// Everything a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Results {
    /// Simulated devices.
    pub devices: usize,
    /// Gateway replicas (local stack).
    pub gateways: u32,
    /// Seconds from the first agent start until every DeviceProcess showed AgentConnected=True
    /// and SpecObserved=True (local stack).
    pub converge_seconds: Option<f64>,
    /// Steady state, agent side.
    pub steady: Window,
    /// Steady state, Kubernetes side (local stack).
    pub steady_api: Option<ApiCost>,
    /// Seconds from a template change until the controller reported the rollout complete (every
    /// DeviceProcess on the new spec and available).
    pub rollout_seconds: Option<f64>,
    /// Kubernetes requests spent by that rollout wave (controller updates included).
    pub rollout_api: Option<ApiCost>,
    /// The rollout wave under its strategy: budget, most unavailable at once, writes per device.
    pub rollout: Option<rollout::RolloutWave>,
}

fn converged(dps: &[DeviceProcess], want_hash: Option<&str>) -> usize {
    dps.iter()
        .filter(|dp| {
            let Some(st) = dp.status.as_ref() else {
                return false;
            };
            let hash_ok = match want_hash {
                Some(h) => st.observed_spec_hash.as_deref() == Some(h),
                None => {
                    st.observed_spec_hash.as_deref()
                        == Some(apollo_crds::spec_hash(&dp.spec).as_str())
                }
            };
            hash_ok
                && apollo_crds::conditions::is_true(
                    &st.conditions,
                    apollo_crds::conditions::AGENT_CONNECTED,
                )
                && apollo_crds::conditions::is_true(
                    &st.conditions,
                    apollo_crds::conditions::SPEC_OBSERVED,
                )
        })
        .count()
}

/// Generous bound on a wave of status writes for `devices` DeviceProcesses: each gets one status
/// patch and one Event, and each gateway replica writes at most 50 per second by default
/// (`--kube-writes-per-second`), so the wave takes `2 * devices / (50 * gateways)` seconds at
/// best. Twice that, plus two minutes for start-up and the agents' ramp.
fn write_budget_time(devices: usize, gateways: u32) -> Duration {
    let writes = 2.0 * devices as f64;
    let per_second = 50.0 * f64::from(gateways.max(1));
    Duration::from_secs(120) + Duration::from_secs_f64(2.0 * writes / per_second)
}

async fn wait_converged(
    api: &Api<DeviceProcess>,
    n: usize,
    deadline: Duration,
    label: &str,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    loop {
        let dps = api
            .list(
                &ListParams::default()
                    .labels(&format!("{}={label}", apollo_crds::LABEL_DEPLOYMENT)),
            )
            .await?
            .items;
        let done = converged(&dps, None);
        if dps.len() == n && done == n {
            return Ok(start.elapsed().as_secs_f64());
        }
        if start.elapsed() > deadline {
            bail!("only {done} of {n} DeviceProcesses converged within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn spawn_agents(
    devices: &[String],
    router: &str,
    token: impl Fn(&str) -> String,
    args: &Args,
    metrics: Arc<AgentMetrics>,
    cancel: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let http = apollo_agent::http_client()?;
    let url: reqwest::Url = router.parse().context("router URL")?;
    let ramp = args.ramp();
    let n = devices.len().max(1) as u32;
    let mut handles = Vec::with_capacity(devices.len());
    for (i, device) in devices.iter().enumerate() {
        let mut config = AgentConfig::new(device.clone(), url.clone());
        config.device_token = Some(token(device));
        config.poll_wait = args.poll_wait();
        config.initial_heartbeat_interval = args.heartbeat_interval();
        let agent = Agent::new(config, http.clone(), metrics.clone())?;
        let delay = ramp * i as u32 / n;
        let cancel = cancel.clone();
        handles.push(tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            agent.run(cancel).await;
        }));
    }
    Ok(handles)
}

/// Runs the load test and returns its numbers.
pub async fn run(args: Args) -> anyhow::Result<Results> {
    let devices = device_names(&args.prefix, args.devices);
    let metrics = Arc::new(AgentMetrics::default());
    let cancel = CancellationToken::new();
    if let Some(router) = args.router_url.clone() {
        let key = std::fs::read(args.secret_file.as_ref().context("--secret-file")?)?;
        let key = apollo_protocol::token::key_from_secret_file(&key);
        let handles = spawn_agents(
            &devices,
            &router,
            |d| apollo_protocol::token::device_token(&key, d),
            &args,
            metrics.clone(),
            cancel.clone(),
        )?;
        tokio::time::sleep(args.ramp() + Duration::from_secs(5)).await;
        let before = metrics.snapshot();
        let t = Instant::now();
        tokio::time::sleep(args.duration()).await;
        let steady = window(&before, &metrics.snapshot(), t.elapsed());
        cancel.cancel();
        futures::future::join_all(handles).await;
        return Ok(Results {
            devices: args.devices,
            gateways: 0,
            converge_seconds: None,
            steady,
            steady_api: None,
            rollout_seconds: None,
            rollout_api: None,
            rollout: None,
        });
    }

    // Local stack.
    let work_dir = {
        std::fs::create_dir_all(&args.work_dir)?;
        args.work_dir.canonicalize()?
    };
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("loadtest has no directory")?
        .to_path_buf();
    let mut cfg = StackConfig::demo(work_dir.clone(), bin_dir);
    cfg.kubernetes = Kubernetes::Own {
        dir: work_dir.join("control-plane"),
    };
    cfg.jaeger = false;
    cfg.gateways = args.gateways;
    cfg.devices = Vec::new();
    cfg.run_agents = false;
    cfg.install_samples = false;
    cfg.heartbeat_interval_seconds = args.heartbeat_interval().as_secs();
    cfg.sweep_interval_seconds = 5;
    cfg.ports = Ports::ephemeral();
    cfg.redis = args.redis_choice();
    eprintln!(
        "loadtest: starting the local stack ({} gateways) ...",
        args.gateways
    );
    let stack = Stack::start(cfg).await?;
    let client = stack.client();
    let ns = stack.namespace().to_owned();

    eprintln!(
        "loadtest: creating {} NetworkSwitches and a DeviceProcessDeployment ...",
        devices.len()
    );
    let switches: Api<NetworkSwitch> = Api::namespaced(client.clone(), &ns);
    let created = futures::stream::iter(devices.iter().cloned())
        .map(|d| {
            let switches = switches.clone();
            let prefix = args.prefix.clone();
            async move {
                let sw = apollo_dev::samples::switch(&d, &[("fleet", prefix.as_str())]);
                switches.create(&PostParams::default(), &sw).await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    if let Some(Err(e)) = created.into_iter().find(Result::is_err) {
        bail!("create NetworkSwitch: {e}");
    }
    let dep_name = format!("{}-fleet", args.prefix);
    let mut dep = apollo_dev::samples::demo_deployment()?;
    dep.metadata.name = Some(dep_name.clone());
    dep.spec.selector = serde_json::from_value(json!({"matchLabels": {"fleet": args.prefix}}))?;
    let deps: Api<DeviceProcessDeployment> = Api::namespaced(client.clone(), &ns);
    deps.create(&PostParams::default(), &dep).await?;
    let dps: Api<DeviceProcess> = Api::namespaced(client.clone(), &ns);

    eprintln!(
        "loadtest: starting {} agents over {} ...",
        devices.len(),
        Human(args.ramp())
    );
    let handles = spawn_agents(
        &devices,
        &stack.router_url(),
        |d| stack.token(d),
        &args,
        metrics.clone(),
        cancel.clone(),
    )?;
    let deadline = args.ramp() + write_budget_time(devices.len(), args.gateways);
    let converge = wait_converged(&dps, devices.len(), deadline, &dep_name).await?;
    eprintln!(
        "loadtest: converged in {converge:.1}s; measuring steady state for {} ...",
        Human(args.duration())
    );

    stack.system().reset_requests().await;
    let before = metrics.snapshot();
    let t = Instant::now();
    tokio::time::sleep(args.duration()).await;
    let steady = window(&before, &metrics.snapshot(), t.elapsed());
    let steady_api = api_cost(&stack).await;

    let (rollout_seconds, rollout_api, rollout) = if args.no_rollout {
        (None, None, None)
    } else {
        let strategy = rollout::Strategy {
            all_at_once: args.all_at_once,
            max_unavailable: args.max_unavailable.clone(),
        };
        eprintln!(
            "loadtest: changing the template (rollout wave, {}) ...",
            if strategy.all_at_once {
                "AllAtOnce".to_owned()
            } else {
                format!("RollingUpdate maxUnavailable {}", strategy.max_unavailable)
            }
        );
        let wave = rollout::measure(
            &stack,
            &dep_name,
            devices.len(),
            &strategy,
            rollout_deadline(devices.len(), args.gateways, &strategy),
        )
        .await?;
        (Some(wave.seconds), Some(api_cost(&stack).await), Some(wave))
    };

    cancel.cancel();
    futures::future::join_all(handles).await;
    stack.shutdown().await;
    Ok(Results {
        devices: args.devices,
        gateways: args.gateways,
        converge_seconds: Some(converge),
        steady,
        steady_api: Some(steady_api),
        rollout_seconds,
        rollout_api,
        rollout,
    })
}

/// Bound on a rollout wave: the status-write budget of the fleet, plus ten seconds per wave of
/// the strategy (each wave waits for its devices to report before the next starts).
fn rollout_deadline(devices: usize, gateways: u32, strategy: &rollout::Strategy) -> Duration {
    let budget = if strategy.all_at_once {
        devices
    } else {
        apollo_controller::rollout::resolve_max_unavailable(&strategy.max_unavailable(), devices)
    };
    let waves = devices.div_ceil(budget.max(1)) as u32;
    write_budget_time(devices, gateways) + Duration::from_secs(10) * waves
}

/// The results as a Markdown table.
pub fn render(r: &Results) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "| metric | value |\n|---|---|\n| devices (agents) | {} |\n| gateway replicas | {} |\n",
        r.devices, r.gateways
    ));
    if let Some(c) = r.converge_seconds {
        out.push_str(&format!(
            "| time to converge (all AgentConnected + SpecObserved) | {c:.1} s |\n"
        ));
    }
    let s = &r.steady;
    let polls = s.desired_200 + s.desired_304;
    out.push_str(&format!(
        "| steady window | {:.0} s |\n| agent requests/s | {:.0} |\n| reports/s | {:.0} |\n| report latency mean / p50 / p99 | {:.2} ms / <= {} ms / <= {} ms |\n| desired polls 200 / 304 | {} / {} ({:.1}% 304) |\n| errors | {} |\n",
        s.seconds,
        s.requests_per_second,
        s.reports_per_second,
        s.report_mean_ms,
        s.report_p50_ms,
        s.report_p99_ms,
        s.desired_200,
        s.desired_304,
        if polls == 0 { 0.0 } else { 100.0 * s.desired_304 as f64 / polls as f64 },
        s.errors
    ));
    if let Some(a) = &r.steady_api {
        out.push_str(&format!(
            "| steady state: DeviceProcess writes / Event writes / Lists | {} / {} / {} |\n| steady state: Lease writes (elections, shard leases) | {} |\n",
            a.deviceprocess_writes, a.event_writes, a.lists, a.lease_writes
        ));
    }
    if let Some(wave) = &r.rollout {
        out.push_str(&rollout::render(wave, r.devices));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn write_budget_time_grows_with_the_fleet_and_shrinks_with_replicas() {
        let base = Duration::from_secs(120);
        // 10000 devices on 3 replicas: 20000 writes at 150/s is 133 s at best; allow twice that.
        let t = write_budget_time(10_000, 3);
        assert!(t > base + Duration::from_secs(266) && t < base + Duration::from_secs(267));
        assert!(write_budget_time(10_000, 6) < t);
        assert!(write_budget_time(0, 0) == base);
    }

    #[test]
    fn the_rollout_deadline_grows_with_the_number_of_waves() {
        let rolling = |m: &str| rollout::Strategy {
            all_at_once: false,
            max_unavailable: m.into(),
        };
        let ten_waves = rollout_deadline(10_000, 3, &rolling("10%"));
        assert_eq!(
            ten_waves,
            write_budget_time(10_000, 3) + Duration::from_secs(100)
        );
        assert!(rollout_deadline(10_000, 3, &rolling("1%")) > ten_waves);
        let bulk = rollout::Strategy {
            all_at_once: true,
            max_unavailable: "1".into(),
        };
        assert_eq!(
            rollout_deadline(100, 1, &bulk),
            write_budget_time(100, 1) + Duration::from_secs(10)
        );
    }

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn durations_take_the_shared_syntax_and_the_old_spellings_their_seconds() {
        let args = Args::try_parse_from(["loadtest"]).expect("defaults");
        assert_eq!(args.duration(), Duration::from_secs(60));
        assert_eq!(args.ramp(), Duration::from_secs(10));
        assert_eq!(args.heartbeat_interval(), Duration::from_secs(15));
        assert_eq!(args.poll_wait(), Duration::from_secs(30));
        let args = Args::try_parse_from([
            "loadtest",
            "--duration",
            "2m",
            "--ramp",
            "1500ms",
            "--heartbeat-interval",
            "5s",
        ])
        .expect("new spellings");
        assert_eq!(args.duration(), Duration::from_secs(120));
        assert_eq!(args.ramp(), Duration::from_millis(1500));
        assert_eq!(args.heartbeat_interval(), Duration::from_secs(5));
        let args = Args::try_parse_from([
            "loadtest",
            "--duration-seconds",
            "90",
            "--heartbeat-interval-seconds",
            "1",
            "--poll-wait-seconds",
            "20",
        ])
        .expect("old spellings");
        assert_eq!(args.duration(), Duration::from_secs(90));
        assert_eq!(args.heartbeat_interval(), Duration::from_secs(1));
        assert_eq!(args.poll_wait(), Duration::from_secs(20));
        assert!(Args::try_parse_from(["loadtest", "--poll-wait", "1500ms"]).is_err());
        assert!(Args::try_parse_from(["loadtest", "--ramp", "5s", "--ramp-seconds", "5"]).is_err());
    }

    #[test]
    fn an_unknown_log_format_is_refused() {
        let error =
            Args::try_parse_from(["loadtest", "--log-format", "bogus"]).expect_err("refused");
        assert!(
            error.to_string().contains("[possible values: text, json]"),
            "{error}"
        );
    }

    #[test]
    fn the_stack_s_redis_is_a_server_a_cluster_or_given() {
        use apollo_dev::RedisChoice;
        let parse = |args: &[&str]| Args::try_parse_from(args).map(|a| a.redis_choice());
        assert_eq!(parse(&["loadtest"]).expect("ok"), RedisChoice::Server);
        assert_eq!(
            parse(&["loadtest", "--redis-cluster", "3"]).expect("ok"),
            RedisChoice::Cluster {
                masters: 3,
                replicas: 1
            }
        );
        let url = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001/";
        assert_eq!(
            parse(&["loadtest", "--redis-url", url]).expect("ok"),
            RedisChoice::External(url.to_owned())
        );
        for refused in [
            &["loadtest", "--redis-cluster", "2"][..],
            &["loadtest", "--redis-url", "redis+cluster://"],
            &[
                "loadtest",
                "--redis-url",
                "redis://h:1",
                "--redis-cluster",
                "3",
            ],
        ] {
            assert!(parse(refused).is_err(), "{refused:?}");
        }
    }

    #[test]
    fn router_url_needs_a_secret_file() {
        assert!(Args::try_parse_from(["loadtest", "--router-url", "http://x"]).is_err());
    }

    #[test]
    fn device_names_are_stable_and_padded() {
        assert_eq!(device_names("lt", 2), ["lt-00000", "lt-00001"]);
    }
}

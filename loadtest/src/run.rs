//! One run: the stack (or an existing router), the fleet, the agents, the steady window and the
//! rollout wave, with the resources every process of the stack spent.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use apollo_agent::metrics::LATENCY_BUCKETS_MICROS;
use apollo_agent::{Agent, AgentConfig, AgentMetrics};
use apollo_crds::DeviceProcess;
use apollo_dev::{Kubernetes, Ports, Stack, StackConfig};
use apollo_runtime::duration::Human;
use kube::api::Api;
use tokio_util::sync::CancellationToken;

use crate::clients::{self, Clients};
use crate::fleet::Fleet;
use crate::timeline::{self, Timeline};
use crate::{device_names, procstat, rollout, window, Args, Window};

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

/// One bucket of the report latency histogram.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Bucket {
    /// Upper bound, ms (None: the unbounded last bucket).
    pub le_ms: Option<f64>,
    /// Reports in this bucket.
    pub count: u64,
}

/// Memory and CPU of the stack's processes.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Resources {
    /// Every process of the stack over the steady window: mean CPU, RSS at its end, peak RSS.
    pub steady: Vec<procstat::ProcessUsage>,
    /// Every process over the whole run (stack start to the end): mean CPU, RSS, peak RSS.
    pub whole_run: Vec<procstat::ProcessUsage>,
    /// RSS growth per agent, bytes, per process: from just before the first agent started (every
    /// DeviceProcess already in the gateways' caches) to the end of the steady window.
    pub rss_growth_per_agent_bytes: BTreeMap<String, f64>,
}

/// Everything a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Results {
    /// Simulated devices.
    pub devices: usize,
    /// Gateway replicas (local stack).
    pub gateways: u32,
    /// Devices with a NetworkSwitch and a DeviceProcess (local stack; the other agents' devices
    /// are unknown to Kubernetes).
    pub kube_devices: Option<usize>,
    /// Agents per HTTP/2 connection (0: HTTP/1.1, connections of their own).
    pub agents_per_connection: usize,
    /// HTTP clients of the agents (with HTTP/2: connections to the router).
    pub agent_clients: usize,
    /// Seconds from the first NetworkSwitch created until every DeviceProcess existed.
    pub create_seconds: Option<f64>,
    /// Seconds from the first agent start until every DeviceProcess showed AgentConnected=True
    /// and SpecObserved=True (local stack).
    pub converge_seconds: Option<f64>,
    /// Steady state, agent side.
    pub steady: Window,
    /// Report latency histogram of the steady window.
    pub steady_report_latency: Vec<Bucket>,
    /// Steady state, Kubernetes side (local stack).
    pub steady_api: Option<ApiCost>,
    /// AgentConnected True -> False flips seen on the DeviceProcesses during the steady window
    /// (every agent keeps reporting: each flip is a false disconnect).
    pub steady_false_disconnects: Option<u64>,
    /// Seconds from a template change until the controller reported the rollout complete (every
    /// DeviceProcess on the new spec and available).
    pub rollout_seconds: Option<f64>,
    /// Kubernetes requests spent by that rollout wave (controller updates included).
    pub rollout_api: Option<ApiCost>,
    /// The rollout wave under its strategy: budget, most unavailable at once, writes per device.
    pub rollout: Option<rollout::RolloutWave>,
    /// CPU and memory of every process.
    pub resources: Resources,
    /// The run over time.
    pub timeline: Vec<timeline::Sample>,
    /// The faults of `--fault`, in order (local stack).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<crate::faults::FaultResult>,
}

/// Generous bound on a wave of status writes for `devices` DeviceProcesses: each gets one status
/// patch and one Event, and each gateway replica writes at most 50 per second by default
/// (`--kube-writes-per-second`), so the wave takes `2 * devices / (50 * gateways)` seconds at
/// best. Twice that, plus two minutes for start-up and the agents' ramp.
pub(crate) fn write_budget_time(devices: usize, gateways: u32) -> Duration {
    write_budget_time_at(devices, gateways, 50.0)
}

/// [`write_budget_time`] at `per_replica` writes per second.
fn write_budget_time_at(devices: usize, gateways: u32, per_replica: f64) -> Duration {
    let writes = 2.0 * devices as f64;
    let per_second = per_replica.max(1.0) * f64::from(gateways.max(1));
    Duration::from_secs(120) + Duration::from_secs_f64(2.0 * writes / per_second)
}

fn spawn_agents(
    devices: &[String],
    router: &str,
    token: impl Fn(&str) -> String,
    args: &Args,
    metrics: Arc<AgentMetrics>,
    started: Arc<AtomicUsize>,
    cancel: CancellationToken,
) -> anyhow::Result<(usize, Vec<tokio::task::JoinHandle<()>>)> {
    let clients = Clients::new(devices.len(), args.agents_per_connection)?;
    let url: reqwest::Url = router.parse().context("router URL")?;
    let ramp = args.ramp();
    let n = devices.len().max(1) as u32;
    let mut handles = Vec::with_capacity(devices.len());
    for (i, device) in devices.iter().enumerate() {
        let mut config = AgentConfig::new(device.clone(), url.clone());
        config.device_token = Some(token(device));
        config.poll_wait = args.poll_wait();
        config.initial_heartbeat_interval = args.heartbeat_interval();
        let agent = Agent::new(config, clients.client_of(i), metrics.clone())?;
        let delay = ramp * i as u32 / n;
        let cancel = crate::faults::agent_cancel(args, &cancel, i, device);
        let started = started.clone();
        handles.push(tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            started.fetch_add(1, Ordering::Relaxed);
            agent.run(cancel).await;
        }));
    }
    Ok((clients.len(), handles))
}

/// `run.json` -> `run.timeline.jsonl` (started afresh).
fn timeline_file(args: &Args) -> Option<std::path::PathBuf> {
    let path = args.json.as_ref()?.with_extension("timeline.jsonl");
    let _ = std::fs::remove_file(&path);
    Some(path)
}

fn histogram(h: &apollo_agent::LatencyHistogram) -> Vec<Bucket> {
    LATENCY_BUCKETS_MICROS
        .iter()
        .zip(h.counts)
        .map(|(le, count)| Bucket {
            le_ms: (*le != u64::MAX).then(|| *le as f64 / 1000.0),
            count,
        })
        .collect()
}

/// Runs the load test and returns its numbers.
pub async fn run(args: Args) -> anyhow::Result<Results> {
    let (soft, hard) = clients::raise_fd_limit()?;
    if args.agents_per_connection == 0 && 2 * args.devices as u64 + 1_000 > soft {
        eprintln!(
            "loadtest: warning: {} HTTP/1.1 agents need up to {} sockets, the file-descriptor \
             limit is {soft} (hard {hard}); use --agents-per-connection",
            args.devices,
            2 * args.devices
        );
    }
    let devices = device_names(&args.prefix, args.devices);
    let metrics = Arc::new(AgentMetrics::default());
    let started = Arc::new(AtomicUsize::new(0));
    let cancel = CancellationToken::new();
    let run_start = procstat::snapshot();
    if let Some(router) = args.router_url.clone() {
        let key = std::fs::read(args.secret_file.as_ref().context("--secret-file")?)?;
        let key = apollo_protocol::token::key_from_secret_file(&key);
        let timeline = Timeline::start(
            args.sample_interval(),
            metrics.clone(),
            started.clone(),
            None,
            timeline_file(&args),
        );
        let token_key = apollo_protocol::token::TokenKey::new(&key);
        let (agent_clients, handles) = spawn_agents(
            &devices,
            &router,
            |d| token_key.token(d),
            &args,
            metrics.clone(),
            started.clone(),
            cancel.clone(),
        )?;
        tokio::time::sleep(args.ramp() + Duration::from_secs(5)).await;
        let before = metrics.snapshot();
        let procs_before = procstat::snapshot();
        let t = Instant::now();
        tokio::time::sleep(args.duration()).await;
        let after = metrics.snapshot();
        let procs_after = procstat::snapshot();
        let steady = window(&before, &after, t.elapsed());
        cancel.cancel();
        futures::future::join_all(handles).await;
        return Ok(Results {
            devices: args.devices,
            gateways: 0,
            kube_devices: None,
            agents_per_connection: args.agents_per_connection,
            agent_clients,
            create_seconds: None,
            converge_seconds: None,
            steady,
            steady_report_latency: histogram(&after.report_latency.since(&before.report_latency)),
            steady_api: None,
            steady_false_disconnects: None,
            rollout_seconds: None,
            rollout_api: None,
            rollout: None,
            resources: Resources {
                steady: procstat::between(&procs_before, &procs_after),
                whole_run: procstat::between(&run_start, &procs_after),
                rss_growth_per_agent_bytes: procstat::rss_growth_per_agent(
                    &run_start,
                    &procs_after,
                    args.devices,
                ),
            },
            timeline: timeline.finish().await,
            faults: Vec::new(),
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
    // The stack turns on the gateways' access log (one line per request, for the demo); at fleet
    // scale that is the log, not Apollo, being measured. The servers log as in production.
    cfg.server_env
        .push(("RUST_LOG".into(), "info,apollo_gateway::access=warn".into()));
    cfg.gateway_extra_args.push(format!(
        "--kube-writes-per-second={}",
        args.kube_writes_per_second
    ));
    eprintln!(
        "loadtest: starting the local stack ({} gateways) ...",
        args.gateways
    );
    let mut stack = Stack::start(cfg).await?;
    let client = stack.client();
    let ns = stack.namespace().to_owned();

    let kube_devices = &devices[..args
        .kube_devices
        .unwrap_or(devices.len())
        .min(devices.len())];
    eprintln!(
        "loadtest: creating {} NetworkSwitches and a DeviceProcessDeployment ...",
        kube_devices.len()
    );
    let create_start = Instant::now();
    let dep_name = crate::fleet::create(&client, &ns, kube_devices, &args.prefix).await?;
    let dps: Api<DeviceProcess> = Api::namespaced(client.clone(), &ns);
    let fleet = Fleet::start(dps.clone(), &dep_name).await?;
    let n = kube_devices.len();
    fleet
        .wait(
            "DeviceProcesses created",
            Duration::from_secs(300) + Duration::from_millis(20) * n as u32,
            |c| c.existing == n,
        )
        .await?;
    let create_seconds = create_start.elapsed().as_secs_f64();
    eprintln!("loadtest: {n} DeviceProcesses exist after {create_seconds:.1}s");

    eprintln!(
        "loadtest: starting {} agents over {} ...",
        devices.len(),
        Human(args.ramp())
    );
    let before_agents = procstat::snapshot();
    let agents_start = Instant::now();
    let gateways = stack.gateways().clone();
    let timeline = Timeline::start(
        args.sample_interval(),
        metrics.clone(),
        started.clone(),
        Some(Arc::new(move || {
            gateways
                .ordinals()
                .into_iter()
                .filter_map(|o| gateways.admin_addr(o))
                .collect()
        })),
        timeline_file(&args),
    );
    let (agent_clients, handles) = spawn_agents(
        &devices,
        &stack.router_url(),
        |d| stack.token(d),
        &args,
        metrics.clone(),
        started.clone(),
        cancel.clone(),
    )?;
    let deadline =
        args.ramp() + write_budget_time_at(n, args.gateways, args.kube_writes_per_second);
    let converge = fleet
        .wait("converge", deadline, |c| {
            c.existing == n && c.converged == n
        })
        .await?;
    // With --kube-devices the DeviceProcesses' agents are among the first to start: the steady
    // window begins only once every agent has started, and a poll interval later.
    let ramp_left = args.ramp().saturating_sub(agents_start.elapsed());
    if !ramp_left.is_zero() {
        eprintln!(
            "loadtest: converged in {converge:.1}s; the ramp goes on for {} ...",
            Human(ramp_left)
        );
        tokio::time::sleep(ramp_left + args.poll_wait().min(Duration::from_secs(15))).await;
    }
    eprintln!(
        "loadtest: converged in {converge:.1}s; measuring steady state for {} ...",
        Human(args.duration())
    );

    stack.system().reset_requests().await;
    fleet.reset_flips();
    let before = metrics.snapshot();
    let procs_before = procstat::snapshot();
    let t = Instant::now();
    tokio::time::sleep(args.duration()).await;
    let after = metrics.snapshot();
    let procs_after = procstat::snapshot();
    let steady = window(&before, &after, t.elapsed());
    let steady_api = api_cost(&stack).await;
    let false_disconnects = fleet.counts().disconnect_flips;
    drop(fleet);
    let faults = crate::faults::run(&args, &mut stack, &devices, &dep_name).await?;

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
            n,
            &strategy,
            rollout_deadline(n, args.gateways, &strategy),
        )
        .await?;
        (Some(wave.seconds), Some(api_cost(&stack).await), Some(wave))
    };

    let run_end = procstat::snapshot();
    let timeline = timeline.finish().await;
    cancel.cancel();
    futures::future::join_all(handles).await;
    stack.shutdown().await;
    Ok(Results {
        devices: args.devices,
        gateways: args.gateways,
        kube_devices: Some(n),
        agents_per_connection: args.agents_per_connection,
        agent_clients,
        create_seconds: Some(create_seconds),
        converge_seconds: Some(converge),
        steady,
        steady_report_latency: histogram(&after.report_latency.since(&before.report_latency)),
        steady_api: Some(steady_api),
        steady_false_disconnects: Some(false_disconnects),
        rollout_seconds,
        rollout_api,
        rollout,
        resources: Resources {
            steady: procstat::between(&procs_before, &procs_after),
            whole_run: procstat::between(&run_start, &run_end),
            rss_growth_per_agent_bytes: procstat::rss_growth_per_agent(
                &before_agents,
                &procs_after,
                devices.len(),
            ),
        },
        timeline,
        faults,
    })
}

/// Bound on a rollout wave: the status-write budget of the fleet, plus ten seconds per wave of
/// the strategy (each wave waits for its devices to report before the next starts).
pub(crate) fn rollout_deadline(
    devices: usize,
    gateways: u32,
    strategy: &rollout::Strategy,
) -> Duration {
    let budget = if strategy.all_at_once {
        devices
    } else {
        apollo_controller::rollout::resolve_max_unavailable(&strategy.max_unavailable(), devices)
    };
    let waves = devices.div_ceil(budget.max(1)) as u32;
    write_budget_time(devices, gateways) + Duration::from_secs(10) * waves
}

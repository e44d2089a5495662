//! Faults under load (`--fault KIND`, repeatable): once the fleet has converged, each fault is
//! injected into the local stack in turn while every agent keeps running, except a few
//! (`--fault-stopped-agents`, 20 by default) that stop two seconds into the fault. Afterwards the
//! Events are counted from the Kubernetes API (events.k8s.io/v1 in the fleet's namespace, reason
//! AgentDisconnected / AgentConnected, per `regarding.name`), never from the gateways' metrics:
//! - false AgentDisconnected: Events about DeviceProcesses whose agents kept running;
//! - for the stopped agents: exactly one AgentDisconnected each (none is lost, none duplicated)
//!   and their DeviceProcesses show AgentConnected=False;
//! - convergence: from the end of the fault until every running agent's DeviceProcess shows
//!   AgentConnected=True and every stopped agent's shows False.
//!
//! The stopped agents are chosen up front ([`agent_cancel`]) so that each has a cancellation of
//! its own; they are spread over the fleet (and so over the shards), different for each fault.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use apollo_crds::conditions::{
    is_true, AGENT_CONNECTED, REASON_AGENT_CONNECTED, REASON_AGENT_DISCONNECTED,
};
use apollo_crds::{DeviceProcess, LABEL_DEPLOYMENT};
use apollo_dev::Stack;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

/// A fault the local stack can suffer.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL of gateway ordinal 1; it stays dead 30 s, then its pod runs it again.
    KillGateway,
    /// SIGSTOP of gateway ordinal 1 for 30 s, then SIGCONT.
    StopGateway,
    /// SIGSTOP of redis-server for 60 s, then it is killed and started afresh (state lost).
    PauseRedis,
    /// SIGKILL of kube-apiserver; the control plane's supervisor starts a new one.
    RestartApiserver,
    /// SIGSTOP of etcd for 30 s, then SIGCONT.
    PauseEtcd,
    /// `kubectl scale` of the gateway StatefulSet to 5 replicas, then (once they are ready, and
    /// 12 s after the first scale) to 2.
    Scale,
}

impl FaultKind {
    fn name(self) -> &'static str {
        match self {
            Self::KillGateway => "kill-gateway",
            Self::StopGateway => "stop-gateway",
            Self::PauseRedis => "pause-redis",
            Self::RestartApiserver => "restart-apiserver",
            Self::PauseEtcd => "pause-etcd",
            Self::Scale => "scale",
        }
    }
}

/// Command line of the fault suite.
#[derive(clap::Args, Debug, Clone)]
pub struct FaultArgs {
    /// Inject these faults one after another after convergence (repeat or comma-separate;
    /// `scale` leaves 2 replicas, so put it last).
    #[arg(long = "fault", env = "APOLLO_LT_FAULT", value_delimiter = ',')]
    pub faults: Vec<FaultKind>,
    /// Agents stopped two seconds into each fault (different ones for each fault).
    #[arg(long, env = "APOLLO_LT_FAULT_STOPPED_AGENTS", default_value_t = 20)]
    pub fault_stopped_agents: usize,
}

/// What one fault did to the fleet's Events and conditions.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FaultResult {
    /// The fault.
    pub fault: FaultKind,
    /// Agents running when it began.
    pub agents: usize,
    /// Gateway replicas when it began.
    pub gateways: usize,
    /// Agents stopped during it.
    pub stopped_agents: usize,
    /// Seconds from its injection to its end (the process continued, restarted or ready).
    pub fault_seconds: f64,
    /// AgentDisconnected Events about DeviceProcesses whose agents kept running.
    pub false_agent_disconnected: u64,
    /// Running agents with at least one such Event.
    pub false_agent_disconnected_devices: usize,
    /// AgentConnected Events about running agents (each follows a false disconnect).
    pub running_agent_connected: u64,
    /// AgentConnected True -> not True on running agents' DeviceProcesses, seen by a watch.
    pub false_status_flips: u64,
    /// AgentDisconnected Events about the agents stopped in this fault (expected: one each).
    pub stopped_agent_disconnected: u64,
    /// Stopped agents without any AgentDisconnected Event.
    pub lost: usize,
    /// AgentDisconnected Events beyond the first per stopped agent (this fault's or earlier).
    pub duplicates: u64,
    /// Stopped agents whose DeviceProcess shows AgentConnected=False at the end.
    pub stopped_shown_disconnected: usize,
    /// Seconds from the end of the fault until every running agent's DeviceProcess showed
    /// AgentConnected=True and every stopped one's False (None: not within the deadline).
    pub converge_seconds: Option<f64>,
    /// The same from the injection.
    pub converge_from_injection_seconds: Option<f64>,
    /// What did not go as expected.
    pub notes: Vec<String>,
}

/// Cancellations of the agents chosen to stop, by device name.
fn stoppable() -> MutexGuard<'static, HashMap<String, CancellationToken>> {
    static STOP: OnceLock<Mutex<HashMap<String, CancellationToken>>> = OnceLock::new();
    STOP.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Spacing of the stopped agents over the fleet (0: none stop).
fn stride(devices: usize, stopped: usize) -> usize {
    devices.checked_div(stopped).unwrap_or(0)
}

/// Indices of the agents stopped in fault `k` of `faults`.
fn victims(devices: usize, stopped: usize, k: usize) -> Vec<usize> {
    let s = stride(devices, stopped);
    if k + 1 >= s {
        return Vec::new();
    }
    (0..stopped).map(|j| j * s + k + 1).collect()
}

fn is_victim(devices: usize, stopped: usize, faults: usize, i: usize) -> bool {
    let s = stride(devices, stopped);
    s > 0 && i / s < stopped && (1..=faults.min(s - 1)).contains(&(i % s))
}

/// The cancellation of agent `i` (`device`): `parent` itself, or a child of it that the fault
/// suite cancels when this agent is one it stops.
pub fn agent_cancel(
    args: &crate::Args,
    parent: &CancellationToken,
    i: usize,
    device: &str,
) -> CancellationToken {
    let f = &args.fault;
    if !is_victim(args.devices, f.fault_stopped_agents, f.faults.len(), i) {
        return parent.clone();
    }
    let child = parent.child_token();
    stoppable().insert(device.to_owned(), child.clone());
    child
}

#[derive(Default)]
struct Seen {
    /// DeviceProcess name -> (device, AgentConnected=True).
    dps: HashMap<String, (String, bool)>,
    /// Devices whose DeviceProcess went AgentConnected True -> not True, in order.
    flips: Vec<String>,
}

/// A watch of the fleet's DeviceProcesses: who shows connected, and every flip.
struct Watch {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watch {
    fn start(api: Api<DeviceProcess>, deployment: &str) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let config = watcher::Config::default()
            .labels(&format!("{LABEL_DEPLOYMENT}={deployment}"))
            .page_size(500);
        let mut events = watcher(api, config).default_backoff().boxed();
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let (watcher::Event::Apply(dp) | watcher::Event::InitApply(dp)) = event else {
                        continue;
                    };
                    let connected = dp
                        .status
                        .as_ref()
                        .is_some_and(|st| is_true(&st.conditions, AGENT_CONNECTED));
                    let device = dp.spec.device_ref.name.clone();
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    let old = s.dps.insert(dp.name_any(), (device.clone(), connected));
                    if old.is_some_and(|(_, was)| was) && !connected {
                        s.flips.push(device);
                    }
                }
            }
        });
        Self { seen, task }
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (running agents not shown connected, stopped agents shown connected), or None before the
    /// watch saw all `n`.
    fn off(&self, n: usize, stopped: &BTreeSet<String>) -> Option<(usize, usize)> {
        let s = self.seen();
        if s.dps.len() < n {
            return None;
        }
        let mut off = (0, 0);
        for (device, connected) in s.dps.values() {
            match (stopped.contains(device), *connected) {
                (false, false) => off.0 += 1,
                (true, true) => off.1 += 1,
                _ => {}
            }
        }
        Some(off)
    }

    /// Waits until the fleet shows what the agents do; the seconds it took, or None.
    async fn converge(
        &self,
        n: usize,
        stopped: &BTreeSet<String>,
        deadline: Duration,
    ) -> Option<f64> {
        let start = Instant::now();
        let mut note = Instant::now();
        loop {
            let off = self.off(n, stopped);
            if off == Some((0, 0)) {
                return Some(start.elapsed().as_secs_f64());
            }
            if start.elapsed() > deadline {
                return None;
            }
            if note.elapsed() > Duration::from_secs(10) {
                eprintln!(
                    "loadtest: fault: {:.0}s, (running not connected, stopped still connected) = {off:?}",
                    start.elapsed().as_secs_f64()
                );
                note = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `(reason, DeviceProcess name)` -> Events (series counted), retried while the API is away.
async fn events(stack: &Stack) -> HashMap<(String, String), u64> {
    let start = Instant::now();
    loop {
        match apollo_dev::fleet::event_counts(&stack.client(), stack.namespace()).await {
            Ok(counts) => return counts,
            Err(e) if start.elapsed() < Duration::from_secs(120) => {
                eprintln!("loadtest: fault: listing Events: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                eprintln!("loadtest: fault: listing Events failed for 120 s: {e}");
                return HashMap::new();
            }
        }
    }
}

async fn scale(stack: &Stack, replicas: u32) -> anyhow::Result<()> {
    let out = stack
        .kubectl([
            "-n",
            stack.system().name(),
            "scale",
            "statefulset",
            "apollo-gateway",
            &format!("--replicas={replicas}"),
        ])
        .await;
    anyhow::ensure!(
        out.status.success(),
        "kubectl scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

const STOP_AFTER: Duration = Duration::from_secs(2);
const GATEWAY_HELD: Duration = Duration::from_secs(30);
const REDIS_PAUSED: Duration = Duration::from_secs(60);
const ETCD_PAUSED: Duration = Duration::from_secs(30);
/// Five replicas serve this long from the first `kubectl scale`: the stopped agents go stale
/// after the shrink to two, so their transitions cross both moves of their shards.
const SCALE_HELD: Duration = Duration::from_secs(12);
const READY: Duration = Duration::from_secs(300);

/// Injects `kind`, calls `stop` two seconds in, and returns once the fault has ended.
async fn inject(
    kind: FaultKind,
    stack: &mut Stack,
    stop: impl FnOnce(),
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let gateways = stack.gateways().ordinals().len() as u32;
    let start = Instant::now();
    let hold = |d: Duration| tokio::time::sleep(d.saturating_sub(start.elapsed()));
    let stop_in = || tokio::time::sleep(STOP_AFTER);
    match kind {
        FaultKind::KillGateway => {
            stack.gateways().kill(1);
            stop_in().await;
            stop();
            hold(GATEWAY_HELD).await;
            stack.gateways().revive(1);
            if let Err(e) = stack.wait_gateways_ready(gateways, READY).await {
                notes.push(format!("replica 1 not back: {e:#}"));
            }
        }
        FaultKind::StopGateway => {
            stack.gateways().signal(1, Signal::SIGSTOP);
            stop_in().await;
            stop();
            hold(GATEWAY_HELD).await;
            stack.gateways().signal(1, Signal::SIGCONT);
        }
        FaultKind::PauseRedis => {
            stack.redis().pause();
            stop_in().await;
            stop();
            hold(REDIS_PAUSED).await;
            stack.redis().restart().await;
        }
        FaultKind::RestartApiserver => {
            let cp = stack.control_plane();
            let old = cp.pid(apollo_test_support::kube::KUBE_APISERVER);
            cp.kill(apollo_test_support::kube::KUBE_APISERVER);
            stop_in().await;
            stop();
            while !matches!(cp.pid(apollo_test_support::kube::KUBE_APISERVER),
                            Some(p) if Some(p) != old)
            {
                anyhow::ensure!(start.elapsed() < READY, "no new kube-apiserver");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            cp.wait_ready().await;
        }
        FaultKind::PauseEtcd => {
            let cp = stack.control_plane();
            cp.signal(apollo_test_support::kube::ETCD, Signal::SIGSTOP);
            stop_in().await;
            stop();
            hold(ETCD_PAUSED).await;
            cp.signal(apollo_test_support::kube::ETCD, Signal::SIGCONT);
        }
        FaultKind::Scale => {
            scale(stack, 5).await?;
            stop_in().await;
            stop();
            stack.wait_gateways_ready(5, READY).await?;
            hold(SCALE_HELD).await;
            scale(stack, 2).await?;
            stack.wait_gateways_ready(2, READY).await?;
        }
    }
    Ok(())
}

/// Runs `args.fault.faults` one after another against the converged fleet.
pub async fn run(
    args: &crate::Args,
    stack: &mut Stack,
    devices: &[String],
    deployment: &str,
) -> anyhow::Result<Vec<FaultResult>> {
    let f = &args.fault;
    let mut results = Vec::new();
    if f.faults.is_empty() {
        return Ok(results);
    }
    let n = devices.len();
    let watch = Watch::start(
        Api::namespaced(stack.client(), stack.namespace()),
        deployment,
    );
    let stale_window = 3 * args.heartbeat_interval();
    // Late Events (a pending transition delivered after a retry) still count: one stale window
    // and a sweep after convergence.
    let settle = stale_window + Duration::from_secs(10);
    let mut stopped: BTreeSet<String> = BTreeSet::new();
    for (k, &kind) in f.faults.iter().enumerate() {
        let mut notes = Vec::new();
        if watch.converge(n, &stopped, READY).await.is_none() {
            notes.push(format!(
                "not converged before the fault: {:?}",
                watch.off(n, &stopped)
            ));
        }
        let victims: Vec<String> = victims(n, f.fault_stopped_agents, k)
            .into_iter()
            .map(|i| devices[i].clone())
            .collect();
        let agents = n - stopped.len();
        let gateways = stack.gateways().ordinals().len();
        let before = events(stack).await;
        let flips_before = watch.seen().flips.len();
        eprintln!(
            "loadtest: fault {}: {agents} agents running, {gateways} gateways; stopping {} agents during it ...",
            kind.name(),
            victims.len()
        );
        let start = Instant::now();
        let stop = || {
            let tokens = stoppable();
            for v in &victims {
                match tokens.get(v) {
                    Some(t) => t.cancel(),
                    None => eprintln!("loadtest: fault: agent {v} has no cancellation of its own"),
                }
            }
        };
        inject(kind, stack, stop, &mut notes).await?;
        let fault_seconds = start.elapsed().as_secs_f64();
        stopped.extend(victims.iter().cloned());
        eprintln!(
            "loadtest: fault {} ended after {fault_seconds:.1}s; waiting for convergence ...",
            kind.name()
        );
        let converge = watch.converge(n, &stopped, READY).await;
        let converge_from_injection = converge.map(|_| start.elapsed().as_secs_f64());
        if converge.is_none() {
            notes.push(format!(
                "not converged within {READY:?}: (running not connected, stopped still connected) = {:?}",
                watch.off(n, &stopped)
            ));
        }
        tokio::time::sleep(settle).await;
        let after = events(stack).await;
        let (device_of, flips, shown_off) = {
            let s = watch.seen();
            let device_of: HashMap<String, String> = s
                .dps
                .iter()
                .map(|(dp, (device, _))| (dp.clone(), device.clone()))
                .collect();
            let flips = s.flips[flips_before..]
                .iter()
                .filter(|d| !stopped.contains(*d))
                .count() as u64;
            let shown_off = s
                .dps
                .values()
                .filter(|(d, c)| victims.contains(d) && !*c)
                .count();
            (device_of, flips, shown_off)
        };
        let mut r = FaultResult {
            fault: kind,
            agents,
            gateways,
            stopped_agents: victims.len(),
            fault_seconds,
            false_agent_disconnected: 0,
            false_agent_disconnected_devices: 0,
            running_agent_connected: 0,
            false_status_flips: flips,
            stopped_agent_disconnected: 0,
            lost: 0,
            duplicates: 0,
            stopped_shown_disconnected: shown_off,
            converge_seconds: converge,
            converge_from_injection_seconds: converge_from_injection,
            notes,
        };
        let mut per_victim: HashMap<&str, u64> = HashMap::new();
        for ((reason, dp), count) in &after {
            let new = count
                - before
                    .get(&(reason.clone(), dp.clone()))
                    .copied()
                    .unwrap_or(0);
            if new == 0 {
                continue;
            }
            let Some(device) = device_of.get(dp) else {
                continue;
            };
            let is_stopped = stopped.contains(device);
            match (reason.as_str(), is_stopped) {
                (REASON_AGENT_DISCONNECTED, false) => {
                    r.false_agent_disconnected += new;
                    r.false_agent_disconnected_devices += 1;
                    r.notes
                        .push(format!("false AgentDisconnected x{new}: {dp}"));
                }
                (REASON_AGENT_CONNECTED, false) => r.running_agent_connected += new,
                (REASON_AGENT_DISCONNECTED, true) => {
                    if victims.contains(device) {
                        *per_victim.entry(device.as_str()).or_default() += new;
                    } else {
                        r.duplicates += new;
                        r.notes.push(format!(
                            "AgentDisconnected again x{new} for {dp} (stopped earlier)"
                        ));
                    }
                }
                (REASON_AGENT_CONNECTED, true) => {
                    r.notes
                        .push(format!("AgentConnected x{new} for stopped {dp}"));
                }
                _ => {}
            }
        }
        r.stopped_agent_disconnected = per_victim.values().sum();
        r.duplicates += per_victim
            .values()
            .map(|c| c.saturating_sub(1))
            .sum::<u64>();
        r.lost = victims.len() - per_victim.len();
        for v in &victims {
            if !per_victim.contains_key(v.as_str()) {
                r.notes
                    .push(format!("no AgentDisconnected for stopped agent {v}"));
            }
        }
        eprintln!("loadtest: fault {}: {}", kind.name(), render_row(&r));
        results.push(r);
    }
    Ok(results)
}

fn render_row(r: &FaultResult) -> String {
    let secs =
        |s: Option<f64>| s.map_or_else(|| "not converged".to_owned(), |s| format!("{s:.1} s"));
    format!(
        "| {} | {} | {} | {} | {} ({} devices) | {} | {} | {} | {} | {} |",
        r.fault.name(),
        r.agents,
        r.gateways,
        r.stopped_agents,
        r.false_agent_disconnected,
        r.false_agent_disconnected_devices,
        r.false_status_flips,
        r.stopped_agent_disconnected,
        r.duplicates,
        r.lost,
        secs(r.converge_seconds),
    )
}

/// The faults as a Markdown table (empty without faults).
pub fn render(results: &[FaultResult]) -> String {
    if results.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n| fault | agents | gateways | stopped agents | false AgentDisconnected | false status flips | AgentDisconnected for stopped (expected = stopped) | duplicates | lost | convergence after the fault |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        out.push_str(&render_row(r));
        out.push('\n');
        for note in &r.notes {
            out.push_str(&format!("<!-- {}: {note} -->\n", r.fault.name()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_agents_are_spread_distinct_per_fault_and_recognised() {
        let n = 2000;
        let all: Vec<Vec<usize>> = (0..6).map(|k| victims(n, 20, k)).collect();
        let mut seen = BTreeSet::new();
        for (k, v) in all.iter().enumerate() {
            assert_eq!(v.len(), 20);
            assert!(v.iter().all(|&i| i < n && is_victim(n, 20, 6, i)), "{k}");
            seen.extend(v.iter().copied());
        }
        assert_eq!(seen.len(), 120);
        let recognised = (0..n).filter(|&i| is_victim(n, 20, 6, i)).count();
        assert_eq!(recognised, 120);
        assert!(!is_victim(n, 20, 0, 1));
        assert!(!is_victim(n, 0, 6, 1));
        assert!(victims(10, 20, 0).is_empty());
    }
}

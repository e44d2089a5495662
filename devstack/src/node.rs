//! The local node: the kubelet of the gateway StatefulSet's pods.
//!
//! kube-controller-manager's StatefulSet controller creates the pods `apollo-gateway-<i>` (bound to
//! this node by the template's `nodeName`, so no scheduler is needed). This runs one
//! `apollo-gateway --pod-name <pod>` process per pod (the ordinal, i.e. the shard, comes from the
//! pod name as in a cluster), reports the pod `Running` and `Ready` as the process's `/readyz`
//! says, restarts a process that exits with a kubelet's back-off, and when a pod is deleted (scale
//! down) stops its process with SIGTERM within the grace period and then removes the pod, as a
//! kubelet does. So `kubectl get sts,pods` tells the truth about which gateways run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use apollo_test_support::Proc;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::ResourceExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// The node the gateway pods are bound to.
pub const NODE_NAME: &str = "apollo-local";
/// What the pods say they run (the processes are the workspace's own binaries).
pub const IMAGE: &str = "apollo:dev";
/// Label selecting the gateway pods.
const POD_SELECTOR: &str = "app.kubernetes.io/name=apollo-gateway";
const TICK: Duration = Duration::from_millis(200);

/// How every gateway process is started.
#[derive(Clone, Debug)]
pub struct GatewayLauncher {
    /// Path of `apollo-gateway`.
    pub bin: PathBuf,
    /// Redis shared by the replicas.
    pub redis_url: String,
    /// Kubeconfig of the gateway's ServiceAccount.
    pub kubeconfig: PathBuf,
    /// HMAC key file for device tokens.
    pub secret_file: PathBuf,
    /// Extra flags (intervals, namespaces, log format).
    pub extra_args: Vec<String>,
    /// Directory of `gateway-<i>.log`.
    pub log_dir: PathBuf,
    /// `(device API, admin)` port of ordinal 0; ordinal i adds i. None: ephemeral ports.
    pub base_ports: Option<(u16, u16)>,
    /// Extra environment of every gateway.
    pub env: Vec<(String, String)>,
    /// Extra environment of particular ordinals (e.g. a skewed clock for one replica).
    pub ordinal_env: BTreeMap<u32, Vec<(String, String)>>,
}

struct Running {
    /// uid of the pod this process belongs to.
    uid: String,
    proc: Proc,
    addr: String,
    admin: String,
    started_at: String,
    /// SIGTERM sent at; the pod is being deleted.
    terminating: Option<Instant>,
}

#[derive(Default)]
struct PodRecord {
    restarts: u32,
    /// Crash-loop back-off: no restart before this.
    not_before: Option<Instant>,
    /// Last status patched, so unchanged status costs no write.
    last_status: Value,
    last_exit: Option<i32>,
}

/// The gateway processes of the local node.
pub struct Gateways {
    launcher: GatewayLauncher,
    running: Mutex<BTreeMap<u32, Running>>,
    /// Ordinals killed on purpose (kill -9 in a test): not restarted until revived.
    held: Mutex<BTreeSet<u32>>,
    /// Per pod uid: restarts, back-off, last status.
    pods: Mutex<BTreeMap<String, PodRecord>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `apollo-gateway-3` -> 3.
fn ordinal_of(pod: &str) -> Option<u32> {
    pod.rsplit_once('-')?.1.parse().ok()
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl Gateways {
    /// No processes yet; [`run`] starts them as pods appear.
    pub fn new(launcher: GatewayLauncher) -> Self {
        Self {
            launcher,
            running: Mutex::new(BTreeMap::new()),
            held: Mutex::new(BTreeSet::new()),
            pods: Mutex::new(BTreeMap::new()),
        }
    }

    /// Ordinals with a live process.
    pub fn ordinals(&self) -> Vec<u32> {
        lock(&self.running).keys().copied().collect()
    }

    /// Device-API address of a running ordinal.
    pub fn addr(&self, ordinal: u32) -> Option<String> {
        lock(&self.running).get(&ordinal).map(|r| r.addr.clone())
    }

    /// Admin address of a running ordinal.
    pub fn admin_addr(&self, ordinal: u32) -> Option<String> {
        lock(&self.running).get(&ordinal).map(|r| r.admin.clone())
    }

    /// Output of a running ordinal.
    pub fn logs(&self, ordinal: u32) -> Option<String> {
        lock(&self.running).get(&ordinal).map(|r| r.proc.logs())
    }

    /// SIGKILL (like a machine dying); the process stays dead (its pod not Ready) until
    /// [`Gateways::revive`].
    pub fn kill(&self, ordinal: u32) {
        lock(&self.held).insert(ordinal);
        let taken = lock(&self.running).remove(&ordinal);
        if let Some(mut r) = taken {
            r.proc.kill();
        }
    }

    /// Sends `signal` to a running ordinal's process (e.g. SIGSTOP/SIGCONT to freeze one replica
    /// as a hung machine would be); no-op when the ordinal does not run.
    pub fn signal(&self, ordinal: u32, signal: nix::sys::signal::Signal) {
        if let Some(r) = lock(&self.running).get(&ordinal) {
            r.proc.signal(signal);
        }
    }

    /// Lets a killed ordinal run again.
    pub fn revive(&self, ordinal: u32) {
        lock(&self.held).remove(&ordinal);
    }

    /// Stops every process gracefully (SIGTERM: deregistration, long polls end).
    pub async fn stop_all(&self) {
        let all: Vec<Running> = std::mem::take(&mut *lock(&self.running))
            .into_values()
            .collect();
        for r in &all {
            r.proc.signal(nix::sys::signal::Signal::SIGTERM);
        }
        for mut r in all {
            r.proc.terminate(Duration::from_secs(15)).await;
        }
    }

    /// SIGKILLs every process (on drop, when there is no time for grace).
    pub fn kill_all(&self) {
        let all = std::mem::take(&mut *lock(&self.running));
        for (_, mut r) in all {
            r.proc.kill();
        }
    }

    fn start(&self, ordinal: u32, pod: &str, uid: &str) {
        let l = &self.launcher;
        let (port, admin) = match l.base_ports {
            Some((p, a)) => (p + ordinal as u16, a + ordinal as u16),
            None => (
                apollo_test_support::free_port(),
                apollo_test_support::free_port(),
            ),
        };
        let addr = format!("127.0.0.1:{port}");
        let admin_addr = format!("127.0.0.1:{admin}");
        let proc = Proc::builder(&l.bin)
            .name(format!("gateway-{ordinal}"))
            .log_file(l.log_dir.join(format!("gateway-{ordinal}.log")))
            .env("KUBECONFIG", &l.kubeconfig)
            .env("APOLLO_POD_NAME", pod)
            .args(["--listen", &addr, "--admin-listen", &admin_addr])
            .args(["--redis-url", &l.redis_url])
            .arg("--auth-secret-file")
            .arg(&l.secret_file)
            .args(&l.extra_args)
            .envs(crate::stack::otel_env())
            .envs(l.env.clone())
            .envs(l.ordinal_env.get(&ordinal).cloned().unwrap_or_default())
            .spawn();
        lock(&self.running).insert(
            ordinal,
            Running {
                uid: uid.to_owned(),
                proc,
                addr,
                admin: admin_addr,
                started_at: now_rfc3339(),
                terminating: None,
            },
        );
    }
}

/// Registers the node (Ready) if it is not there yet.
pub async fn register_node(client: &kube::Client) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(NODE_NAME).await?.is_none() {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE_NAME, "labels": {
                "kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux"
            }},
        }))?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let now = now_rfc3339();
    let status = json!({"status": {
        "conditions": [{
            "type": "Ready", "status": "True", "reason": "ApolloLocalNode",
            "message": "processes of this machine", "lastHeartbeatTime": now, "lastTransitionTime": now
        }],
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE_NAME}],
        "capacity": {"cpu": "2", "memory": "24Gi", "pods": "110"},
        "allocatable": {"cpu": "2", "memory": "24Gi", "pods": "110"},
    }});
    nodes
        .patch_status(NODE_NAME, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

async fn ready(http: &reqwest::Client, admin: &str) -> bool {
    http.get(format!("http://{admin}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Runs the node's pods in `namespace` until `shutdown`.
pub async fn run(
    client: kube::Client,
    namespace: String,
    gateways: Arc<Gateways>,
    shutdown: CancellationToken,
) {
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let (store, writer) = reflector::store::<Pod>();
    let config = watcher::Config::default()
        .labels(POD_SELECTOR)
        .fields(&format!("spec.nodeName={NODE_NAME}"));
    let watch = watcher(pods.clone(), config)
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .for_each(|_| futures::future::ready(()));
    let watch = tokio::spawn(watch);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap_or_default();
    let _ = store.wait_until_ready().await;
    loop {
        let mut current = store.state();
        current.sort_by_key(|p| p.name_any());
        reconcile(&pods, &gateways, &http, &current).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(TICK) => {}
        }
    }
    watch.abort();
}

async fn reconcile(
    pods: &Api<Pod>,
    gateways: &Gateways,
    http: &reqwest::Client,
    current: &[Arc<Pod>],
) {
    let mut wanted: BTreeSet<u32> = BTreeSet::new();
    for pod in current {
        let name = pod.name_any();
        let (Some(ordinal), Some(uid)) = (ordinal_of(&name), pod.uid()) else {
            continue;
        };
        wanted.insert(ordinal);
        if pod.metadata.deletion_timestamp.is_some() {
            terminate(pods, gateways, pod, ordinal, &uid).await;
            continue;
        }
        // A process of an earlier pod of this ordinal (the pod was replaced): end it.
        let stale = {
            let mut running = lock(&gateways.running);
            match running.get(&ordinal) {
                Some(r) if r.uid != uid => running.remove(&ordinal),
                _ => None,
            }
        };
        if let Some(mut old) = stale {
            old.proc.kill();
        }
        let exited = {
            let mut running = lock(&gateways.running);
            let status = running.get_mut(&ordinal).and_then(|r| r.proc.try_wait());
            if status.is_some() {
                running.remove(&ordinal);
            }
            status
        };
        if let Some(status) = exited {
            let mut records = lock(&gateways.pods);
            let record = records.entry(uid.clone()).or_default();
            record.restarts += 1;
            record.last_exit = status.code();
            // A kubelet's CrashLoopBackOff: 0.5 s, 1 s, 2 s ... up to 30 s.
            let delay = Duration::from_millis(500u64 << record.restarts.min(6).saturating_sub(1))
                .min(Duration::from_secs(30));
            record.not_before = Some(Instant::now() + delay);
            eprintln!(
                "apollo-dev: {name} exited ({status}); restarting it in {delay:?} (log: {})",
                gateways
                    .launcher
                    .log_dir
                    .join(format!("gateway-{ordinal}.log"))
                    .display()
            );
        }
        let held = lock(&gateways.held).contains(&ordinal);
        let waiting = lock(&gateways.pods)
            .get(&uid)
            .and_then(|r| r.not_before)
            .is_some_and(|t| t > Instant::now());
        let running = lock(&gateways.running).contains_key(&ordinal);
        if !running && !held && !waiting {
            gateways.start(ordinal, &name, &uid);
        }
        report_status(pods, gateways, http, &name, ordinal, &uid).await;
    }
    // Processes whose pod is gone (force-deleted, or the StatefulSet removed): end them.
    let orphans: Vec<Running> = {
        let mut running = lock(&gateways.running);
        let gone: Vec<u32> = running
            .keys()
            .filter(|o| !wanted.contains(o))
            .copied()
            .collect();
        gone.iter().filter_map(|o| running.remove(o)).collect()
    };
    for mut r in orphans {
        r.proc.terminate(Duration::from_secs(15)).await;
    }
}

/// The pod is being deleted: SIGTERM its process once, SIGKILL after the grace period, and remove
/// the pod once the process is gone (what a kubelet does to finish a graceful deletion).
async fn terminate(pods: &Api<Pod>, gateways: &Gateways, pod: &Pod, ordinal: u32, uid: &str) {
    let grace = Duration::from_secs(
        pod.metadata
            .deletion_grace_period_seconds
            .unwrap_or(30)
            .max(0) as u64,
    );
    let done = {
        let mut running = lock(&gateways.running);
        match running.get_mut(&ordinal) {
            Some(r) if r.uid == uid => {
                if r.proc.try_wait().is_some() {
                    running.remove(&ordinal);
                    true
                } else {
                    match r.terminating {
                        None => {
                            r.proc.signal(nix::sys::signal::Signal::SIGTERM);
                            r.terminating = Some(Instant::now());
                        }
                        Some(at) if at.elapsed() > grace => r.proc.kill(),
                        Some(_) => {}
                    }
                    false
                }
            }
            _ => true,
        }
    };
    if done {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let _ = pods.delete(&pod.name_any(), &params).await;
        lock(&gateways.pods).remove(uid);
    }
}

async fn report_status(
    pods: &Api<Pod>,
    gateways: &Gateways,
    http: &reqwest::Client,
    name: &str,
    ordinal: u32,
    uid: &str,
) {
    let process = lock(&gateways.running)
        .get(&ordinal)
        .map(|r| (r.admin.clone(), r.started_at.clone(), r.proc.pid()));
    let is_ready = match &process {
        Some((admin, _, _)) => ready(http, admin).await,
        None => false,
    };
    let (restarts, last_exit) = lock(&gateways.pods)
        .get(uid)
        .map(|r| (r.restarts, r.last_exit))
        .unwrap_or_default();
    let truth = |b: bool| if b { "True" } else { "False" };
    let state = match &process {
        Some((_, started, _)) => json!({"running": {"startedAt": started}}),
        None if lock(&gateways.held).contains(&ordinal) => json!({"terminated": {
            "exitCode": 137, "reason": "Killed", "message": "killed on purpose (kill -9)"
        }}),
        None => json!({"waiting": {"reason": "CrashLoopBackOff",
            "message": format!("last exit code {}", last_exit.unwrap_or(-1))}}),
    };
    let container_id = process
        .as_ref()
        .and_then(|(_, _, pid)| *pid)
        .map(|pid| format!("process://{pid}"));
    let status = json!({"status": {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": truth(is_ready)},
            {"type": "Ready", "status": truth(is_ready)},
        ],
        "containerStatuses": [{
            "name": "gateway",
            "image": IMAGE,
            "imageID": IMAGE,
            "containerID": container_id,
            "ready": is_ready,
            "started": process.is_some(),
            "restartCount": restarts,
            "state": state,
        }],
    }});
    let unchanged = lock(&gateways.pods)
        .get(uid)
        .is_some_and(|r| r.last_status == status);
    if unchanged {
        return;
    }
    let mut patch = status.clone();
    // The start time is set once, by the first report.
    if lock(&gateways.pods).get(uid).is_none() {
        patch["status"]["startTime"] = json!(now_rfc3339());
    }
    if pods
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .is_ok()
    {
        lock(&gateways.pods)
            .entry(uid.to_owned())
            .or_default()
            .last_status = status;
    }
}

/// Lists the node's pods now (for status output).
pub async fn pod_names(client: &kube::Client, namespace: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.list(&ListParams::default().labels(POD_SELECTOR))
        .await
        .map(|l| l.items.iter().map(ResourceExt::name_any).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinal_comes_from_the_pod_name() {
        assert_eq!(ordinal_of("apollo-gateway-0"), Some(0));
        assert_eq!(ordinal_of("apollo-gateway-12"), Some(12));
        assert_eq!(ordinal_of("apollo-gateway"), None);
    }
}

//! The local stand-in for the StatefulSet controller: keeps one `apollo-gateway --ordinal i`
//! process per ordinal below the gateway StatefulSet's `spec.replicas`, stops the rest gracefully
//! (SIGTERM: the replica deregisters and ends its long polls), restarts crashed ones like a kubelet
//! would, and writes the StatefulSet's status.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apollo_test_support::Proc;
use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::samples::GATEWAY_STATEFULSET;

/// How every gateway process is started.
#[derive(Clone, Debug)]
pub struct GatewayLauncher {
    /// Path of `apollo-gateway`.
    pub bin: PathBuf,
    /// Redis shared by the replicas.
    pub redis_url: String,
    /// Kubeconfig the replicas use.
    pub kubeconfig: PathBuf,
    /// HMAC key file for device tokens.
    pub secret_file: PathBuf,
    /// Extra flags (intervals, log format).
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
    proc: Proc,
    addr: String,
    admin: String,
}

/// The gateway processes of the stack.
pub struct Gateways {
    launcher: GatewayLauncher,
    running: Mutex<BTreeMap<u32, Running>>,
    /// Ordinals killed on purpose (kill -9 in a test): not restarted until released.
    held: Mutex<BTreeSet<u32>>,
    /// Crash-loop back-off per ordinal: (restarts so far, not before).
    crash_backoff: Mutex<BTreeMap<u32, (u32, std::time::Instant)>>,
}

impl Gateways {
    /// No processes yet; the scaler starts them.
    pub fn new(launcher: GatewayLauncher) -> Self {
        Self {
            launcher,
            running: Mutex::new(BTreeMap::new()),
            held: Mutex::new(BTreeSet::new()),
            crash_backoff: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ordinals with a live process.
    pub fn ordinals(&self) -> Vec<u32> {
        self.lock().keys().copied().collect()
    }

    /// Device-API address of a running ordinal.
    pub fn addr(&self, ordinal: u32) -> Option<String> {
        self.lock().get(&ordinal).map(|r| r.addr.clone())
    }

    /// Admin address of a running ordinal.
    pub fn admin_addr(&self, ordinal: u32) -> Option<String> {
        self.lock().get(&ordinal).map(|r| r.admin.clone())
    }

    /// Output of a running ordinal.
    pub fn logs(&self, ordinal: u32) -> Option<String> {
        self.lock().get(&ordinal).map(|r| r.proc.logs())
    }

    fn start(&self, ordinal: u32) {
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
            .args(["--listen", &addr, "--admin-listen", &admin_addr])
            .args(["--redis-url", &l.redis_url])
            .arg("--auth-secret-file")
            .arg(&l.secret_file)
            .args(["--ordinal", &ordinal.to_string()])
            .args(&l.extra_args)
            .envs(crate::stack::otel_env())
            .envs(l.env.clone())
            .envs(l.ordinal_env.get(&ordinal).cloned().unwrap_or_default())
            .spawn();
        self.lock().insert(
            ordinal,
            Running {
                proc,
                addr,
                admin: admin_addr,
            },
        );
    }

    /// SIGTERM and wait (graceful: deregisters, ends long polls).
    pub async fn stop(&self, ordinal: u32) {
        let taken = self.lock().remove(&ordinal);
        if let Some(mut r) = taken {
            r.proc.terminate(Duration::from_secs(15)).await;
        }
    }

    /// SIGKILL (like a node dying); the scaler leaves it dead until [`Gateways::revive`].
    pub fn kill(&self, ordinal: u32) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ordinal);
        let taken = self.lock().remove(&ordinal);
        if let Some(mut r) = taken {
            r.proc.kill();
        }
    }

    /// Lets the scaler restart a killed ordinal.
    pub fn revive(&self, ordinal: u32) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ordinal);
    }

    /// Stops every process gracefully.
    pub async fn stop_all(&self) {
        let all: Vec<u32> = self.ordinals();
        futures_join(all.into_iter().map(|o| self.stop(o))).await;
    }

    /// SIGKILLs every process (used on drop, when there is no time for grace).
    pub fn kill_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        for (_, mut r) in all {
            r.proc.kill();
        }
    }

    /// Brings the processes in line with `desired` replicas; returns the running ordinals.
    async fn reconcile(&self, desired: u32) -> Vec<u32> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // Crashed processes are restarted (a kubelet would), unless held down on purpose.
        let crashed: Vec<u32> = {
            let mut running = self.lock();
            let dead: Vec<u32> = running
                .iter_mut()
                .filter_map(|(o, r)| r.proc.try_wait().map(|_| *o))
                .collect();
            for o in &dead {
                running.remove(o);
            }
            dead
        };
        let now = std::time::Instant::now();
        for o in crashed {
            // Like a kubelet's CrashLoopBackOff: 0.5 s, 1 s, 2 s ... up to 30 s.
            let mut backoff = self.crash_backoff.lock().unwrap_or_else(|e| e.into_inner());
            let entry = backoff.entry(o).or_insert((0, now));
            let delay =
                Duration::from_millis(500u64 << entry.0.min(6)).min(Duration::from_secs(30));
            *entry = (entry.0 + 1, now + delay);
            eprintln!(
                "apollo-dev: gateway-{o} exited; restarting it in {delay:?} (log: {})",
                self.launcher
                    .log_dir
                    .join(format!("gateway-{o}.log"))
                    .display()
            );
        }
        for ordinal in 0..desired {
            let waiting = self
                .crash_backoff
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&ordinal)
                .is_some_and(|(_, not_before)| *not_before > now);
            if !waiting && !held.contains(&ordinal) && !self.lock().contains_key(&ordinal) {
                self.start(ordinal);
            }
        }
        let extra: Vec<u32> = self
            .ordinals()
            .into_iter()
            .filter(|o| *o >= desired)
            .collect();
        futures_join(extra.into_iter().map(|o| self.stop(o))).await;
        self.ordinals()
    }
}

async fn futures_join<F: std::future::Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    let handles: Vec<F> = futs.collect();
    for f in handles {
        f.await;
    }
}

async fn ready(http: &reqwest::Client, admin: &str) -> bool {
    http.get(format!("http://{admin}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Follows the gateway StatefulSet until `shutdown`.
pub async fn run(
    client: kube::Client,
    namespace: String,
    gateways: Arc<Gateways>,
    shutdown: CancellationToken,
) {
    let api: Api<StatefulSet> = Api::namespaced(client, &namespace);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap_or_default();
    let mut last_status = serde_json::Value::Null;
    loop {
        if let Ok(sts) = api.get(GATEWAY_STATEFULSET).await {
            let desired = sts
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(1)
                .max(0) as u32;
            let running = gateways.reconcile(desired).await;
            let mut ready_count = 0;
            for o in &running {
                if let Some(admin) = gateways.admin_addr(*o) {
                    if ready(&http, &admin).await {
                        ready_count += 1;
                    }
                }
            }
            let status = json!({"status": {
                "observedGeneration": sts.metadata.generation,
                "replicas": running.len(),
                "currentReplicas": running.len(),
                "updatedReplicas": running.len(),
                "readyReplicas": ready_count,
                "availableReplicas": ready_count,
            }});
            if status != last_status {
                let patched = api
                    .patch_status(
                        GATEWAY_STATEFULSET,
                        &PatchParams::default(),
                        &Patch::Merge(&status),
                    )
                    .await;
                if patched.is_ok() {
                    last_status = status;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

//! The fleet's DeviceProcesses as a watch sees them: how many exist, how many converged, how many
//! show their agent disconnected, and every connected -> disconnected flip. One watch instead of
//! repeated Lists: at 100,000 DeviceProcesses a List is hundreds of megabytes for the apiserver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::bail;
use apollo_crds::conditions::{is_true, AGENT_CONNECTED, SPEC_OBSERVED};
use apollo_crds::{DeviceProcess, DeviceProcessDeployment, NetworkSwitch, LABEL_DEPLOYMENT};
use futures::StreamExt;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use kube::ResourceExt;

/// Creates one NetworkSwitch per device (labelled `fleet=<prefix>`, 32 at a time) and a
/// DeviceProcessDeployment `<prefix>-fleet` selecting them all; returns the deployment's name.
pub async fn create(
    client: &kube::Client,
    namespace: &str,
    devices: &[String],
    prefix: &str,
) -> anyhow::Result<String> {
    let switches: Api<NetworkSwitch> = Api::namespaced(client.clone(), namespace);
    let created = futures::stream::iter(devices.iter().cloned())
        .map(|d| {
            let switches = switches.clone();
            async move {
                let sw = apollo_dev::samples::switch(&d, &[("fleet", prefix)]);
                switches.create(&PostParams::default(), &sw).await
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    if let Some(Err(e)) = created.into_iter().find(Result::is_err) {
        bail!("create NetworkSwitch: {e}");
    }
    let name = format!("{prefix}-fleet");
    let mut dep = apollo_dev::samples::demo_deployment()?;
    dep.metadata.name = Some(name.clone());
    dep.spec.selector =
        serde_json::from_value(serde_json::json!({"matchLabels": {"fleet": prefix}}))?;
    let deps: Api<DeviceProcessDeployment> = Api::namespaced(client.clone(), namespace);
    deps.create(&PostParams::default(), &dep).await?;
    Ok(name)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct State {
    connected: bool,
    converged: bool,
}

#[derive(Default)]
struct Seen {
    devices: HashMap<String, State>,
    synced: bool,
    /// AgentConnected True -> not True, since the last reset.
    disconnect_flips: u64,
}

/// A watch of the DeviceProcesses of one deployment.
pub struct Fleet {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

/// Whether `dp` shows a connected agent that observed the DeviceProcess's current spec.
pub fn converged(dp: &DeviceProcess) -> bool {
    let Some(st) = dp.status.as_ref() else {
        return false;
    };
    st.observed_spec_hash.as_deref() == Some(apollo_crds::spec_hash(&dp.spec).as_str())
        && is_true(&st.conditions, AGENT_CONNECTED)
        && is_true(&st.conditions, SPEC_OBSERVED)
}

fn state(dp: &DeviceProcess) -> State {
    State {
        connected: dp
            .status
            .as_ref()
            .is_some_and(|st| is_true(&st.conditions, AGENT_CONNECTED)),
        converged: converged(dp),
    }
}

/// Counts at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// DeviceProcesses that exist.
    pub existing: usize,
    /// Of those, converged (see [`converged`]).
    pub converged: usize,
    /// Of those, showing AgentConnected=True.
    pub connected: usize,
    /// AgentConnected True -> not True flips since the last [`Fleet::reset_flips`].
    pub disconnect_flips: u64,
}

impl Fleet {
    /// Starts the watch of `deployment`'s DeviceProcesses and waits for its initial list.
    pub async fn start(api: Api<DeviceProcess>, deployment: &str) -> anyhow::Result<Self> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let config = watcher::Config::default()
            .labels(&format!("{LABEL_DEPLOYMENT}={deployment}"))
            .page_size(500);
        let mut events = watcher(api, config).boxed();
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let mut s = lock(&seen);
                    match event {
                        watcher::Event::Apply(dp) | watcher::Event::InitApply(dp) => {
                            let new = state(&dp);
                            let old = s.devices.insert(dp.name_any(), new);
                            if s.synced && old.is_some_and(|o| o.connected) && !new.connected {
                                s.disconnect_flips += 1;
                            }
                        }
                        watcher::Event::Delete(dp) => {
                            s.devices.remove(&dp.name_any());
                        }
                        watcher::Event::InitDone => s.synced = true,
                        watcher::Event::Init => {}
                    }
                }
            }
        });
        let fleet = Self { seen, task };
        let start = Instant::now();
        while !lock(&fleet.seen).synced {
            if start.elapsed() > Duration::from_secs(300) {
                bail!("the DeviceProcess watch did not list the fleet within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(fleet)
    }

    /// Counts now.
    pub fn counts(&self) -> Counts {
        let s = lock(&self.seen);
        Counts {
            existing: s.devices.len(),
            converged: s.devices.values().filter(|d| d.converged).count(),
            connected: s.devices.values().filter(|d| d.connected).count(),
            disconnect_flips: s.disconnect_flips,
        }
    }

    /// Starts counting disconnect flips afresh.
    pub fn reset_flips(&self) {
        lock(&self.seen).disconnect_flips = 0;
    }

    /// Waits until `done(counts)` holds; fails after `deadline` saying how far it got.
    pub async fn wait(
        &self,
        what: &str,
        deadline: Duration,
        done: impl Fn(&Counts) -> bool,
    ) -> anyhow::Result<f64> {
        let start = Instant::now();
        let mut last_note = Instant::now();
        loop {
            let c = self.counts();
            if done(&c) {
                return Ok(start.elapsed().as_secs_f64());
            }
            if start.elapsed() > deadline {
                bail!(
                    "{what}: not within {deadline:?} ({} DeviceProcesses, {} converged, {} connected)",
                    c.existing,
                    c.converged,
                    c.connected
                );
            }
            if last_note.elapsed() > Duration::from_secs(30) {
                eprintln!(
                    "loadtest: {what}: {:.0}s, {} DeviceProcesses, {} converged, {} connected",
                    start.elapsed().as_secs_f64(),
                    c.existing,
                    c.converged,
                    c.connected
                );
                last_note = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(m: &Mutex<Seen>) -> MutexGuard<'_, Seen> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

//! One rollout wave under a strategy: the template changes, and the numbers that matter to an
//! operator are taken: time until the controller reports the rollout complete, the highest number
//! of DeviceProcesses unavailable at any moment (from a watch: every state the apiserver went
//! through, in order; it must never exceed the budget), and the writes per DeviceProcess (from the
//! apiserver's audit log).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use apollo_controller::rollout::resolve_max_unavailable;
use apollo_crds::conditions::{self, AGENT_CONNECTED, SPEC_OBSERVED};
use apollo_crds::deployment::{PROGRESSING, REASON_COMPLETE};
use apollo_crds::{spec_hash, DeviceProcess, DeviceProcessDeployment, LABEL_DEPLOYMENT};
use apollo_dev::Stack;
use apollo_test_support::Component;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::json;

/// The strategy of the measured wave.
#[derive(Debug, Clone)]
pub struct Strategy {
    /// `AllAtOnce` instead of a rolling update.
    pub all_at_once: bool,
    /// `maxUnavailable`: a count or a percentage.
    pub max_unavailable: String,
}

impl Strategy {
    /// `maxUnavailable` as the CRD takes it.
    pub fn max_unavailable(&self) -> IntOrString {
        match self.max_unavailable.parse::<i32>() {
            Ok(n) => IntOrString::Int(n),
            Err(_) => IntOrString::String(self.max_unavailable.clone()),
        }
    }

    /// The deployment patch that sets the strategy and changes the template.
    pub fn patch(&self, args: &str) -> serde_json::Value {
        json!({"spec": {
            "updateStrategy": {
                "type": if self.all_at_once { "AllAtOnce" } else { "RollingUpdate" },
                "rollingUpdate": {"maxUnavailable": self.max_unavailable()}
            },
            "template": {"spec": {"execution": {"args": [args]}}}
        }})
    }
}

/// What one wave measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RolloutWave {
    /// `RollingUpdate` or `AllAtOnce`.
    pub strategy: String,
    /// `maxUnavailable` as given.
    pub max_unavailable: String,
    /// It resolved against the fleet (DeviceProcesses; everything for AllAtOnce).
    pub budget: usize,
    /// Seconds from the template change until the controller reported the rollout complete.
    pub seconds: f64,
    /// The most DeviceProcesses unavailable at any moment the watch saw.
    pub max_unavailable_seen: usize,
    /// DeviceProcess spec patches by the controller.
    pub spec_patches: u64,
    /// The most spec patches of one DeviceProcess.
    pub spec_patches_per_device_max: u64,
    /// DeviceProcess status patches by the gateways.
    pub status_patches: u64,
    /// The most status patches of one DeviceProcess.
    pub status_patches_per_device_max: u64,
    /// Deployment status patches by the controller.
    pub deployment_status_patches: u64,
    /// Event writes by every component.
    pub event_writes: u64,
}

/// Available as the controller judges it with minReadySeconds 0.
fn available(dp: &DeviceProcess) -> bool {
    dp.status.as_ref().is_some_and(|s| {
        s.observed_spec_hash.as_deref() == Some(spec_hash(&dp.spec).as_str())
            && conditions::is_true(&s.conditions, AGENT_CONNECTED)
            && conditions::find(&s.conditions, SPEC_OBSERVED).is_some_and(|c| {
                c.status == conditions::TRUE && c.observed_generation == dp.metadata.generation
            })
    })
}

#[derive(Default)]
struct Seen {
    unavailable: BTreeMap<String, bool>,
    down: usize,
    max_down: usize,
    synced: bool,
}

/// Watches the fleet's DeviceProcesses and keeps the highest number unavailable at once.
struct Observer {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Observer {
    async fn start(api: Api<DeviceProcess>, deployment: &str) -> anyhow::Result<Self> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let config = watcher::Config::default().labels(&format!("{LABEL_DEPLOYMENT}={deployment}"));
        let mut events = watcher(api, config).boxed();
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    let (name, down) = match event {
                        watcher::Event::Apply(dp) | watcher::Event::InitApply(dp) => {
                            (dp.name_any(), !available(&dp))
                        }
                        watcher::Event::Delete(dp) => (dp.name_any(), false),
                        watcher::Event::InitDone => {
                            s.synced = true;
                            continue;
                        }
                        watcher::Event::Init => continue,
                    };
                    let before = s.unavailable.insert(name, down).unwrap_or(false);
                    match (before, down) {
                        (false, true) => s.down += 1,
                        (true, false) => s.down -= 1,
                        _ => {}
                    }
                    if s.synced {
                        s.max_down = s.max_down.max(s.down);
                    }
                }
            }
        });
        let observer = Self { seen, task };
        let start = Instant::now();
        while !observer.with(|s| s.synced) {
            if start.elapsed() > Duration::from_secs(120) {
                bail!("the DeviceProcess watch did not list the fleet within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(observer)
    }

    fn with<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn complete(d: &DeviceProcessDeployment, generation: i64) -> bool {
    d.status.as_ref().is_some_and(|s| {
        s.observed_generation == Some(generation)
            && conditions::find(&s.conditions, PROGRESSING).is_some_and(|c| {
                c.reason == REASON_COMPLETE && c.observed_generation == Some(generation)
            })
    })
}

/// Change the template of `deployment` (of `devices` DeviceProcesses) under `strategy`, wait
/// (at most `deadline`) until the controller reports the rollout complete, and measure.
pub async fn measure(
    stack: &Stack,
    deployment: &str,
    devices: usize,
    strategy: &Strategy,
    deadline: Duration,
) -> anyhow::Result<RolloutWave> {
    let ns = stack.namespace().to_owned();
    let deployments: Api<DeviceProcessDeployment> = Api::namespaced(stack.client(), &ns);
    let observer = Observer::start(Api::namespaced(stack.client(), &ns), deployment).await?;
    let already_down = observer.with(|s| s.down);
    if already_down > 0 {
        eprintln!("loadtest: {already_down} DeviceProcesses unavailable before the wave");
    }
    stack.system().reset_requests().await;
    let started = Instant::now();
    let generation = deployments
        .patch(
            deployment,
            &PatchParams::default(),
            &Patch::Merge(strategy.patch("rollout")),
        )
        .await
        .context("change the template")?
        .metadata
        .generation
        .context("generation")?;
    loop {
        let d = deployments.get(deployment).await?;
        if complete(&d, generation) {
            break;
        }
        if started.elapsed() > deadline {
            let s = d.status.unwrap_or_default();
            bail!(
                "the rollout did not complete within {deadline:?}: {} of {devices} updated, {} available",
                s.updated_number_scheduled,
                s.number_available
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let max_unavailable_seen = observer.with(|s| s.max_down);
    drop(observer);
    // Let the gateways' status writers finish their queues before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let controller = stack.system().username(Component::Controller);
    let (mut spec, mut status) = (
        BTreeMap::<String, u64>::new(),
        BTreeMap::<String, u64>::new(),
    );
    let (mut deployment_status_patches, mut event_writes) = (0, 0);
    for r in stack.system().requests().await {
        match (r.resource.as_str(), r.subresource.as_str(), r.is_write()) {
            ("deviceprocesses", "", true) if r.user == controller => {
                *spec.entry(r.name).or_default() += 1;
            }
            ("deviceprocesses", "status", true) => *status.entry(r.name).or_default() += 1,
            ("deviceprocessdeployments", "status", true) => deployment_status_patches += 1,
            ("events", _, true) => event_writes += 1,
            _ => {}
        }
    }
    Ok(RolloutWave {
        strategy: if strategy.all_at_once {
            "AllAtOnce"
        } else {
            "RollingUpdate"
        }
        .to_owned(),
        max_unavailable: strategy.max_unavailable.clone(),
        budget: if strategy.all_at_once {
            devices
        } else {
            resolve_max_unavailable(&strategy.max_unavailable(), devices)
        },
        seconds,
        max_unavailable_seen,
        spec_patches: spec.values().sum(),
        spec_patches_per_device_max: spec.values().copied().max().unwrap_or(0),
        status_patches: status.values().sum(),
        status_patches_per_device_max: status.values().copied().max().unwrap_or(0),
        deployment_status_patches,
        event_writes,
    })
}

/// The wave as rows of the results table.
pub fn render(w: &RolloutWave, devices: usize) -> String {
    let n = devices.max(1) as f64;
    format!(
        "| rollout wave: strategy | {} maxUnavailable {} (budget {} of {devices}) |\n\
         | rollout wave: time until the controller reported it complete | {:.1} s |\n\
         | rollout wave: most DeviceProcesses unavailable at once (watch) | {} (budget {}) |\n\
         | rollout wave: controller spec patches | {} ({:.2} per device, at most {} for one) |\n\
         | rollout wave: gateway status patches | {} ({:.2} per device, at most {} for one) |\n\
         | rollout wave: deployment status patches / Event writes | {} / {} |\n",
        w.strategy,
        w.max_unavailable,
        w.budget,
        w.seconds,
        w.max_unavailable_seen,
        w.budget,
        w.spec_patches,
        w.spec_patches as f64 / n,
        w.spec_patches_per_device_max,
        w.status_patches,
        w.status_patches as f64 / n,
        w.status_patches_per_device_max,
        w.deployment_status_patches,
        w.event_writes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_sets_the_strategy_and_the_template() {
        let rolling = Strategy {
            all_at_once: false,
            max_unavailable: "10%".into(),
        };
        let patch = rolling.patch("rollout");
        assert_eq!(patch["spec"]["updateStrategy"]["type"], "RollingUpdate");
        assert_eq!(
            patch["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
            "10%"
        );
        assert_eq!(
            patch["spec"]["template"]["spec"]["execution"]["args"][0],
            "rollout"
        );
        let counted = Strategy {
            all_at_once: true,
            max_unavailable: "250".into(),
        };
        assert_eq!(
            counted.patch("x")["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
            250
        );
        assert_eq!(
            counted.patch("x")["spec"]["updateStrategy"]["type"],
            "AllAtOnce"
        );
    }
}

//! Rollouts (issue 14) end to end: the real control plane, the real controller, gateway and router
//! processes, and real agents (the agent library, in process). Availability is sampled from a
//! watch of the DeviceProcesses, so every state the apiserver went through is seen, in order;
//! writes are counted from the apiserver's audit log; `kubectl apollo` is the built plugin run by
//! the real kubectl.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apollo_crds::conditions::{self, SPEC_OBSERVED};
use apollo_crds::deployment::PROGRESSING;
use apollo_crds::{DeviceProcess, DeviceProcessDeployment, LABEL_DEPLOYMENT};
use apollo_dev::fleet::{self, Agents};
use apollo_dev::{Stack, StackConfig};
use apollo_test_support::{binary, events_about, kubectl_program, wait_for, wait_until, Component};
use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use kube::ResourceExt;
use serde_json::json;

/// Long enough for a wave of a few devices on a busy 2-core machine.
const DEADLINE: Duration = Duration::from_secs(90);

fn config(dir: &tempfile::TempDir) -> StackConfig {
    let bin_dir = binary("apollo-gateway")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let mut cfg = StackConfig::test(dir.path().to_path_buf(), bin_dir);
    cfg.gateways = 1;
    cfg.heartbeat_interval_seconds = 2;
    cfg.stale_multiplier = 3;
    cfg.sweep_interval_seconds = 1;
    cfg
}

/// A stack, a fleet `name` of `n` devices (switch labels from `labels`), a deployment of it and
/// an agent per device; returns once every DeviceProcess is available and the first rollout (the
/// creation) is complete.
struct Fleet {
    _dir: tempfile::TempDir,
    stack: Stack,
    name: String,
    devices: Vec<String>,
    agents: Agents,
    deployments: Api<DeviceProcessDeployment>,
}

impl Fleet {
    async fn start(name: &str, n: usize, labels: impl Fn(usize) -> Vec<(String, String)>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let stack = Stack::start(config(&dir)).await.expect("start the stack");
        let devices = fleet::devices(name, n);
        let index: BTreeMap<String, usize> = devices
            .iter()
            .enumerate()
            .map(|(i, d)| (d.clone(), i))
            .collect();
        fleet::install_labelled(&stack.client(), stack.namespace(), name, &devices, |d| {
            labels(index[d])
        })
        .await
        .expect("install the fleet");
        let mut agents = Agents::new(&stack).expect("agents");
        for d in &devices {
            agents.start(&stack, d).expect("start agent");
        }
        let deployments = Api::namespaced(stack.client(), stack.namespace());
        let fleet = Self {
            _dir: dir,
            stack,
            name: name.to_owned(),
            devices,
            agents,
            deployments,
        };
        fleet
            .wait_progressing("the first rollout completes", "Complete")
            .await;
        fleet
    }

    fn processes(&self) -> Api<DeviceProcess> {
        Api::namespaced(self.stack.client(), self.stack.namespace())
    }

    async fn deployment(&self) -> DeviceProcessDeployment {
        self.deployments
            .get(&self.name)
            .await
            .expect("get deployment")
    }

    async fn patch(&self, patch: serde_json::Value) -> i64 {
        self.deployments
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("patch deployment")
            .metadata
            .generation
            .expect("generation")
    }

    /// Wait until the status speaks of the current generation and `done` holds.
    async fn wait_status(
        &self,
        what: &str,
        done: impl Fn(&DeviceProcessDeployment) -> bool,
    ) -> DeviceProcessDeployment {
        wait_for(DEADLINE, what, || async {
            let d = self.deployments.get(&self.name).await.ok()?;
            let current = d
                .status
                .as_ref()
                .is_some_and(|s| s.observed_generation == d.metadata.generation);
            (current && done(&d)).then_some(d)
        })
        .await
    }

    async fn wait_progressing(&self, what: &str, reason: &str) -> DeviceProcessDeployment {
        self.wait_status(what, |d| {
            progressing(d).is_some_and(|(r, g)| r == reason && g == d.metadata.generation)
        })
        .await
    }

    /// The controller's patches of DeviceProcesses since the last reset, by name.
    async fn controller_patches(&self) -> BTreeMap<String, u64> {
        let mut by_name = BTreeMap::new();
        for r in self.stack.system().requests_by(Component::Controller).await {
            if r.verb == "patch" && r.resource == "deviceprocesses" && r.subresource.is_empty() {
                *by_name.entry(r.name).or_insert(0) += 1;
            }
        }
        by_name
    }

    async fn events(&self, reason: &str) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.stack.client(), self.stack.namespace());
        events_about(&api, &self.name, Some("DeviceProcessDeployment"), reason).await
    }

    /// Run `kubectl apollo <args> -n <namespace>` with the real kubectl, the plugin first on PATH.
    async fn kubectl_apollo(&self, args: &[&str]) -> std::process::Output {
        let plugin_dir: PathBuf = binary("kubectl-apollo")
            .parent()
            .expect("bin dir")
            .to_path_buf();
        let path = std::env::join_paths(std::iter::once(plugin_dir).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )))
        .expect("PATH");
        let run = tokio::process::Command::new(kubectl_program())
            .arg("apollo")
            .args(args)
            .args(["-n", self.stack.namespace()])
            .env("KUBECONFIG", self.stack.kubeconfig())
            .env("PATH", path)
            .kill_on_drop(true)
            .output();
        tokio::time::timeout(DEADLINE, run)
            .await
            .expect("kubectl apollo finishes")
            .expect("run kubectl apollo")
    }
}

fn progressing(d: &DeviceProcessDeployment) -> Option<(String, Option<i64>)> {
    let c = conditions::find(&d.status.as_ref()?.conditions, PROGRESSING)?;
    Some((c.reason.clone(), c.observed_generation))
}

/// Available as the controller judges it (minReadySeconds 0): connected, and the current spec
/// observed at the current generation.
fn available(dp: &DeviceProcess) -> bool {
    fleet::healthy(dp)
        && dp.status.as_ref().is_some_and(|s| {
            conditions::find(&s.conditions, SPEC_OBSERVED)
                .is_some_and(|c| c.observed_generation == dp.metadata.generation)
        })
}

/// What a watch of the fleet's DeviceProcesses saw, event by event.
#[derive(Default)]
struct Seen {
    current: BTreeMap<String, DeviceProcess>,
    /// Generation of each DeviceProcess when the observation started.
    baseline: BTreeMap<String, i64>,
    /// Most unavailable at once, and most unavailable at once within one group.
    max_unavailable: usize,
    max_in_a_group: usize,
    /// In order: ("updated", device) when its DeviceProcess first got a newer generation,
    /// ("available", device) when it first was available at that newer generation.
    log: Vec<(&'static str, String)>,
    synced: bool,
}

/// Watches the fleet's DeviceProcesses until dropped; `group` names the group of a device.
struct Observer {
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Observer {
    async fn start(fleet: &Fleet, group: impl Fn(&str) -> Option<String> + Send + 'static) -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let config =
            watcher::Config::default().labels(&format!("{LABEL_DEPLOYMENT}={}", fleet.name));
        let mut events = watcher(fleet.processes(), config).boxed();
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Some(event) = events.next().await {
                    let Ok(event) = event else { continue };
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    match event {
                        watcher::Event::Apply(dp) | watcher::Event::InitApply(dp) => {
                            let name = dp.name_any();
                            let device = dp.spec.device_ref.name.clone();
                            let generation = dp.metadata.generation.unwrap_or_default();
                            if !s.synced {
                                s.baseline.insert(name.clone(), generation);
                            } else if s.baseline.get(&name).is_some_and(|g| generation > *g) {
                                let logged = |log: &[(&str, String)], kind: &str| {
                                    log.iter().any(|(k, d)| *k == kind && *d == device)
                                };
                                if !logged(&s.log, "updated") {
                                    s.log.push(("updated", device.clone()));
                                }
                                if available(&dp) && !logged(&s.log, "available") {
                                    s.log.push(("available", device.clone()));
                                }
                            }
                            s.current.insert(name, dp);
                        }
                        watcher::Event::Delete(dp) => {
                            s.current.remove(&dp.name_any());
                        }
                        watcher::Event::InitDone => s.synced = true,
                        watcher::Event::Init => {}
                    }
                    let down: Vec<String> = s
                        .current
                        .values()
                        .filter(|dp| !available(dp))
                        .map(|dp| dp.spec.device_ref.name.clone())
                        .collect();
                    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
                    for device in &down {
                        if let Some(g) = group(device) {
                            *groups.entry(g).or_default() += 1;
                        }
                    }
                    s.max_unavailable = s.max_unavailable.max(down.len());
                    s.max_in_a_group = s
                        .max_in_a_group
                        .max(groups.values().copied().max().unwrap_or(0));
                }
            }
        });
        let observer = Self { seen, task };
        wait_until(DEADLINE, "the observer has listed the fleet", || async {
            observer
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .synced
        })
        .await;
        observer
    }

    fn with<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn template_change(args: &str) -> serde_json::Value {
    json!({"spec": {"template": {"spec": {"execution": {"args": [args]}}}}})
}

fn pair_of(device: &str) -> Option<String> {
    let index: usize = device.rsplit('-').next()?.parse().ok()?;
    Some(format!("p{}", index / 2))
}

#[tokio::test]
async fn twenty_devices_in_ten_pairs_roll_out_within_both_budgets_canaries_first() {
    // Devices 0 and 3 (pairs p0 and p1) are the canaries.
    let fleet = Fleet::start("pairs", 20, |i| {
        let mut labels = vec![("pair".to_owned(), format!("p{}", i / 2))];
        if i == 0 || i == 3 {
            labels.push(("canary".to_owned(), "true".to_owned()));
        }
        labels
    })
    .await;
    let canaries: BTreeSet<String> = [0, 3].map(|i| fleet.devices[i].clone()).into();
    let started_before = fleet.events("RolloutStarted").await.len();
    let completed_before = fleet.events("RolloutComplete").await.len();
    let observer = Observer::start(&fleet, pair_of).await;
    fleet.stack.system().reset_requests().await;

    let mut change = template_change("v2");
    change["spec"]["updateStrategy"] = json!({
        "type": "RollingUpdate",
        "rollingUpdate": {
            "maxUnavailable": "25%",
            "maxUnavailablePerGroup": {"topologyKey": "pair", "maxUnavailable": 1},
            "canary": {"selector": {"matchLabels": {"canary": "true"}}}
        }
    });
    fleet.patch(change).await;
    let done = fleet
        .wait_progressing("the rollout of v2 completes", "Complete")
        .await;

    let status = done.status.expect("status");
    assert_eq!(
        (status.updated_number_scheduled, status.number_available),
        (20, 20)
    );
    assert_eq!(
        (status.number_held_by_strategy, status.number_failed),
        (0, 0)
    );
    for dp in fleet
        .processes()
        .list(&Default::default())
        .await
        .expect("list")
        .items
    {
        assert_eq!(dp.spec.execution.args, ["v2"], "{}", dp.name_any());
    }
    let (max_unavailable, max_in_a_pair, log) =
        observer.with(|s| (s.max_unavailable, s.max_in_a_group, s.log.clone()));
    assert!(
        max_unavailable <= 5,
        "{max_unavailable} unavailable at once"
    );
    assert_eq!(
        max_in_a_pair, 1,
        "two of one pair unavailable at once: {log:?}"
    );

    // Canaries first: every other device was updated only after both canaries were available.
    let position = |kind: &str, device: &str| {
        log.iter()
            .position(|(k, d)| *k == kind && d == device)
            .unwrap_or_else(|| panic!("no {kind} of {device} in {log:?}"))
    };
    let canaries_available = canaries
        .iter()
        .map(|c| position("available", c))
        .max()
        .expect("canaries");
    for device in fleet.devices.iter().filter(|d| !canaries.contains(*d)) {
        assert!(
            position("updated", device) > canaries_available,
            "{device} was updated before the canaries were available: {log:?}"
        );
    }

    // One spec update per DeviceProcess, and nothing else written to them by the controller.
    let patches = fleet.controller_patches().await;
    assert_eq!(patches.len(), 20, "{patches:?}");
    assert!(patches.values().all(|n| *n == 1), "{patches:?}");
    // Events for the rollout, not per device.
    assert_eq!(
        fleet.events("RolloutStarted").await.len(),
        started_before + 1
    );
    assert_eq!(
        fleet.events("RolloutComplete").await.len(),
        completed_before + 1
    );
    println!("rollout of 20 devices: at most {max_unavailable} unavailable at once");
}

#[tokio::test]
async fn a_stalled_agent_halts_the_rollout_after_the_deadline_and_nothing_more_is_updated() {
    let mut fleet = Fleet::start("stall", 8, |_| Vec::new()).await;
    // Slow waves (minReadySeconds) and a short deadline: the halt comes with devices still held.
    fleet
        .patch(json!({"spec": {
            "minReadySeconds": 3,
            "progressDeadlineSeconds": 8,
            "updateStrategy": {"rollingUpdate": {"maxUnavailable": 2}}
        }}))
        .await;
    let stalled = fleet.devices[5].clone();
    fleet.agents.stop(&stalled).await;
    let processes = fleet.processes();
    wait_until(
        DEADLINE,
        "the stalled device shows disconnected",
        || async {
            processes.list(&Default::default()).await.is_ok_and(|l| {
                l.items
                    .iter()
                    .any(|dp| dp.spec.device_ref.name == stalled && fleet::disconnected(dp))
            })
        },
    )
    .await;
    fleet.stack.system().reset_requests().await;

    fleet.patch(template_change("v2")).await;
    let halted = fleet
        .wait_progressing("the rollout halts", "ProgressDeadlineExceeded")
        .await;
    let patched_at_halt = fleet.controller_patches().await;
    let status = halted.status.expect("status");
    assert_eq!(status.number_failed, 1);
    assert!(status.number_held_by_strategy > 0, "{status:?}");
    let message = conditions::find(&status.conditions, PROGRESSING)
        .expect("Progressing")
        .message
        .clone();
    assert!(message.contains(&format!("stall-{stalled}")), "{message}");

    // Every other updated device becomes available, which would free the budget: still nothing
    // more is updated. Wait until the status shows that state, then count again.
    let held = usize::try_from(status.number_held_by_strategy).expect("held");
    let settled = fleet
        .wait_status("every device but the stalled one is available", |d| {
            d.status.as_ref().is_some_and(|s| s.number_available == 7)
        })
        .await;
    assert_eq!(
        settled
            .status
            .as_ref()
            .map(|s| (s.number_held_by_strategy, s.number_failed)),
        Some((i32::try_from(held).expect("held"), 1)),
        "still halted, still one failure"
    );
    assert_eq!(fleet.controller_patches().await, patched_at_halt);
    assert_eq!(patched_at_halt.len(), 8 - held, "{patched_at_halt:?}");
    assert!(patched_at_halt.contains_key(&format!("stall-{stalled}")));
    let halts = fleet.events("RolloutHalted").await;
    assert_eq!(halts.len(), 1, "{halts:?}");
    assert_eq!(halts[0].type_.as_deref(), Some("Warning"));

    // The plugin, through the real kubectl: status exits non-zero, stragglers say why.
    let out = fleet
        .kubectl_apollo(&["rollout", "status", "dpd/stall"])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rollout halted: ProgressDeadlineExceeded"),
        "{stderr}"
    );
    let out = fleet.kubectl_apollo(&["stragglers", "dpd/stall"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("kubectl apollo stragglers dpd/stall\n{table}");
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0][..5],
        ["DEVICE", "DEVICEPROCESS", "WHY", "SINCE", "AGE"],
        "{table}"
    );
    let failed: Vec<&Vec<&str>> = rows
        .iter()
        .filter(|r| r.get(2) == Some(&"Failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{table}");
    assert_eq!(failed[0][0], stalled, "{table}");
    let held_rows = rows
        .iter()
        .filter(|r| r.get(2) == Some(&"HeldByStrategy"))
        .count();
    assert_eq!(held_rows, held, "{table}");
    assert!(
        table.contains("the rollout is halted (ProgressDeadlineExceeded)"),
        "{table}"
    );

    // Toggling pause starts over: with the agent back, the rollout completes.
    fleet
        .agents
        .start(&fleet.stack, &stalled)
        .expect("restart agent");
    fleet.patch(json!({"spec": {"paused": true}})).await;
    fleet.wait_progressing("paused", "Paused").await;
    fleet.patch(json!({"spec": {"paused": false}})).await;
    fleet
        .wait_progressing("the rollout completes after pause/resume", "Complete")
        .await;
}

#[tokio::test]
async fn pause_holds_every_update_and_resume_finishes_the_rollout_through_kubectl() {
    let fleet = Fleet::start("pause", 6, |_| Vec::new()).await;
    fleet
        .patch(json!({"spec": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": 1}}}}))
        .await;
    let out = fleet
        .kubectl_apollo(&["rollout", "pause", "dpd/pause"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "deviceprocessdeployment.azure.com/pause paused\n"
    );
    let again = fleet
        .kubectl_apollo(&["rollout", "pause", "dpd/pause"])
        .await;
    assert!(
        !again.status.success(),
        "pausing twice is refused, as kubectl does"
    );
    fleet.stack.system().reset_requests().await;

    fleet.patch(template_change("v2")).await;
    let paused = fleet
        .wait_progressing("the rollout shows paused", "Paused")
        .await;
    assert_eq!(
        paused.status.as_ref().map(|s| s.number_held_by_strategy),
        Some(6)
    );
    assert!(
        fleet.controller_patches().await.is_empty(),
        "nothing updated while paused"
    );
    assert_eq!(fleet.events("RolloutPaused").await.len(), 1);
    let out = fleet.kubectl_apollo(&["stragglers", "dpd/pause"]).await;
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        table
            .lines()
            .filter(|l| l.contains("HeldByStrategy") && l.contains("paused"))
            .count(),
        6,
        "{table}"
    );

    let out = fleet
        .kubectl_apollo(&["rollout", "resume", "dpd/pause"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = fleet
        .kubectl_apollo(&["rollout", "status", "dpd/pause", "--timeout", "90s"])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("kubectl apollo rollout status dpd/pause\n{stdout}");
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.ends_with("deviceprocessdeployment \"pause\" successfully rolled out\n"),
        "{stdout}"
    );
    let done = fleet.deployment().await;
    assert_eq!(progressing(&done).map(|p| p.0).as_deref(), Some("Complete"));
    let patches = fleet.controller_patches().await;
    assert_eq!(patches.len(), 6, "{patches:?}");
    assert!(patches.values().all(|n| *n == 1), "{patches:?}");
    assert_eq!(fleet.events("RolloutResumed").await.len(), 1);
    let out = fleet.kubectl_apollo(&["stragglers", "dpd/pause"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("No stragglers"));
}

#[tokio::test]
async fn all_at_once_gives_every_device_the_new_spec_in_one_go() {
    let fleet = Fleet::start("bulk", 10, |_| Vec::new()).await;
    // A budget of one would take ten waves; AllAtOnce ignores it.
    fleet
        .patch(json!({"spec": {"updateStrategy": {
            "type": "AllAtOnce",
            "rollingUpdate": {"maxUnavailable": 1}
        }}}))
        .await;
    let observer = Observer::start(&fleet, |_| None).await;
    fleet.stack.system().reset_requests().await;
    // Every status the controller writes for the new generation, in order.
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let watch = tokio::spawn({
        let statuses = statuses.clone();
        let config = watcher::Config::default().fields(&format!("metadata.name={}", fleet.name));
        let mut events = watcher(fleet.deployments.clone(), config).boxed();
        async move {
            while let Some(event) = events.next().await {
                if let Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) = event {
                    statuses.lock().unwrap_or_else(|e| e.into_inner()).push(d);
                }
            }
        }
    });
    let generation = fleet.patch(template_change("v2")).await;
    fleet
        .wait_progressing("the rollout completes", "Complete")
        .await;
    watch.abort();

    let first = statuses
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter_map(|d| d.status.clone())
        .find(|s| s.observed_generation == Some(generation))
        .expect("a status of the new generation");
    assert_eq!(
        (
            first.updated_number_scheduled,
            first.number_held_by_strategy
        ),
        (10, 0),
        "the first status of the new generation already counts every device updated"
    );
    let patches = fleet.controller_patches().await;
    assert_eq!(patches.len(), 10, "{patches:?}");
    assert!(patches.values().all(|n| *n == 1), "{patches:?}");
    let updated = observer.with(|s| s.log.iter().filter(|(k, _)| *k == "updated").count());
    assert_eq!(updated, 10);
}

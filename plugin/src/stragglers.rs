//! `stragglers`: every selected device whose DeviceProcess is not (yet) available on the
//! template, why, and since when. Judged with the controller's own rules (desired set and names,
//! availability, deadlines), from what the apiserver holds now.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use apollo_controller::availability::{readiness, State};
use apollo_controller::plan::{desired_children, Desired};
use apollo_controller::rollout::{deadline_of, is_halt, Policy};
use apollo_controller::status::previous_rollout;
use apollo_crds::conditions;
use apollo_crds::deployment::{PROGRESSING, REASON_PAUSED};
use apollo_crds::{DeviceProcess, DeviceProcessDeployment, NetworkSwitch, LABEL_DEPLOYMENT};
use jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams};
use kube::ResourceExt;

use crate::Error;

/// Why a device is not available on the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    /// Updated, and neither available nor observed within progressDeadlineSeconds.
    Failed,
    /// Its agent is not connected.
    Disconnected,
    /// Connected; the agent has not observed the current spec yet.
    NotObserved,
    /// Available, but not yet for minReadySeconds.
    NotReadyLongEnough,
    /// Still on an older spec: the strategy holds it back (budget, canaries, pause, halt).
    HeldByStrategy,
    /// The controller has not created its DeviceProcess yet.
    NotCreated,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::Failed => "Failed",
            Why::Disconnected => "Disconnected",
            Why::NotObserved => "NotObserved",
            Why::NotReadyLongEnough => "NotReadyLongEnough",
            Why::HeldByStrategy => "HeldByStrategy",
            Why::NotCreated => "NotCreated",
        }
    }
}

/// One device that is not available on the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Straggler {
    /// The device.
    pub device: String,
    /// Its DeviceProcess (existing or to be created).
    pub process: String,
    /// Why.
    pub why: Why,
    /// Since when, if known.
    pub since: Option<Timestamp>,
    /// More words.
    pub detail: String,
}

/// The stragglers of `deployment`, whose desired children are `desired` and whose existing
/// children are `existing` (by name), at `now`; most urgent first.
pub fn stragglers(
    deployment: &DeviceProcessDeployment,
    desired: &Desired,
    existing: &BTreeMap<String, &DeviceProcess>,
    now: Timestamp,
) -> Vec<Straggler> {
    let policy = Policy::of(&deployment.spec, desired.children.len()).ok();
    let min_ready = policy
        .as_ref()
        .map_or(SignedDuration::ZERO, |p| p.min_ready);
    let deadline = policy
        .as_ref()
        .map_or(SignedDuration::from_secs(600), |p| p.progress_deadline);
    let status = deployment.status.as_ref();
    let previous = previous_rollout(status);
    let progressing = status.and_then(|s| conditions::find(&s.conditions, PROGRESSING));
    let (held_since, held_because) = match progressing {
        Some(c) if c.reason == REASON_PAUSED => (
            c.last_transition_time.parse().ok(),
            "the rollout is paused".to_owned(),
        ),
        Some(c) if is_halt(&c.reason) => (
            c.last_transition_time.parse().ok(),
            format!("the rollout is halted ({})", c.reason),
        ),
        _ => (
            previous.rollout_start,
            "waiting for its turn (unavailability budget, canaries first)".to_owned(),
        ),
    };
    let mut out = Vec::new();
    for (name, want) in &desired.children {
        let device = want.spec.device_ref.name.clone();
        let straggler = |why, since, detail: String| Straggler {
            device: device.clone(),
            process: name.clone(),
            why,
            since,
            detail,
        };
        let Some(child) = existing.get(name) else {
            out.push(straggler(
                Why::NotCreated,
                None,
                "no DeviceProcess yet".to_owned(),
            ));
            continue;
        };
        let r = readiness(child, min_ready, now);
        if child.spec != want.spec {
            let itself = match r.state {
                State::Disconnected { .. } => "; disconnected",
                _ => "",
            };
            out.push(straggler(
                Why::HeldByStrategy,
                held_since,
                format!("on an older spec: {held_because}{itself}"),
            ));
            continue;
        }
        let failed_at = deadline_of(r.updated_at, previous.rollout_start, deadline, now);
        let failed = !r.observed && !r.state.is_available() && failed_at <= now;
        let entry = match r.state {
            State::Available => continue,
            _ if failed => straggler(
                Why::Failed,
                Some(failed_at),
                format!(
                    "not available within progressDeadlineSeconds ({}s) of its update{}",
                    deadline.as_secs(),
                    if matches!(r.state, State::Disconnected { .. }) {
                        "; disconnected"
                    } else {
                        "; connected, spec not observed"
                    }
                ),
            ),
            State::Disconnected { since } => straggler(
                Why::Disconnected,
                since,
                "no report from its agent within the stale window".to_owned(),
            ),
            State::NotObserved { since } => straggler(
                Why::NotObserved,
                since,
                format!(
                    "connected; the agent has not reported the current spec (fails at {failed_at})"
                ),
            ),
            State::Settling { ready_at } => straggler(
                Why::NotReadyLongEnough,
                ready_at.checked_sub(min_ready).ok(),
                format!(
                    "available at {ready_at} (minReadySeconds {})",
                    min_ready.as_secs()
                ),
            ),
        };
        out.push(entry);
    }
    out.sort_by(|a, b| (a.why, &a.device).cmp(&(b.why, &b.device)));
    out
}

/// `47s`, `3m12s`, `2h5m`, `3d4h`: an age as kubectl prints one.
pub fn age(elapsed: SignedDuration) -> String {
    let s = elapsed.as_secs().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// The table `stragglers` prints.
pub fn render(name: &str, total: usize, stragglers: &[Straggler], now: Timestamp) -> String {
    if stragglers.is_empty() {
        return format!(
            "No stragglers: all {total} DeviceProcesses of deviceprocessdeployment {name:?} are available on its template.\n"
        );
    }
    let header = ["DEVICE", "DEVICEPROCESS", "WHY", "SINCE", "AGE", "DETAIL"];
    let rows: Vec<[String; 6]> = stragglers
        .iter()
        .map(|s| {
            [
                s.device.clone(),
                s.process.clone(),
                s.why.as_str().to_owned(),
                s.since.map_or("<unknown>".to_owned(), |t| {
                    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
                }),
                s.since
                    .map_or("<unknown>".to_owned(), |t| age(now.duration_since(t))),
                s.detail.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        text.trim_end().to_owned() + "\n"
    };
    let mut out = line(header);
    for row in &rows {
        out.push_str(&line([
            &row[0], &row[1], &row[2], &row[3], &row[4], &row[5],
        ]));
    }
    out.push_str(&format!(
        "{} of {total} devices not available on the template of deviceprocessdeployment {name:?}\n",
        stragglers.len()
    ));
    out
}

/// Read the deployment, its switches and children, and print the stragglers.
pub async fn print(client: kube::Client, namespace: &str, name: &str) -> Result<ExitCode, Error> {
    let deployments: Api<DeviceProcessDeployment> = Api::namespaced(client.clone(), namespace);
    let switches: Api<NetworkSwitch> = Api::namespaced(client.clone(), namespace);
    let processes: Api<DeviceProcess> = Api::namespaced(client, namespace);
    let read = |what: &str| {
        let what = what.to_owned();
        move |source| Error::Read { what, source }
    };
    let deployment = deployments
        .get_opt(name)
        .await
        .map_err(read("the deployment"))?
        .ok_or_else(|| Error::NotFound(name.to_owned()))?;
    let switches = switches
        .list(&ListParams::default())
        .await
        .map_err(read("NetworkSwitches"))?
        .items;
    let children: Vec<std::sync::Arc<DeviceProcess>> = processes
        .list(&ListParams::default().labels(LABEL_DEPLOYMENT))
        .await
        .map_err(read("DeviceProcesses"))?
        .items
        .into_iter()
        .map(std::sync::Arc::new)
        .collect();
    let desired = desired_children(&deployment, &switches, &children)
        .map_err(|e| Error::Target(format!("deviceprocessdeployment {name:?}: {e}")))?;
    let existing: BTreeMap<String, &DeviceProcess> = children
        .iter()
        .filter(|c| desired.children.contains_key(&c.name_any()))
        .map(|c| (c.name_any(), c.as_ref()))
        .collect();
    let now = Timestamp::now();
    let list = stragglers(&deployment, &desired, &existing, now);
    std::io::stdout().write_all(render(name, desired.children.len(), &list, now).as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
#[path = "stragglers_tests.rs"]
mod tests;

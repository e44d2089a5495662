//! The status a deployment reports: DaemonSet-style counts, the rollout's state, and conditions.
//! Pure: computed from the desired set, the children and the rollout step.

use std::collections::BTreeMap;

use apollo_crds::conditions::{self, Condition};
use apollo_crds::deployment::{
    AVAILABLE, PROGRESSING, REASON_COMPLETE, REASON_MINIMUM_DEVICES_AVAILABLE,
    REASON_MINIMUM_DEVICES_UNAVAILABLE, REASON_PAUSED, REASON_ROLLING_UPDATE,
};
use apollo_crds::{DeviceProcess, DeviceProcessDeployment, DeviceProcessDeploymentStatus};

use crate::availability::{agent_connected, spec_observed};
use crate::plan::needs_update;
use crate::rollout::{Previous, Step};

/// Condition type on a deployment: whether its selector can be evaluated.
pub const SELECTOR_VALID: &str = "SelectorValid";
/// Reason for SelectorValid=True.
pub const REASON_SELECTOR_VALID: &str = "SelectorValid";
/// Message for SelectorValid=True.
pub const MESSAGE_SELECTOR_VALID: &str = "selector is valid";
/// Reason for SelectorValid=False.
pub const REASON_INVALID_SELECTOR: &str = "InvalidSelector";
/// Condition type on a deployment, present (True) while the apiserver refuses the DeviceProcesses
/// made from its template (as a ReplicaSet's `ReplicaFailure`); absent otherwise.
pub const PROCESS_FAILURE: &str = "ProcessFailure";
/// Reason for ProcessFailure=True: a child could not be created.
pub const REASON_FAILED_CREATE: &str = "FailedCreate";
/// Reason for ProcessFailure=True: a child could not be brought to the template.
pub const REASON_FAILED_UPDATE: &str = "FailedUpdate";
/// Longest message kept from the apiserver's answer (an Event's note may be 1024 bytes).
pub const MAX_FAILURE_MESSAGE_LEN: usize = 900;

/// DaemonSet-style counts of `deployment`, whose current status is `current_status`.
///
/// `children` are the children that exist for desired devices after this reconcile's writes;
/// `available` says which of them are available. `selector_problem` is the reason nothing could
/// be selected, if any. `now` (RFC 3339) is used only when a condition changes status.
pub fn deployment_status(
    deployment: &DeviceProcessDeployment,
    current_status: Option<&DeviceProcessDeploymentStatus>,
    desired: &BTreeMap<String, DeviceProcess>,
    children: &[&DeviceProcess],
    available: &dyn Fn(&DeviceProcess) -> bool,
    selector_problem: Option<&str>,
    now: &str,
) -> DeviceProcessDeploymentStatus {
    // One pass over the children (a deployment may have one per device of a large fleet): each
    // child's template comparison is made once, and names are borrowed, not copied.
    let mut counts = Counts::default();
    for child in children {
        let Some(want) = child.metadata.name.as_deref().and_then(|n| desired.get(n)) else {
            continue;
        };
        let up_to_date = !needs_update(child, want);
        counts.current += 1;
        counts.updated += i32::from(up_to_date);
        counts.connected += i32::from(agent_connected(child));
        // Observing an outdated spec is not observing the template's.
        counts.observed += i32::from(up_to_date && spec_observed(child));
        counts.available += i32::from(available(child));
    }
    let mut conditions = current_status
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let selector_condition = match selector_problem {
        None => Condition::new(
            SELECTOR_VALID,
            conditions::TRUE,
            REASON_SELECTOR_VALID,
            MESSAGE_SELECTOR_VALID,
            now,
        ),
        Some(problem) => Condition::new(
            SELECTOR_VALID,
            conditions::FALSE,
            REASON_INVALID_SELECTOR,
            problem,
            now,
        ),
    }
    .with_generation(deployment.metadata.generation);
    conditions::upsert(&mut conditions, selector_condition);

    let desired_number = i32::try_from(desired.len()).unwrap_or(i32::MAX);
    DeviceProcessDeploymentStatus {
        observed_generation: deployment.metadata.generation,
        desired_number_scheduled: desired_number,
        current_number_scheduled: counts.current,
        updated_number_scheduled: counts.updated,
        number_agent_connected: counts.connected,
        number_spec_observed: counts.observed,
        number_available: counts.available,
        number_unavailable: desired_number.saturating_sub(counts.available),
        // The rollout's fields carry over until a rollout step sets them.
        number_failed: current_status.map_or(0, |s| s.number_failed),
        number_held_by_strategy: current_status.map_or(0, |s| s.number_held_by_strategy),
        rollout_start_time: current_status.and_then(|s| s.rollout_start_time.clone()),
        conditions,
    }
}

/// The DaemonSet-style counts of the children that exist for desired devices.
#[derive(Default)]
struct Counts {
    current: i32,
    updated: i32,
    connected: i32,
    observed: i32,
    available: i32,
}

/// What the stored status says about the rollout.
pub fn previous_rollout(status: Option<&DeviceProcessDeploymentStatus>) -> Previous {
    let progressing = status.and_then(|s| conditions::find(&s.conditions, PROGRESSING));
    Previous {
        reason: progressing.map(|c| c.reason.clone()),
        message: progressing.map(|c| c.message.clone()),
        generation: progressing.and_then(|c| c.observed_generation),
        rollout_start: status
            .and_then(|s| s.rollout_start_time.as_deref())
            .and_then(|t| t.parse().ok()),
    }
}

/// Record the rollout `step` (taken with a budget of `max_unavailable`) in `status`: the failed
/// and held counts, the start time, and the Progressing and Available conditions.
pub fn apply_rollout(
    status: &mut DeviceProcessDeploymentStatus,
    step: &Step,
    max_unavailable: usize,
    generation: Option<i64>,
    now: &str,
) {
    status.number_failed = i32::try_from(step.failed.len()).unwrap_or(i32::MAX);
    status.number_held_by_strategy = i32::try_from(step.held).unwrap_or(i32::MAX);
    status.rollout_start_time = step.rollout_start.map(|t| t.to_string());
    let progressing = match step.reason {
        REASON_ROLLING_UPDATE | REASON_COMPLETE => conditions::TRUE,
        REASON_PAUSED => conditions::UNKNOWN,
        _ => conditions::FALSE,
    };
    conditions::upsert(
        &mut status.conditions,
        Condition::new(PROGRESSING, progressing, step.reason, &step.message, now)
            .with_generation(generation),
    );
    let within = usize::try_from(status.number_unavailable).unwrap_or(0) <= max_unavailable;
    let (value, reason, relation) = if within {
        (
            conditions::TRUE,
            REASON_MINIMUM_DEVICES_AVAILABLE,
            "at most",
        )
    } else {
        (
            conditions::FALSE,
            REASON_MINIMUM_DEVICES_UNAVAILABLE,
            "more than",
        )
    };
    conditions::upsert(
        &mut status.conditions,
        Condition::new(
            AVAILABLE,
            value,
            reason,
            &format!(
                "{relation} maxUnavailable ({max_unavailable}) DeviceProcesses are unavailable"
            ),
            now,
        )
        .with_generation(generation),
    );
}

/// The apiserver refused a DeviceProcess made from the template as invalid (422): the CRD's schema
/// accepts template labels and annotations the apiserver does not accept on an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessFailure {
    /// [`REASON_FAILED_CREATE`] or [`REASON_FAILED_UPDATE`].
    pub reason: String,
    /// Which child, and the apiserver's words.
    pub message: String,
}

impl ProcessFailure {
    /// A refused write of `child`; `answer` is the apiserver's message (cut to
    /// [`MAX_FAILURE_MESSAGE_LEN`]).
    pub fn new(reason: &str, child: &str, answer: &str) -> Self {
        let mut message = format!("DeviceProcess {child}: {answer}");
        if message.len() > MAX_FAILURE_MESSAGE_LEN {
            let mut end = MAX_FAILURE_MESSAGE_LEN;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        Self {
            reason: reason.to_owned(),
            message,
        }
    }
}

/// The failure recorded in `status` for the deployment's current generation: the template it was
/// found with is still the template, so writing its children again would be refused again.
pub fn recorded_failure(
    deployment: &DeviceProcessDeployment,
    status: Option<&DeviceProcessDeploymentStatus>,
) -> Option<ProcessFailure> {
    let condition = conditions::find(&status?.conditions, PROCESS_FAILURE)?;
    (condition.status == conditions::TRUE
        && condition.observed_generation.is_some()
        && condition.observed_generation == deployment.metadata.generation)
        .then(|| ProcessFailure {
            reason: condition.reason.clone(),
            message: condition.message.clone(),
        })
}

/// Sets `ProcessFailure=True` for `failure` (computed from `generation`), or removes the condition
/// when there is none.
pub fn set_process_failure(
    status: &mut DeviceProcessDeploymentStatus,
    failure: Option<&ProcessFailure>,
    generation: Option<i64>,
    now: &str,
) {
    match failure {
        Some(failure) => {
            conditions::upsert(
                &mut status.conditions,
                Condition::new(
                    PROCESS_FAILURE,
                    conditions::TRUE,
                    &failure.reason,
                    &failure.message,
                    now,
                )
                .with_generation(generation),
            );
        }
        None => status.conditions.retain(|c| c.type_ != PROCESS_FAILURE),
    }
}

/// Whether writing `next` would change the stored status (conditions compared by type).
pub fn status_changed(
    current: Option<&DeviceProcessDeploymentStatus>,
    next: &DeviceProcessDeploymentStatus,
) -> bool {
    let Some(current) = current else {
        return true;
    };
    let without_conditions = |s: &DeviceProcessDeploymentStatus| DeviceProcessDeploymentStatus {
        conditions: Vec::new(),
        ..s.clone()
    };
    without_conditions(current) != without_conditions(next)
        || !conditions::semantically_equal(&current.conditions, &next.conditions)
}

/// Whether `current` and `next` differ only in the counts that follow the agents
/// (`numberAgentConnected`, `numberSpecObserved`, `numberAvailable`, `numberUnavailable`). Those
/// change with every device during a rollout wave, so they are written at a bounded rate;
/// everything else (the rollout's own progress, every condition) is written at once.
pub fn only_agent_counts_changed(
    current: &DeviceProcessDeploymentStatus,
    next: &DeviceProcessDeploymentStatus,
) -> bool {
    let without_agent_counts = |s: &DeviceProcessDeploymentStatus| DeviceProcessDeploymentStatus {
        number_agent_connected: 0,
        number_spec_observed: 0,
        number_available: 0,
        number_unavailable: 0,
        ..s.clone()
    };
    !status_changed(
        Some(&without_agent_counts(current)),
        &without_agent_counts(next),
    )
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;

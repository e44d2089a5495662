//! The rollout step: which children get the template's spec now, and how the rollout stands.
//! Pure: the caller describes every selected device ([`Member`]) and what the stored status says
//! ([`Previous`]); [`step`] decides.
//!
//! Semantics (DaemonSet's rolling update, with groups, canaries and a failure budget):
//! - Unavailable means not available as [`crate::availability`] defines it, whatever the spec: a
//!   disconnected device, a child still settling, a child on the new spec not yet observed, and a
//!   selected device whose child does not exist yet all count.
//! - A child that is available costs budget when it is updated: it is updated only while fewer
//!   than `maxUnavailable` are unavailable in all and fewer than the group's `maxUnavailable` in
//!   its group. A child that is already unavailable costs nothing more, so it is updated as soon as
//!   its turn comes (the rollout never makes an outage worse, and never waits on a dead device).
//! - Canaries first: while any canary is not available on the template's spec, only canaries are
//!   updated.
//! - An updated child that has neither become available nor observed its spec within
//!   `progressDeadlineSeconds` (counted from its update, or from the start or resumption of the
//!   rollout if later) has failed. More failures than `maxFailed` halt the rollout: nothing more
//!   is updated until the spec changes (a new template, or `paused` toggled: both change
//!   `metadata.generation`).
//! - `paused` holds every update. `AllAtOnce` updates every outdated child at once.
//! - Creates and deletes are not the rollout's business: a new device gets its child at once.

use std::collections::BTreeMap;

use apollo_crds::deployment::{
    REASON_COMPLETE, REASON_FAILURE_BUDGET_EXCEEDED, REASON_PAUSED,
    REASON_PROGRESS_DEADLINE_EXCEEDED, REASON_ROLLING_UPDATE,
};
use apollo_crds::{DeviceProcessDeploymentSpec, UpdateStrategyType};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::selector::{Selector, SelectorError};

/// The strategy of one deployment, resolved against its number of selected devices.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `AllAtOnce`: every outdated child is updated at once.
    pub all_at_once: bool,
    /// `spec.paused`.
    pub paused: bool,
    /// The most children unavailable at once (at least 1).
    pub max_unavailable: usize,
    /// NetworkSwitch label naming a group, and the most unavailable per group.
    pub group: Option<(String, usize)>,
    /// Canary devices, when any are configured.
    pub canary: Option<Selector>,
    /// Failures tolerated before the rollout halts.
    pub max_failed: usize,
    /// `progressDeadlineSeconds`.
    pub progress_deadline: SignedDuration,
    /// `minReadySeconds`.
    pub min_ready: SignedDuration,
}

/// `maxUnavailable` of `desired` devices: a count, or a percentage rounded up (as a DaemonSet's);
/// at least 1. A value the apiserver would refuse today (stored before the CRD validated it)
/// counts as 1, the most careful budget that still makes progress.
pub fn resolve_max_unavailable(value: &IntOrString, desired: usize) -> usize {
    let resolved = match value {
        IntOrString::Int(n) => usize::try_from(*n).unwrap_or(0),
        IntOrString::String(s) => s
            .strip_suffix('%')
            .and_then(|p| p.parse::<usize>().ok())
            .map_or(0, |p| (p.min(100) * desired).div_ceil(100)),
    };
    resolved.max(1)
}

impl Policy {
    /// The policy of `spec` for `desired` selected devices. An invalid canary selector is an
    /// error: the caller holds every update and says why.
    pub fn of(spec: &DeviceProcessDeploymentSpec, desired: usize) -> Result<Self, SelectorError> {
        let rolling = &spec.update_strategy.rolling_update;
        let canary = rolling
            .canary
            .as_ref()
            .map(|c| Selector::allowing_empty(&c.selector))
            .transpose()?;
        let seconds = |s: i32| SignedDuration::from_secs(i64::from(s.max(0)));
        Ok(Self {
            all_at_once: spec.update_strategy.type_ == UpdateStrategyType::AllAtOnce,
            paused: spec.paused,
            max_unavailable: resolve_max_unavailable(&rolling.max_unavailable, desired),
            group: rolling.max_unavailable_per_group.as_ref().map(|g| {
                (
                    g.topology_key.clone(),
                    usize::try_from(g.max_unavailable).unwrap_or(0).max(1),
                )
            }),
            canary,
            max_failed: usize::try_from(rolling.max_failed).unwrap_or(0),
            progress_deadline: seconds(spec.progress_deadline_seconds),
            min_ready: seconds(spec.min_ready_seconds),
        })
    }

    /// Whether a device with `labels` is a canary.
    pub fn is_canary(&self, labels: &BTreeMap<String, String>) -> bool {
        self.canary.as_ref().is_some_and(|c| c.matches(labels))
    }

    /// The group of a device with `labels`, if groups are configured and it has the label.
    pub fn group_of(&self, labels: &BTreeMap<String, String>) -> Option<String> {
        self.group
            .as_ref()
            .and_then(|(key, _)| labels.get(key).cloned())
    }
}

/// Where one selected device's child stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    /// No child yet: it is being created with the template.
    Missing,
    /// The child has an older spec.
    Outdated {
        /// Whether it is available.
        available: bool,
    },
    /// The child has the template's spec.
    Current {
        /// Whether it is available.
        available: bool,
        /// Whether its agent observed the spec (at the current generation).
        observed: bool,
        /// When the controller last wrote its spec, if known.
        updated_at: Option<Timestamp>,
    },
}

impl MemberState {
    fn available(self) -> bool {
        matches!(
            self,
            MemberState::Outdated { available: true }
                | MemberState::Current {
                    available: true,
                    ..
                }
        )
    }
}

/// One selected device.
#[derive(Debug, Clone)]
pub struct Member {
    /// Name of its child.
    pub name: String,
    /// Whether it is a canary.
    pub canary: bool,
    /// Its group, if any.
    pub group: Option<String>,
    /// Where its child stands.
    pub state: MemberState,
}

/// What the stored status says about the rollout.
#[derive(Debug, Clone, Default)]
pub struct Previous {
    /// Reason of the Progressing condition.
    pub reason: Option<String>,
    /// Its message.
    pub message: Option<String>,
    /// Generation it was computed for.
    pub generation: Option<i64>,
    /// `status.rolloutStartTime`.
    pub rollout_start: Option<Timestamp>,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Children to give the template's spec now.
    pub update: Vec<String>,
    /// Outdated children held back.
    pub held: usize,
    /// Updated children past their deadline.
    pub failed: Vec<String>,
    /// Reason of the Progressing condition.
    pub reason: &'static str,
    /// Its message (stable for a given state).
    pub message: String,
    /// Start (or resumption) of the rollout: deadlines count from here at the earliest.
    pub rollout_start: Option<Timestamp>,
    /// The next moment a deadline passes (the step must be taken again then).
    pub next_deadline: Option<Timestamp>,
}

/// When an updated child that is neither available nor observed fails: `progress_deadline` after
/// its update, or after the start (or resumption) of the rollout if that is later; `now` when
/// neither is known.
pub fn deadline_of(
    updated_at: Option<Timestamp>,
    rollout_start: Option<Timestamp>,
    progress_deadline: SignedDuration,
    now: Timestamp,
) -> Timestamp {
    let from = updated_at.max(rollout_start).unwrap_or(now);
    from.checked_add(progress_deadline).unwrap_or(from)
}

/// Whether `reason` halts the rollout.
pub fn is_halt(reason: &str) -> bool {
    reason == REASON_PROGRESS_DEADLINE_EXCEEDED || reason == REASON_FAILURE_BUDGET_EXCEEDED
}

/// Take the rollout step for `generation` at `now`.
pub fn step(
    policy: &Policy,
    members: &[Member],
    previous: &Previous,
    generation: Option<i64>,
    now: Timestamp,
) -> Step {
    let same_generation = previous.generation.is_some() && previous.generation == generation;
    let halted_before = same_generation && previous.reason.as_deref().is_some_and(is_halt);
    // The clock keeps running while the rollout goes on or stays halted; it restarts when the
    // rollout (re)starts: a new template after completion, a resume, a halt lifted.
    let continuing = previous.reason.as_deref() == Some(REASON_ROLLING_UPDATE) || halted_before;
    let rollout_start = if continuing {
        previous.rollout_start.or(Some(now))
    } else {
        Some(now)
    };

    // Failures: updated, neither available nor observed, past the deadline.
    let mut failed = Vec::new();
    let mut next_deadline: Option<Timestamp> = None;
    for m in members {
        if let MemberState::Current {
            available: false,
            observed: false,
            updated_at,
        } = m.state
        {
            let deadline = deadline_of(updated_at, rollout_start, policy.progress_deadline, now);
            if deadline <= now {
                failed.push(m.name.clone());
            } else {
                next_deadline = Some(next_deadline.map_or(deadline, |d| d.min(deadline)));
            }
        }
    }
    failed.sort();

    let all_current = members
        .iter()
        .all(|m| matches!(m.state, MemberState::Current { .. }));
    let all_available = members.iter().all(|m| m.state.available());
    let was_complete = same_generation && previous.reason.as_deref() == Some(REASON_COMPLETE);
    let complete = all_current && (all_available || was_complete);
    let halted = halted_before || failed.len() > policy.max_failed;

    let (reason, message) = if policy.paused {
        (
            REASON_PAUSED,
            "spec.paused is true: no DeviceProcess gets a new spec".to_owned(),
        )
    } else if complete {
        (
            REASON_COMPLETE,
            format!(
                "every DeviceProcess has the template of generation {} and has been available",
                generation.unwrap_or_default()
            ),
        )
    } else if halted {
        match (halted_before, previous.reason.as_deref()) {
            (true, Some(reason)) if is_halt(reason) => (
                if reason == REASON_PROGRESS_DEADLINE_EXCEEDED {
                    REASON_PROGRESS_DEADLINE_EXCEEDED
                } else {
                    REASON_FAILURE_BUDGET_EXCEEDED
                },
                previous.message.clone().unwrap_or_default(),
            ),
            _ => halt(policy, &failed),
        }
    } else {
        (REASON_ROLLING_UPDATE, rolling_message(policy, generation))
    };

    let outdated: Vec<&Member> = members
        .iter()
        .filter(|m| matches!(m.state, MemberState::Outdated { .. }))
        .collect();
    let update = if policy.paused || (halted && !complete) {
        Vec::new()
    } else if policy.all_at_once {
        outdated.iter().map(|m| m.name.clone()).collect()
    } else {
        within_budgets(policy, members, &outdated)
    };
    Step {
        held: outdated.len() - update.len(),
        update,
        failed,
        reason,
        message,
        rollout_start: if reason == REASON_ROLLING_UPDATE {
            rollout_start
        } else {
            previous.rollout_start.or(rollout_start)
        },
        next_deadline: (reason == REASON_ROLLING_UPDATE)
            .then_some(next_deadline)
            .flatten(),
    }
}

fn halt(policy: &Policy, failed: &[String]) -> (&'static str, String) {
    let deadline = policy.progress_deadline.as_secs();
    if policy.max_failed == 0 {
        (
            REASON_PROGRESS_DEADLINE_EXCEEDED,
            format!(
                "DeviceProcess {} did not become available within progressDeadlineSeconds ({deadline}s); the rollout is halted until the spec changes",
                failed.first().map_or("?", String::as_str)
            ),
        )
    } else {
        (
            REASON_FAILURE_BUDGET_EXCEEDED,
            format!(
                "{} updated DeviceProcesses did not become available within progressDeadlineSeconds ({deadline}s), more than maxFailed ({}); the rollout is halted until the spec changes",
                failed.len(),
                policy.max_failed
            ),
        )
    }
}

fn rolling_message(policy: &Policy, generation: Option<i64>) -> String {
    let generation = generation.unwrap_or_default();
    if policy.all_at_once {
        return format!("generation {generation}: every DeviceProcess at once");
    }
    let mut message = format!(
        "generation {generation}: at most {} unavailable",
        policy.max_unavailable
    );
    if let Some((key, max)) = &policy.group {
        message.push_str(&format!(", {max} per {key}"));
    }
    if policy.canary.is_some() {
        message.push_str(", canaries first");
    }
    message
}

/// The outdated children the budgets allow now: the unavailable ones (they cost nothing), then
/// available ones by name while the deployment and their group have budget left; only canaries
/// while a canary is not yet available on the template.
fn within_budgets(policy: &Policy, members: &[Member], outdated: &[&Member]) -> Vec<String> {
    let mut unavailable = members.iter().filter(|m| !m.state.available()).count();
    let mut per_group: BTreeMap<&str, usize> = BTreeMap::new();
    for m in members.iter().filter(|m| !m.state.available()) {
        if let Some(g) = m.group.as_deref() {
            *per_group.entry(g).or_default() += 1;
        }
    }
    let canaries_pending = members.iter().any(|m| {
        m.canary
            && !matches!(
                m.state,
                MemberState::Current {
                    available: true,
                    ..
                }
            )
    });
    let mut candidates: Vec<&Member> = outdated
        .iter()
        .copied()
        .filter(|m| !canaries_pending || m.canary)
        .collect();
    // Unavailable first (free), then by name: a stable order every replica agrees on.
    candidates.sort_by_key(|m| (m.state.available(), m.name.as_str()));

    let group_max = policy.group.as_ref().map_or(usize::MAX, |(_, max)| *max);
    let mut update = Vec::new();
    for m in candidates {
        if !m.state.available() {
            update.push(m.name.clone());
            continue;
        }
        let group_used = m
            .group
            .as_deref()
            .map_or(0, |g| per_group.get(g).copied().unwrap_or(0));
        if unavailable < policy.max_unavailable && group_used < group_max {
            unavailable += 1;
            if let Some(g) = m.group.as_deref() {
                *per_group.entry(g).or_default() += 1;
            }
            update.push(m.name.clone());
        }
    }
    update
}

/// A rollout Event on the deployment: one per change of the Progressing reason, never per device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutEvent {
    /// Warning (a halt) or Normal.
    pub warning: bool,
    /// Event reason.
    pub reason: &'static str,
    /// Event action.
    pub action: &'static str,
}

/// The Event for a change of the Progressing reason from `previous` to `next`, if any.
pub fn transition_event(previous: Option<&str>, next: &str) -> Option<RolloutEvent> {
    if previous == Some(next) {
        return None;
    }
    let event = |warning, reason, action| {
        Some(RolloutEvent {
            warning,
            reason,
            action,
        })
    };
    match next {
        REASON_PAUSED => event(false, "RolloutPaused", "Pause"),
        REASON_COMPLETE => event(false, "RolloutComplete", "Complete"),
        r if is_halt(r) => event(true, "RolloutHalted", "Halt"),
        REASON_ROLLING_UPDATE if previous == Some(REASON_PAUSED) => {
            event(false, "RolloutResumed", "Resume")
        }
        REASON_ROLLING_UPDATE => event(false, "RolloutStarted", "Start"),
        _ => None,
    }
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;

//! Whether one DeviceProcess is available, from what the gateway wrote to its status. Pure.
//!
//! A DeviceProcess is **available** when `AgentConnected=True` and `SpecObserved=True` for its
//! current generation (the condition's `observedGeneration` is `metadata.generation` and
//! `status.observedSpecHash` is the hash of the current spec), and has been so for
//! `minReadySeconds`.
//!
//! "Has been so since" is the latest of: the `lastTransitionTime` of either condition, and the
//! controller's last write of the spec. The last is needed because the gateway debounces spec
//! changes: when the agent observes the new spec promptly, SpecObserved goes from True (old
//! generation) to True (new generation) in one write and its `lastTransitionTime` does not move.
//! The controller's last spec write is read from the object itself (`metadata.managedFields`,
//! the entry of [`SPEC_FIELD_MANAGER`]: the apiserver moves its `time` whenever that manager's
//! write changes a field), so it survives restarts and needs no memory of its own. Every other
//! write of the controller (labels, adoption) uses another field manager, so a label change does
//! not restart the clock. The apiserver records whole seconds, so the estimate may be early by
//! the agent's observation latency (about a second), never by more.

use apollo_crds::conditions::{self, Condition};
use apollo_crds::{spec_hash, DeviceProcess, DeviceProcessSpec};
use jiff::{SignedDuration, Timestamp};

/// Field manager of the controller's creates and spec updates (and only those).
pub const SPEC_FIELD_MANAGER: &str = "apollo-controller";
/// Field manager of the controller's writes that change no spec (labels, annotations, adoption).
pub const METADATA_FIELD_MANAGER: &str = "apollo-controller-metadata";

/// Where one DeviceProcess stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connected and its current spec observed for at least minReadySeconds.
    Available,
    /// Connected and observed, but not yet for minReadySeconds: available at `ready_at`.
    Settling {
        /// When it becomes available if nothing changes.
        ready_at: Timestamp,
    },
    /// `AgentConnected` is not True (False, Unknown or absent).
    Disconnected {
        /// `lastTransitionTime` of the condition, when there is one.
        since: Option<Timestamp>,
    },
    /// Connected, but the agent has not observed the current spec.
    NotObserved {
        /// When the controller last wrote the spec, if known.
        since: Option<Timestamp>,
    },
}

impl State {
    /// Whether this counts as available.
    pub fn is_available(self) -> bool {
        self == State::Available
    }
}

/// A DeviceProcess's availability and the facts it was judged from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// Where it stands.
    pub state: State,
    /// Whether the agent observed the current spec (at the current generation), connected or not.
    pub observed: bool,
    /// When the controller last wrote its spec (created it or gave it a new spec), if known.
    pub updated_at: Option<Timestamp>,
}

/// Whether the agent of `child` has observed the spec it currently has: SpecObserved=True and the
/// observed hash (when reported) equal to the current spec's hash, so a condition left over from
/// the previous template does not count.
pub fn spec_observed(child: &DeviceProcess) -> bool {
    let Some(status) = &child.status else {
        return false;
    };
    conditions::is_true(&status.conditions, conditions::SPEC_OBSERVED)
        && status
            .observed_spec_hash
            .as_deref()
            .is_none_or(|h| h == spec_hash::<DeviceProcessSpec>(&child.spec))
}

/// Whether the agent of `child` is connected.
pub fn agent_connected(child: &DeviceProcess) -> bool {
    child
        .status
        .as_ref()
        .is_some_and(|s| conditions::is_true(&s.conditions, conditions::AGENT_CONNECTED))
}

/// [`spec_observed`], and the gateway judged it at the child's current generation.
pub fn observed_at_current_generation(child: &DeviceProcess) -> bool {
    let Some(status) = &child.status else {
        return false;
    };
    let generation = child.metadata.generation;
    let condition_generation = conditions::find(&status.conditions, conditions::SPEC_OBSERVED)
        .and_then(|c| c.observed_generation)
        .or(status.observed_generation);
    spec_observed(child) && generation.is_some() && condition_generation == generation
}

/// When [`SPEC_FIELD_MANAGER`] last changed the child (its create or last spec update).
pub fn last_spec_write(child: &DeviceProcess) -> Option<Timestamp> {
    child
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.manager.as_deref() == Some(SPEC_FIELD_MANAGER)
                && m.subresource.as_deref().is_none_or(str::is_empty)
        })
        .filter_map(|m| m.time.as_ref().map(|t| t.0))
        .max()
}

fn transition_time(condition: Option<&Condition>) -> Option<Timestamp> {
    condition.and_then(|c| c.last_transition_time.parse().ok())
}

/// How `child` stands at `now`, given `min_ready`.
pub fn readiness(child: &DeviceProcess, min_ready: SignedDuration, now: Timestamp) -> Readiness {
    let updated_at = last_spec_write(child);
    let observed = observed_at_current_generation(child);
    let conds: &[Condition] = child
        .status
        .as_ref()
        .map_or(&[], |s| s.conditions.as_slice());
    let connected = conditions::find(conds, conditions::AGENT_CONNECTED);
    let spec = conditions::find(conds, conditions::SPEC_OBSERVED);
    let state = if !agent_connected(child) {
        State::Disconnected {
            since: transition_time(connected),
        }
    } else if !observed {
        State::NotObserved { since: updated_at }
    } else {
        let since = [
            transition_time(connected),
            transition_time(spec),
            updated_at,
        ]
        .into_iter()
        .flatten()
        .max();
        match since.and_then(|s| s.checked_add(min_ready).ok()) {
            Some(ready_at) if ready_at > now => State::Settling { ready_at },
            _ => State::Available,
        }
    };
    Readiness {
        state,
        observed,
        updated_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::workload;
    use apollo_crds::{DeviceProcessStatus, DeviceRef};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};

    const T0: &str = "2026-01-01T00:00:00Z";

    fn at(seconds: i64) -> Timestamp {
        T0.parse::<Timestamp>().expect("T0") + SignedDuration::from_secs(seconds)
    }

    fn condition(type_: &str, status: &str, since: i64, generation: i64) -> Condition {
        Condition::new(type_, status, "R", "m", &at(since).to_string())
            .with_generation(Some(generation))
    }

    /// A child at `generation` written by the controller at `written`, whose status was projected
    /// at `status_generation` with the conditions given (connected since, observed since).
    fn child(
        generation: i64,
        written: i64,
        connected: Option<(&str, i64)>,
        observed: Option<(i64, i64)>,
    ) -> DeviceProcess {
        let w = workload("u", &[], &["v"]);
        let spec = DeviceProcessSpec {
            device_ref: DeviceRef { name: "d".into() },
            artifact: w.artifact,
            execution: w.execution,
        };
        let mut c = DeviceProcess::new("c", spec);
        c.metadata.generation = Some(generation);
        c.metadata.managed_fields = Some(vec![
            ManagedFieldsEntry {
                manager: Some(SPEC_FIELD_MANAGER.into()),
                operation: Some("Update".into()),
                time: Some(Time(at(written))),
                ..Default::default()
            },
            // The gateway's status writes do not count as spec writes.
            ManagedFieldsEntry {
                manager: Some(SPEC_FIELD_MANAGER.into()),
                subresource: Some("status".into()),
                time: Some(Time(at(written + 1000))),
                ..Default::default()
            },
        ]);
        let mut conds = vec![];
        if let Some((status, since)) = connected {
            conds.push(condition(
                conditions::AGENT_CONNECTED,
                status,
                since,
                generation,
            ));
        }
        let mut hash = None;
        if let Some((since, status_generation)) = observed {
            conds.push(condition(
                conditions::SPEC_OBSERVED,
                conditions::TRUE,
                since,
                status_generation,
            ));
            hash = Some(spec_hash(&c.spec));
        }
        c.status = Some(DeviceProcessStatus {
            observed_spec_hash: hash,
            conditions: conds,
            ..Default::default()
        });
        c
    }

    #[test]
    fn connected_and_observed_at_the_current_generation_is_available() {
        let c = child(2, 10, Some((conditions::TRUE, 0)), Some((0, 2)));
        let r = readiness(&c, SignedDuration::ZERO, at(11));
        assert_eq!(r.state, State::Available);
        assert!(r.observed);
        assert_eq!(r.updated_at, Some(at(10)));
    }

    #[test]
    fn an_observation_of_an_older_generation_does_not_count() {
        // Just updated to generation 3: the status still speaks of generation 2.
        let c = child(3, 10, Some((conditions::TRUE, 0)), Some((0, 2)));
        let r = readiness(&c, SignedDuration::ZERO, at(11));
        assert_eq!(
            r.state,
            State::NotObserved {
                since: Some(at(10))
            }
        );
        assert!(!r.observed);
        // The hash of an older spec does not count either.
        let mut stale = child(2, 10, Some((conditions::TRUE, 0)), Some((0, 2)));
        stale.spec.execution.args = vec!["new".into()];
        assert!(!readiness(&stale, SignedDuration::ZERO, at(11)).observed);
    }

    #[test]
    fn a_disconnected_device_is_unavailable_even_if_it_observed() {
        let c = child(2, 10, Some((conditions::FALSE, 20)), Some((0, 2)));
        let r = readiness(&c, SignedDuration::ZERO, at(30));
        assert_eq!(
            r.state,
            State::Disconnected {
                since: Some(at(20))
            }
        );
        assert!(r.observed);
        let never = child(2, 10, None, None);
        assert_eq!(
            readiness(&never, SignedDuration::ZERO, at(30)).state,
            State::Disconnected { since: None }
        );
    }

    #[test]
    fn min_ready_counts_from_the_latest_of_both_conditions_and_the_spec_write() {
        let min_ready = SignedDuration::from_secs(5);
        // SpecObserved stayed True across the update (debounced): the write at 10 decides.
        let c = child(2, 10, Some((conditions::TRUE, 0)), Some((0, 2)));
        assert_eq!(
            readiness(&c, min_ready, at(12)).state,
            State::Settling { ready_at: at(15) }
        );
        assert_eq!(readiness(&c, min_ready, at(15)).state, State::Available);
        // A reconnect at 30 restarts the clock.
        let c = child(2, 10, Some((conditions::TRUE, 30)), Some((0, 2)));
        assert_eq!(
            readiness(&c, min_ready, at(31)).state,
            State::Settling { ready_at: at(35) }
        );
    }
}

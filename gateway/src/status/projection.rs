//! Status projection: what `DeviceProcess.status` must say, given the object and the shared
//! state; and which Events a transition produces. Pure functions, no I/O.

use apollo_crds::conditions::{
    self, Condition, AGENT_CONNECTED, FALSE, MESSAGE_AGENT_CONNECTED, MESSAGE_AGENT_DISCONNECTED,
    MESSAGE_AGENT_NEVER_SEEN, MESSAGE_SPEC_CHANGED, MESSAGE_SPEC_OBSERVED, REASON_AGENT_CONNECTED,
    REASON_AGENT_DISCONNECTED, REASON_AGENT_NEVER_SEEN, REASON_SPEC_CHANGED, REASON_SPEC_OBSERVED,
    SPEC_OBSERVED, TRUE, UNKNOWN,
};
use apollo_crds::{DeviceProcessStatus, PHASE_PENDING};

use crate::model::{CachedProcess, ObjectKey};
use crate::state::{Connection, Pending, PendingKind};

/// The status `process` must have. `observed` is the hash the store holds for it (None when the
/// store has none, e.g. after losing its state; the status' own observedSpecHash is kept then).
/// With an Unknown connection an existing AgentConnected condition is kept as it is, so a store
/// that lost its state never flips a device by itself. `now` is the RFC 3339 time used for
/// conditions whose status flips.
pub fn project(
    process: &CachedProcess,
    connection: Connection,
    observed: Option<&str>,
    now: &str,
) -> DeviceProcessStatus {
    let mut status = process.status.clone().unwrap_or_default();
    let generation = Some(process.generation);
    status.phase = Some(PHASE_PENDING.to_owned());
    if let Some(observed) = observed {
        status.observed_spec_hash = Some(observed.to_owned());
    }
    status.observed_generation = generation;

    let connected = match connection {
        Connection::Connected => Some((TRUE, REASON_AGENT_CONNECTED, MESSAGE_AGENT_CONNECTED)),
        Connection::Disconnected => {
            Some((FALSE, REASON_AGENT_DISCONNECTED, MESSAGE_AGENT_DISCONNECTED))
        }
        Connection::Unknown => match conditions::find(&status.conditions, AGENT_CONNECTED) {
            Some(_) => None,
            None => Some((UNKNOWN, REASON_AGENT_NEVER_SEEN, MESSAGE_AGENT_NEVER_SEEN)),
        },
    };
    if let Some((value, reason, message)) = connected {
        conditions::upsert(
            &mut status.conditions,
            Condition::new(AGENT_CONNECTED, value, reason, message, now)
                .with_generation(generation),
        );
    }

    let spec_observed = status.observed_spec_hash.as_deref() == Some(process.spec_hash.as_str());
    let (value, reason, message) = if spec_observed {
        (TRUE, REASON_SPEC_OBSERVED, MESSAGE_SPEC_OBSERVED)
    } else {
        (FALSE, REASON_SPEC_CHANGED, MESSAGE_SPEC_CHANGED)
    };
    conditions::upsert(
        &mut status.conditions,
        Condition::new(SPEC_OBSERVED, value, reason, message, now).with_generation(generation),
    );
    status
}

/// Whether `current` differs from `desired` in anything the gateway owns (conditions compared by
/// type, order ignored).
pub fn needs_write(current: Option<&DeviceProcessStatus>, desired: &DeviceProcessStatus) -> bool {
    let Some(current) = current else {
        return true;
    };
    current.phase != desired.phase
        || current.observed_spec_hash != desired.observed_spec_hash
        || current.observed_generation != desired.observed_generation
        || !conditions::semantically_equal(&current.conditions, &desired.conditions)
}

/// A transition decided by the state store that may produce an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// A report connected the device; `prior` is what the store held before.
    Connected {
        /// Disconnected, or Unknown when the store had no record.
        prior: Connection,
        /// Whether the status said AgentConnected=True before the report was recorded.
        shown_connected: bool,
    },
    /// The sweep found the device stale.
    Disconnected,
    /// The agent reported a new observed hash.
    SpecObserved {
        /// The new hash.
        hash: String,
        /// Whether the store held an earlier hash.
        prior_known: bool,
        /// status.observedSpecHash before the report was recorded.
        shown_hash: Option<String>,
    },
}

/// The transition a pending record means for each of `keys` (the DeviceProcesses it concerns):
/// `Connected` and `Disconnected` for every DeviceProcess of the device, `SpecObserved` for the
/// one observed, with what the statuses showed when the store decided it (kept in the record,
/// so a replay decides Events on the same evidence as the replica that decided it).
pub fn transitions_of(pending: &Pending, keys: &[ObjectKey]) -> Vec<(ObjectKey, Transition)> {
    keys.iter()
        .map(|key| {
            let transition = match &pending.kind {
                PendingKind::Connected { prior, shown } => Transition::Connected {
                    prior: *prior,
                    shown_connected: *shown,
                },
                PendingKind::Disconnected => Transition::Disconnected,
                PendingKind::Observed {
                    hash,
                    prior_known,
                    shown,
                    ..
                } => Transition::SpecObserved {
                    hash: hash.clone(),
                    prior_known: *prior_known,
                    shown_hash: shown.then(|| hash.clone()),
                },
            };
            (key.clone(), transition)
        })
        .collect()
}

/// What a DeviceProcess's status showed before a report was recorded. Taken before the store
/// call, so no write caused by the report itself can be mistaken for an earlier state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shown {
    /// AgentConnected=True.
    pub connected: bool,
    /// status.observedSpecHash.
    pub observed_hash: Option<String>,
}

impl Shown {
    /// What `status` shows.
    pub fn of(status: Option<&DeviceProcessStatus>) -> Self {
        Self {
            connected: status.is_some_and(|s| conditions::is_true(&s.conditions, AGENT_CONNECTED)),
            observed_hash: status.and_then(|s| s.observed_spec_hash.clone()),
        }
    }
}

impl Transition {
    /// Label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Transition::Connected { .. } => "connected",
            Transition::Disconnected => "disconnected",
            Transition::SpecObserved { .. } => "spec_observed",
        }
    }
}

/// Severity of an Event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Normal.
    Normal,
    /// Warning.
    Warning,
}

impl EventType {
    /// The API value.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// An Event to publish about a DeviceProcess.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSpec {
    /// Normal or Warning.
    pub type_: EventType,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What the gateway did (events.k8s.io `action`).
    pub action: &'static str,
    /// Human-readable note.
    pub note: String,
}

/// The Event a transition produces, if any. Transitions decided against a store that had no
/// record (it lost its state) produce an Event only when the status did not already show them,
/// so a Redis restart alone emits nothing; every other transition produces its Event.
pub fn event_for(transition: &Transition, device: &str) -> Option<EventSpec> {
    match transition {
        Transition::Connected {
            prior,
            shown_connected,
        } => (*prior == Connection::Disconnected || !shown_connected).then(|| EventSpec {
            type_: EventType::Normal,
            reason: REASON_AGENT_CONNECTED,
            action: "Report",
            note: format!("the agent of device {device} connected"),
        }),
        Transition::Disconnected => Some(EventSpec {
            type_: EventType::Warning,
            reason: REASON_AGENT_DISCONNECTED,
            action: "StaleSweep",
            note: format!("no report from device {device} within the stale window"),
        }),
        Transition::SpecObserved {
            hash,
            prior_known,
            shown_hash,
        } => (*prior_known || shown_hash.as_ref() != Some(hash)).then(|| EventSpec {
            type_: EventType::Normal,
            reason: REASON_SPEC_OBSERVED,
            action: "Report",
            note: format!("the agent of device {device} observed spec {hash}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectKey;
    use apollo_crds::conditions::find;

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-01T00:01:00Z";

    fn process(
        generation: i64,
        spec_hash: &str,
        status: Option<DeviceProcessStatus>,
    ) -> CachedProcess {
        CachedProcess {
            key: ObjectKey::new("ns", "p"),
            uid: "u".into(),
            device: "d".into(),
            generation,
            resource_version: Some("1".into()),
            spec: serde_json::json!({}),
            spec_hash: spec_hash.into(),
            status,
        }
    }

    fn cond<'a>(s: &'a DeviceProcessStatus, t: &str) -> &'a Condition {
        find(&s.conditions, t).expect("condition present")
    }

    #[test]
    fn report_projects_pending_connected_observed() {
        let p = process(3, "sha256:a", None);
        let s = project(&p, Connection::Connected, Some("sha256:a"), T0);
        assert_eq!(s.phase.as_deref(), Some(PHASE_PENDING));
        assert_eq!(s.observed_spec_hash.as_deref(), Some("sha256:a"));
        assert_eq!(s.observed_generation, Some(3));
        let c = cond(&s, AGENT_CONNECTED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            (TRUE, REASON_AGENT_CONNECTED)
        );
        assert_eq!(c.message, MESSAGE_AGENT_CONNECTED);
        let o = cond(&s, SPEC_OBSERVED);
        assert_eq!(
            (o.status.as_str(), o.reason.as_str()),
            (TRUE, REASON_SPEC_OBSERVED)
        );
        assert!(needs_write(None, &s));
    }

    #[test]
    fn reprojecting_the_same_state_later_is_not_a_write() {
        let p = process(1, "sha256:a", None);
        let s = project(&p, Connection::Connected, Some("sha256:a"), T0);
        let again = project(
            &process(1, "sha256:a", Some(s.clone())),
            Connection::Connected,
            Some("sha256:a"),
            T1,
        );
        assert!(!needs_write(Some(&s), &again));
        assert_eq!(cond(&again, AGENT_CONNECTED).last_transition_time, T0);
    }

    #[test]
    fn condition_order_does_not_matter() {
        let p = process(1, "sha256:a", None);
        let s = project(&p, Connection::Connected, Some("sha256:a"), T0);
        let mut reversed = s.clone();
        reversed.conditions.reverse();
        let again = project(
            &process(1, "sha256:a", Some(reversed.clone())),
            Connection::Connected,
            Some("sha256:a"),
            T1,
        );
        assert!(!needs_write(Some(&reversed), &again));
    }

    #[test]
    fn disconnect_flips_with_a_stable_message_and_new_transition_time() {
        let p = process(1, "sha256:a", None);
        let connected = project(&p, Connection::Connected, Some("sha256:a"), T0);
        let p = process(1, "sha256:a", Some(connected.clone()));
        let gone = project(&p, Connection::Disconnected, None, T1);
        assert!(needs_write(Some(&connected), &gone));
        let c = cond(&gone, AGENT_CONNECTED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            (FALSE, REASON_AGENT_DISCONNECTED)
        );
        assert_eq!(c.message, MESSAGE_AGENT_DISCONNECTED);
        assert_eq!(c.last_transition_time, T1);
        // Observation kept from the status when the store has none; SpecObserved untouched.
        assert_eq!(gone.observed_spec_hash.as_deref(), Some("sha256:a"));
        assert_eq!(cond(&gone, SPEC_OBSERVED).last_transition_time, T0);
        // Staying stale is not a change.
        let p = process(1, "sha256:a", Some(gone.clone()));
        assert!(!needs_write(
            Some(&gone),
            &project(&p, Connection::Disconnected, None, "2026-01-01T09:00:00Z")
        ));
    }

    #[test]
    fn spec_change_is_spec_observed_false_until_observed() {
        let p = process(1, "sha256:a", None);
        let s = project(&p, Connection::Connected, Some("sha256:a"), T0);
        let p = process(2, "sha256:b", Some(s.clone()));
        let changed = project(&p, Connection::Connected, Some("sha256:a"), T1);
        let o = cond(&changed, SPEC_OBSERVED);
        assert_eq!(
            (o.status.as_str(), o.reason.as_str()),
            (FALSE, REASON_SPEC_CHANGED)
        );
        assert_eq!(o.message, MESSAGE_SPEC_CHANGED);
        assert_eq!(changed.observed_generation, Some(2));
        let observed = project(&p, Connection::Connected, Some("sha256:b"), T1);
        assert_eq!(cond(&observed, SPEC_OBSERVED).status, TRUE);
    }

    #[test]
    fn unknown_connection_keeps_existing_condition_or_says_never_seen() {
        let fresh = project(&process(1, "sha256:a", None), Connection::Unknown, None, T0);
        let c = cond(&fresh, AGENT_CONNECTED);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            (UNKNOWN, REASON_AGENT_NEVER_SEEN)
        );
        assert_eq!(cond(&fresh, SPEC_OBSERVED).status, FALSE);
        let s = project(
            &process(1, "sha256:a", None),
            Connection::Connected,
            Some("sha256:a"),
            T0,
        );
        let p = process(1, "sha256:a", Some(s.clone()));
        let after_store_loss = project(&p, Connection::Unknown, None, T1);
        assert!(!needs_write(Some(&s), &after_store_loss));
    }

    #[test]
    fn foreign_conditions_and_fields_survive() {
        let mut status = DeviceProcessStatus::default();
        status
            .conditions
            .push(Condition::new("Other", TRUE, "Why", "msg", T0));
        let p = process(1, "sha256:a", Some(status));
        let s = project(&p, Connection::Connected, Some("sha256:a"), T1);
        assert_eq!(s.conditions.len(), 3);
        assert_eq!(cond(&s, "Other").reason, "Why");
    }

    #[test]
    fn events_once_per_real_transition() {
        let connect = |prior, shown_connected| {
            event_for(
                &Transition::Connected {
                    prior,
                    shown_connected,
                },
                "d",
            )
        };
        let e = connect(Connection::Disconnected, false).expect("reconnect");
        assert_eq!(
            (e.type_, e.reason),
            (EventType::Normal, REASON_AGENT_CONNECTED)
        );
        assert!(
            connect(Connection::Disconnected, true).is_some(),
            "the store saw the flip"
        );
        assert!(
            connect(Connection::Unknown, false).is_some(),
            "first connect ever"
        );
        assert!(
            connect(Connection::Unknown, true).is_none(),
            "store lost its state, status already connected"
        );
        let w = event_for(&Transition::Disconnected, "d").expect("event");
        assert_eq!(
            (w.type_, w.reason),
            (EventType::Warning, REASON_AGENT_DISCONNECTED)
        );
        let observed = |prior_known, shown: Option<&str>| {
            event_for(
                &Transition::SpecObserved {
                    hash: "sha256:a".into(),
                    prior_known,
                    shown_hash: shown.map(str::to_owned),
                },
                "d",
            )
        };
        assert!(
            observed(false, Some("sha256:a")).is_none(),
            "already in status"
        );
        assert!(observed(false, None).is_some());
        assert!(observed(false, Some("sha256:b")).is_some());
        assert!(observed(true, Some("sha256:a")).is_some());
    }

    #[test]
    fn shown_reads_connection_and_hash() {
        let connected = project(
            &process(1, "sha256:a", None),
            Connection::Connected,
            Some("sha256:a"),
            T0,
        );
        assert_eq!(
            Shown::of(Some(&connected)),
            Shown {
                connected: true,
                observed_hash: Some("sha256:a".into())
            }
        );
        assert_eq!(Shown::of(None), Shown::default());
    }
    #[test]
    fn a_pending_transition_reaches_each_process_it_concerns_with_what_was_shown() {
        let a = ObjectKey::new("ns", "a");
        let b = ObjectKey::new("ns", "b");
        let pending = |kind| Pending {
            id: "1-1".into(),
            device: "d".into(),
            decided_ms: 1,
            kind,
        };
        let connected = pending(PendingKind::Connected {
            prior: Connection::Unknown,
            shown: true,
        });
        let expected = Transition::Connected {
            prior: Connection::Unknown,
            shown_connected: true,
        };
        assert_eq!(
            transitions_of(&connected, &[a.clone(), b.clone()]),
            vec![(a.clone(), expected.clone()), (b.clone(), expected.clone())]
        );
        // A store that lost its state while the status showed the device connected: no Event.
        assert_eq!(event_for(&expected, "d"), None);
        let observed = pending(PendingKind::Observed {
            key: a.clone(),
            hash: "sha256:new".into(),
            prior_known: false,
            shown: false,
        });
        let transitions = transitions_of(&observed, std::slice::from_ref(&a));
        assert_eq!(
            transitions,
            vec![(
                a.clone(),
                Transition::SpecObserved {
                    hash: "sha256:new".into(),
                    prior_known: false,
                    shown_hash: None
                }
            )]
        );
        // A first observation the status did not show yet: an Event, whenever delivered.
        assert!(event_for(&transitions[0].1, "d").is_some());
        assert!(transitions_of(&pending(PendingKind::Disconnected), &[]).is_empty());
    }
}

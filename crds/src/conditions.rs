//! Status conditions, compared and updated by type.
//!
//! Rules (the reason the gateway can promise "no status spam"):
//! - conditions are keyed by `type`; their order never matters;
//! - `lastTransitionTime` changes only when `status` flips;
//! - reasons and messages are stable for a given state, so re-applying the same state is a no-op.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type: the device agent reports within the stale window.
pub const AGENT_CONNECTED: &str = "AgentConnected";
/// Condition type: the agent has observed the current spec hash.
pub const SPEC_OBSERVED: &str = "SpecObserved";

/// Reason for AgentConnected=True.
pub const REASON_AGENT_CONNECTED: &str = "AgentConnected";
/// Reason for AgentConnected=False.
pub const REASON_AGENT_DISCONNECTED: &str = "AgentDisconnected";
/// Reason for AgentConnected=Unknown before the agent ever reported.
pub const REASON_AGENT_NEVER_SEEN: &str = "AgentNeverSeen";
/// Reason for SpecObserved=True.
pub const REASON_SPEC_OBSERVED: &str = "SpecObserved";
/// Reason for SpecObserved=False.
pub const REASON_SPEC_CHANGED: &str = "SpecChanged";

/// Message for AgentConnected=True. Stable: never carries a time or an endpoint.
pub const MESSAGE_AGENT_CONNECTED: &str = "agent reports within the stale window";
/// Message for AgentConnected=False. Stable: never carries an age.
pub const MESSAGE_AGENT_DISCONNECTED: &str = "no report within the stale window";
/// Message for AgentConnected=Unknown.
pub const MESSAGE_AGENT_NEVER_SEEN: &str = "the agent has not reported yet";
/// Message for SpecObserved=True.
pub const MESSAGE_SPEC_OBSERVED: &str = "agent observed the current spec";
/// Message for SpecObserved=False.
pub const MESSAGE_SPEC_CHANGED: &str = "agent has not yet observed the current spec";

/// `status` of a condition.
pub const TRUE: &str = "True";
/// `status` of a condition.
pub const FALSE: &str = "False";
/// `status` of a condition.
pub const UNKNOWN: &str = "Unknown";

/// One status condition (the shape of `metav1.Condition`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of the condition, unique within the list (e.g. AgentConnected).
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// Machine-readable CamelCase reason for the current status.
    pub reason: String,
    /// Human-readable, stable explanation of the current status.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time at which `status` last changed.
    pub last_transition_time: String,
    /// metadata.generation this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// A condition whose `lastTransitionTime` is `now` (kept from the old one if status is unchanged).
    pub fn new(type_: &str, status: &str, reason: &str, message: &str, now: &str) -> Self {
        Self {
            type_: type_.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            last_transition_time: now.to_owned(),
            observed_generation: None,
        }
    }

    /// Same condition with `observedGeneration` set.
    pub fn with_generation(mut self, generation: Option<i64>) -> Self {
        self.observed_generation = generation;
        self
    }
}

/// The condition of `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of `type_` is present with status True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == TRUE)
}

/// Insert or update the condition of `desired.type_`. If a condition of that type already has the
/// same status, its `lastTransitionTime` is kept; otherwise `desired.last_transition_time` is used.
/// Returns whether anything changed.
pub fn upsert(conditions: &mut Vec<Condition>, desired: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == desired.type_) {
        None => {
            conditions.push(desired);
            true
        }
        Some(existing) => {
            let last_transition_time = if existing.status == desired.status {
                existing.last_transition_time.clone()
            } else {
                desired.last_transition_time.clone()
            };
            let next = Condition {
                last_transition_time,
                ..desired
            };
            if *existing == next {
                false
            } else {
                *existing = next;
                true
            }
        }
    }
}

/// Equality by type: same set of types, and for each type the same fields. Order is ignored.
pub fn semantically_equal(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len() && a.iter().all(|ca| find(b, &ca.type_) == Some(ca))
}

/// OpenAPI schema of a conditions list: a list-map keyed by `type`, so server-side apply and
/// strategic merge treat entries by type rather than by index.
pub fn conditions_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "description": "Conditions keyed by type.",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "description": "One status condition (the shape of metav1.Condition).",
            "properties": {
                "type": {"type": "string", "description": "Type of the condition, unique within the list."},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"], "description": "True, False or Unknown."},
                "reason": {"type": "string", "description": "Machine-readable CamelCase reason for the current status."},
                "message": {"type": "string", "description": "Human-readable, stable explanation of the current status."},
                "lastTransitionTime": {"type": "string", "format": "date-time", "description": "Time at which status last changed."},
                "observedGeneration": {"type": "integer", "format": "int64", "description": "metadata.generation this condition was computed from."}
            },
            "required": ["type", "status", "reason", "lastTransitionTime"]
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = "2026-01-01T00:00:00Z";
    const T1: &str = "2026-01-01T00:05:00Z";

    fn connected(status: &str, now: &str) -> Condition {
        let (reason, message) = if status == TRUE {
            (REASON_AGENT_CONNECTED, MESSAGE_AGENT_CONNECTED)
        } else {
            (REASON_AGENT_DISCONNECTED, MESSAGE_AGENT_DISCONNECTED)
        };
        Condition::new(AGENT_CONNECTED, status, reason, message, now)
    }

    #[test]
    fn upsert_inserts_a_new_type() {
        let mut conds = vec![];
        assert!(upsert(&mut conds, connected(TRUE, T0)));
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, T0);
    }

    #[test]
    fn same_status_keeps_transition_time_and_is_not_a_change() {
        let mut conds = vec![connected(TRUE, T0)];
        assert!(!upsert(&mut conds, connected(TRUE, T1)));
        assert_eq!(conds[0].last_transition_time, T0);
    }

    #[test]
    fn status_flip_moves_transition_time() {
        let mut conds = vec![connected(TRUE, T0)];
        assert!(upsert(&mut conds, connected(FALSE, T1)));
        assert_eq!(conds[0].status, FALSE);
        assert_eq!(conds[0].last_transition_time, T1);
    }

    #[test]
    fn message_change_without_flip_keeps_transition_time_but_counts_as_change() {
        let mut conds = vec![connected(TRUE, T0)];
        let mut next = connected(TRUE, T1);
        next.message = "different".into();
        assert!(upsert(&mut conds, next));
        assert_eq!(conds[0].last_transition_time, T0);
        assert_eq!(conds[0].message, "different");
    }

    #[test]
    fn upsert_touches_only_its_own_type() {
        let spec = Condition::new(
            SPEC_OBSERVED,
            TRUE,
            REASON_SPEC_OBSERVED,
            MESSAGE_SPEC_OBSERVED,
            T0,
        );
        let mut conds = vec![spec.clone(), connected(TRUE, T0)];
        assert!(upsert(&mut conds, connected(FALSE, T1)));
        assert_eq!(find(&conds, SPEC_OBSERVED), Some(&spec));
        assert!(!is_true(&conds, AGENT_CONNECTED));
        assert!(is_true(&conds, SPEC_OBSERVED));
    }

    #[test]
    fn equality_ignores_order_but_not_content() {
        let a = connected(TRUE, T0);
        let b = Condition::new(
            SPEC_OBSERVED,
            FALSE,
            REASON_SPEC_CHANGED,
            MESSAGE_SPEC_CHANGED,
            T0,
        );
        assert!(semantically_equal(
            &[a.clone(), b.clone()],
            &[b.clone(), a.clone()]
        ));
        assert!(!semantically_equal(
            std::slice::from_ref(&a),
            &[a.clone(), b.clone()]
        ));
        let mut a2 = a.clone();
        a2.status = FALSE.into();
        assert!(!semantically_equal(&[a, b.clone()], &[b, a2]));
    }

    #[test]
    fn serialises_as_metav1_condition() {
        let c = connected(TRUE, T0).with_generation(Some(3));
        let v = serde_json::to_value(&c).expect("serialise");
        assert_eq!(v["type"], AGENT_CONNECTED);
        assert_eq!(v["lastTransitionTime"], T0);
        assert_eq!(v["observedGeneration"], 3);
    }
}

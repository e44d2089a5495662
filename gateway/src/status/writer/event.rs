//! The Events of the gateway (events.k8s.io/v1), named so a replay can never publish one twice.

use std::sync::atomic::{AtomicU32, Ordering};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};

use crate::model::CachedProcess;
use crate::status::projection::EventSpec;

/// `reportingController` of every Event.
pub const REPORTING_CONTROLLER: &str = "apollo.azure.com/gateway";

static EVENT_SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// Longest object name Kubernetes accepts for an Event (a DNS subdomain).
const MAX_EVENT_NAME_LEN: usize = 253;

/// `<object name>.<suffix>`, the object name shortened when needed so the whole stays a valid
/// DNS subdomain of at most 253 characters (events.k8s.io/v1 validates Event names; an object
/// named with 253 characters would otherwise get no Event at all).
fn event_name(object: &str, suffix: &str) -> String {
    let room = MAX_EVENT_NAME_LEN.saturating_sub(suffix.len() + 1);
    let mut end = 0;
    for (i, c) in object.char_indices() {
        if i + c.len_utf8() > room {
            break;
        }
        end = i + c.len_utf8();
    }
    // A DNS subdomain's labels start and end with an alphanumeric character.
    let prefix = object[..end].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    let prefix = if prefix.is_empty() {
        "deviceprocess"
    } else {
        prefix
    };
    format!("{prefix}.{suffix}")
}

/// An events.k8s.io/v1 Event about `process`.
///
/// Built by hand rather than with kube's `Recorder` because the Recorder does not fit how the
/// gateway writes: it names Events `<object>.<hex time>`, which the apiserver refuses (422) for
/// DeviceProcess names near the 253-character limit (see `event_name`); it deduplicates repeats
/// into a `series` with PATCH requests from a per-process cache (one more verb in the RBAC, and a
/// cache that other replicas do not share — here the state store already decides that each
/// transition is published once, by one replica); and its calls would bypass this writer's rate
/// limit, per-call timeout, metrics and the report's trace, which every Kubernetes write of the
/// gateway goes through.
pub fn build_event(
    process: &CachedProcess,
    spec: &EventSpec,
    instance: &str,
    unique_suffix: Option<&str>,
) -> Event {
    let now = k8s_openapi::jiff::Timestamp::now();
    let suffix = match unique_suffix {
        Some(s) => s.to_owned(),
        None => {
            let sequence = EVENT_SEQUENCE.fetch_add(1, Ordering::Relaxed);
            format!("{:x}{:04x}", now.as_nanosecond(), sequence & 0xffff)
        }
    };
    Event {
        metadata: ObjectMeta {
            name: Some(event_name(&process.key.name, &suffix)),
            namespace: Some(process.key.namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some(spec.action.to_owned()),
        reason: Some(spec.reason.to_owned()),
        note: Some(spec.note.clone()),
        type_: Some(spec.type_.as_str().to_owned()),
        regarding: Some(ObjectReference {
            api_version: Some(format!("{}/{}", apollo_crds::GROUP, apollo_crds::VERSION)),
            kind: Some("DeviceProcess".to_owned()),
            name: Some(process.key.name.clone()),
            namespace: Some(process.key.namespace.clone()),
            uid: Some(process.uid.clone()).filter(|u| !u.is_empty()),
            ..ObjectReference::default()
        }),
        reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
        reporting_instance: Some(instance.to_owned()),
        ..Event::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectKey;
    use crate::status::projection::EventType;

    #[test]
    fn events_regard_the_device_process() {
        let process = CachedProcess {
            key: ObjectKey::new("ns", "p"),
            uid: "u-1".into(),
            device: "d".into(),
            generation: 1,
            resource_version: None,
            spec: serde_json::json!({}),
            spec_hash: String::new(),
            status: None,
        };
        let spec = EventSpec {
            type_: EventType::Warning,
            reason: "AgentDisconnected",
            action: "StaleSweep",
            note: "n".into(),
        };
        let a = build_event(&process, &spec, "apollo-gateway-0", None);
        let b = build_event(&process, &spec, "apollo-gateway-0", None);
        assert_ne!(a.metadata.name, b.metadata.name);
        assert_eq!(a.type_.as_deref(), Some("Warning"));
        let regarding = a.regarding.expect("regarding");
        assert_eq!(regarding.kind.as_deref(), Some("DeviceProcess"));
        assert_eq!(regarding.api_version.as_deref(), Some("azure.com/v1alpha1"));
        assert_eq!(regarding.uid.as_deref(), Some("u-1"));
    }

    #[test]
    fn event_names_stay_valid_dns_subdomains_for_the_longest_object_names() {
        assert_eq!(
            event_name("p", "18edb3b8482ec9a80000"),
            "p.18edb3b8482ec9a80000"
        );
        let longest = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        let name = event_name(&longest, "18edb3b8482ec9a80000");
        assert_eq!(name.len(), 253, "{name}");
        assert!(name.starts_with(&longest[..200]));
        assert!(name.ends_with(".18edb3b8482ec9a80000"));
        // Cut right after a '.' or '-': the label must not end with one.
        let dotted = format!("{}.-{}", "a".repeat(230), "b".repeat(20));
        let name = event_name(&dotted, "18edb3b8482ec9a80000");
        assert!(name.len() <= 253, "{name}");
        assert!(!name.contains(".-") && !name.contains(".."), "{name}");
        assert!(name.starts_with(&"a".repeat(230)));
    }
}

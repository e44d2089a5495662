//! Events on DeviceProcessDeployments (`events.k8s.io/v1`), written the way kube's
//! `kube::runtime::events::Recorder` writes them, with one difference the real apiserver demands:
//! the Event's name.
//!
//! The Recorder (like client-go's) names an Event `<object name>.<nanoseconds in hex>`. Object
//! names may be 253 characters long, Event names too, so for a deployment whose name is longer
//! than 236 characters the apiserver refuses every Event about it (422 `metadata.name: must be no
//! more than 253 characters`). Here the object's name is cut to fit before the suffix; the Event
//! still names its object in full in `regarding`, which is what `kubectl describe` and every
//! reader go by.
//!
//! The same goes for `reportingInstance`, at most 128 characters: the replica's identity is
//! `<POD_NAME>_<pid><time>` by default and a Pod's name may be 253 characters, so it is cut to fit
//! (the Lease's `holderIdentity`, which has no such limit, keeps it whole).
//!
//! The Recorder also folds a repeat of the same Event (same reason, action, regarding and related
//! object) within a few minutes into a series by patching it. Every Event the controller emits is
//! about a distinct child (the `related` reference carries the child's uid), so there are no
//! repeats to fold, and each Event is one create.

use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// Longest object name the apiserver accepts (a DNS-1123 subdomain).
pub const MAX_EVENT_NAME_LEN: usize = 253;
/// Longest `reportingInstance` the apiserver accepts.
pub const MAX_REPORTING_INSTANCE_LEN: usize = 128;

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Expected progress.
    Normal,
    /// Something an operator should look at.
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// What happened.
#[derive(Debug, Clone)]
pub struct EventSpec {
    /// Normal or Warning.
    pub type_: EventType,
    /// CamelCase reason, e.g. `SuccessfulCreate`.
    pub reason: String,
    /// Human-readable description.
    pub note: String,
    /// What was done, e.g. `Create`.
    pub action: String,
    /// The other object involved (e.g. the child created).
    pub related: Option<ObjectReference>,
}

/// The longest prefix of `s` of at most `max` bytes that ends at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = 0;
    for (i, c) in s.char_indices() {
        if i + c.len_utf8() > max {
            break;
        }
        end = i + c.len_utf8();
    }
    &s[..end]
}

/// `<object>.<suffix>`, with `object` cut (at a character boundary, then back to an alphanumeric
/// character, since a DNS-1123 label ends with one) so the whole name fits in 253 characters.
pub fn event_name(object: &str, suffix: &str) -> String {
    let room = MAX_EVENT_NAME_LEN.saturating_sub(suffix.len() + 1);
    let prefix = cut(object, room).trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    let prefix = if prefix.is_empty() { "event" } else { prefix };
    format!("{prefix}.{suffix}")
}

/// The Event `spec` about `regarding`, reported by `controller`/`instance` at `now`; `sequence`
/// keeps the names of Events made in the same nanosecond apart.
pub fn build_event(
    spec: &EventSpec,
    regarding: &ObjectReference,
    controller: &str,
    instance: &str,
    now: Timestamp,
    sequence: u64,
) -> Event {
    let suffix = format!("{:x}{:04x}", now.as_nanosecond(), sequence & 0xffff);
    let object = regarding.name.as_deref().unwrap_or(controller);
    Event {
        metadata: ObjectMeta {
            name: Some(event_name(object, &suffix)),
            namespace: regarding.namespace.clone(),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some(spec.action.clone()),
        reason: Some(spec.reason.clone()),
        note: Some(spec.note.clone()),
        type_: Some(spec.type_.as_str().to_owned()),
        regarding: Some(regarding.clone()),
        related: spec.related.clone(),
        reporting_controller: Some(controller.to_owned()),
        reporting_instance: Some(cut(instance, MAX_REPORTING_INSTANCE_LEN).to_owned()),
        ..Event::default()
    }
}

/// Publishes Events as one controller instance.
#[derive(Clone)]
pub struct EventRecorder {
    client: kube::Client,
    controller: String,
    instance: String,
    sequence: std::sync::Arc<AtomicU64>,
}

impl EventRecorder {
    /// Events reported by `controller` (`reportingController`) from `instance`
    /// (`reportingInstance`).
    pub fn new(client: kube::Client, controller: &str, instance: &str) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.to_owned(),
            sequence: std::sync::Arc::new(AtomicU64::new(0)),
        }
    }

    /// Creates the Event `spec` about `regarding` in `regarding`'s namespace.
    pub async fn publish(
        &self,
        spec: &EventSpec,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let event = build_event(
            spec,
            regarding,
            &self.controller,
            &self.instance,
            Timestamp::now(),
            sequence,
        );
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        api.create(&PostParams::default(), &event).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUFFIX: &str = "18edb3b8482ec9a80000";

    #[test]
    fn short_names_are_kept_whole() {
        assert_eq!(event_name("logger", SUFFIX), format!("logger.{SUFFIX}"));
    }

    #[test]
    fn names_of_the_longest_objects_are_cut_to_a_valid_subdomain() {
        let longest = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        let name = event_name(&longest, SUFFIX);
        assert_eq!(name.len(), MAX_EVENT_NAME_LEN, "{name}");
        assert!(name.starts_with(&longest[..200]));
        assert!(name.ends_with(&format!(".{SUFFIX}")));
        // Cut right after a '.' or '-': the label must not end with one.
        let dotted = format!("{}.-{}", "a".repeat(230), "b".repeat(20));
        let name = event_name(&dotted, SUFFIX);
        assert!(name.len() <= MAX_EVENT_NAME_LEN, "{name}");
        assert!(!name.contains(".-") && !name.contains(".."), "{name}");
        assert!(name.starts_with(&"a".repeat(230)));
    }

    #[test]
    fn the_event_names_its_object_in_full_and_carries_what_the_apiserver_requires() {
        let regarding = ObjectReference {
            api_version: Some("azure.com/v1alpha1".into()),
            kind: Some("DeviceProcessDeployment".into()),
            name: Some("x".repeat(253)),
            namespace: Some("fabric".into()),
            uid: Some("u-1".into()),
            ..ObjectReference::default()
        };
        let spec = EventSpec {
            type_: EventType::Normal,
            reason: "SuccessfulCreate".into(),
            note: "Created DeviceProcess: c".into(),
            action: "Create".into(),
            related: None,
        };
        let now = Timestamp::from_second(1_800_000_000).expect("timestamp");
        let a = build_event(&spec, &regarding, "apollo-controller", "replica-1", now, 1);
        let b = build_event(&spec, &regarding, "apollo-controller", "replica-1", now, 2);
        assert_ne!(
            a.metadata.name, b.metadata.name,
            "same nanosecond, distinct names"
        );
        assert!(a.metadata.name.as_ref().is_some_and(|n| n.len() <= 253));
        assert_eq!(a.metadata.namespace.as_deref(), Some("fabric"));
        assert_eq!(a.regarding.as_ref(), Some(&regarding));
        assert_eq!(a.event_time, Some(MicroTime(now)));
        assert_eq!(a.type_.as_deref(), Some("Normal"));
        assert_eq!(a.reporting_controller.as_deref(), Some("apollo-controller"));
        assert_eq!(a.reporting_instance.as_deref(), Some("replica-1"));
        let long_instance = format!("{}_4d2a", "p".repeat(253));
        let c = build_event(
            &spec,
            &regarding,
            "apollo-controller",
            &long_instance,
            now,
            3,
        );
        let instance = c.reporting_instance.expect("reportingInstance");
        assert_eq!(instance.len(), MAX_REPORTING_INSTANCE_LEN);
        assert!(long_instance.starts_with(&instance));
        assert_eq!(a.series, None);
        assert_eq!(a.deprecated_count, None);
    }
}

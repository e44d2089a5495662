//! The desired document of a device: built once per change, serialised once, shared by every
//! request for that device until it changes again.

use std::sync::atomic::{AtomicBool, Ordering};

use apollo_protocol::hash::{desired_etag, EtagItem};
use apollo_protocol::wire::{DesiredDocument, DesiredItem};
use bytes::Bytes;

use crate::model::CachedProcess;

/// A device's desired document, ready to serve: JSON bytes plus their strong ETag.
#[derive(Debug)]
pub struct DesiredSnapshot {
    /// Strong, quoted ETag over stable identifiers.
    pub etag: String,
    /// The serialised document.
    pub body: Bytes,
    /// Number of items in the document.
    pub items: usize,
    /// Whether this ETag was already handed to the state store as the last served one.
    etag_recorded: AtomicBool,
}

impl DesiredSnapshot {
    /// Marks the ETag as recorded in the state store; true only for the first caller, so each
    /// document is recorded at most once per replica.
    pub fn claim_etag_recording(&self) -> bool {
        !self.etag_recorded.swap(true, Ordering::Relaxed)
    }
}

/// Builds the document of `device` from its DeviceProcesses, which must come sorted by
/// namespace/name (the cache keeps them in a BTreeMap keyed that way).
pub fn build_snapshot<'a>(
    device: &str,
    heartbeat_interval_seconds: u64,
    items: impl IntoIterator<Item = &'a CachedProcess>,
) -> DesiredSnapshot {
    let items: Vec<&CachedProcess> = items.into_iter().collect();
    let etag = desired_etag(
        heartbeat_interval_seconds,
        items.iter().map(|p| EtagItem {
            namespace: &p.key.namespace,
            name: &p.key.name,
            generation: p.generation,
            spec_hash: &p.spec_hash,
        }),
    );
    let document = DesiredDocument {
        device_name: device.to_owned(),
        heartbeat_interval_seconds,
        items: items
            .iter()
            .map(|p| DesiredItem {
                uid: p.uid.clone(),
                namespace: p.key.namespace.clone(),
                name: p.key.name.clone(),
                generation: p.generation,
                spec: p.spec.clone(),
                spec_hash: p.spec_hash.clone(),
            })
            .collect(),
    };
    // Strings, integers and JSON values always serialise.
    let body = serde_json::to_vec(&document).unwrap_or_default();
    DesiredSnapshot {
        etag,
        body: Bytes::from(body),
        items: items.len(),
        etag_recorded: AtomicBool::new(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ObjectKey;
    use apollo_protocol::hash::value_hash;
    use serde_json::json;

    pub(crate) fn process(ns: &str, name: &str, generation: i64, url: &str) -> CachedProcess {
        let spec = json!({"deviceRef": {"name": "d"}, "artifact": {"type": "oci", "url": url},
                          "execution": {"backend": "container"}});
        CachedProcess {
            key: ObjectKey::new(ns, name),
            uid: format!("uid-{name}"),
            device: "d".into(),
            generation,
            resource_version: Some("1".into()),
            spec_hash: value_hash(&spec),
            spec,
            status: None,
        }
    }

    #[test]
    fn document_has_the_wire_shape_in_the_given_order() {
        let a = process("a", "x", 1, "u1");
        let b = process("b", "x", 2, "u2");
        let snap = build_snapshot("d", 15, [&a, &b]);
        let doc: DesiredDocument = serde_json::from_slice(&snap.body).expect("parse");
        assert_eq!(doc.device_name, "d");
        assert_eq!(doc.heartbeat_interval_seconds, 15);
        assert_eq!(doc.items.len(), 2);
        assert_eq!(doc.items[0].namespace, "a");
        assert_eq!(doc.items[1].generation, 2);
        assert_eq!(doc.items[1].spec_hash, b.spec_hash);
        assert_eq!(doc.items[0].spec, a.spec);
        assert_eq!(snap.items, 2);
        let raw: serde_json::Value = serde_json::from_slice(&snap.body).expect("parse");
        assert!(raw["items"][0]["specHash"].is_string());
    }

    #[test]
    fn empty_device_gets_an_empty_list() {
        let snap = build_snapshot("nobody", 15, []);
        let raw: serde_json::Value = serde_json::from_slice(&snap.body).expect("parse");
        assert_eq!(raw["items"], json!([]));
    }

    #[test]
    fn etag_changes_exactly_with_generation_or_spec_hash() {
        let base = build_snapshot("d", 15, [&process("a", "x", 1, "u1")]).etag;
        assert_eq!(
            base,
            build_snapshot("d", 15, [&process("a", "x", 1, "u1")]).etag
        );
        let mut status_only = process("a", "x", 1, "u1");
        status_only.resource_version = Some("99".into());
        status_only.status = Some(Default::default());
        assert_eq!(base, build_snapshot("d", 15, [&status_only]).etag);
        assert_ne!(
            base,
            build_snapshot("d", 15, [&process("a", "x", 2, "u1")]).etag
        );
        assert_ne!(
            base,
            build_snapshot("d", 15, [&process("a", "x", 1, "u2")]).etag
        );
        assert_ne!(
            base,
            build_snapshot("d", 30, [&process("a", "x", 1, "u1")]).etag
        );
    }

    #[test]
    fn etag_recording_is_claimed_once() {
        let snap = build_snapshot("d", 15, []);
        assert!(snap.claim_etag_recording());
        assert!(!snap.claim_etag_recording());
    }
}

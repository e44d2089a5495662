//! What the gateway keeps of a DeviceProcess, and how objects are named.

use std::fmt;

use apollo_crds::{DeviceProcess, DeviceProcessStatus};
use apollo_protocol::hash::value_hash;

/// `namespace/name` of a DeviceProcess. Orders by namespace, then name (the desired document's
/// item order).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// metadata.namespace.
    pub namespace: String,
    /// metadata.name.
    pub name: String,
}

impl ObjectKey {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parses `namespace/name` (the form used as a field name in the state store).
    pub fn parse(s: &str) -> Option<Self> {
        let (namespace, name) = s.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty()).then(|| Self::new(namespace, name))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The parts of a DeviceProcess the gateway serves and projects status from. The spec is
/// serialised and hashed once, when the object arrives from the watch.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedProcess {
    /// namespace/name.
    pub key: ObjectKey,
    /// metadata.uid.
    pub uid: String,
    /// spec.deviceRef.name.
    pub device: String,
    /// metadata.generation (0 when the server did not set one).
    pub generation: i64,
    /// metadata.resourceVersion.
    pub resource_version: Option<String>,
    /// The spec as JSON, exactly as served to the agent.
    pub spec: serde_json::Value,
    /// `sha256:<hex>` of the canonical JSON of the spec.
    pub spec_hash: String,
    /// The current status.
    pub status: Option<DeviceProcessStatus>,
}

impl CachedProcess {
    /// Extracts what the gateway needs; None for an object without namespace or name.
    pub fn from_object(obj: &DeviceProcess) -> Option<Self> {
        let namespace = obj.metadata.namespace.clone()?;
        let name = obj.metadata.name.clone()?;
        // A typed spec always serialises to a JSON value.
        let spec = serde_json::to_value(&obj.spec).unwrap_or(serde_json::Value::Null);
        let spec_hash = value_hash(&spec);
        Some(Self {
            key: ObjectKey { namespace, name },
            uid: obj.metadata.uid.clone().unwrap_or_default(),
            device: obj.spec.device_ref.name.clone(),
            generation: obj.metadata.generation.unwrap_or(0),
            resource_version: obj.metadata.resource_version.clone(),
            spec,
            spec_hash,
            status: obj.status.clone(),
        })
    }

    /// Whether the desired document of its device must be rebuilt when `self` replaces `old`.
    pub fn desired_differs(&self, old: &CachedProcess) -> bool {
        self.uid != old.uid
            || self.device != old.device
            || self.generation != old.generation
            || self.spec_hash != old.spec_hash
    }

    /// Whether `self` is older than `other` by resourceVersion. resourceVersions are opaque, but
    /// the etcd-backed kube-apiserver issues increasing integers; when either does not parse, the
    /// newer arrival wins.
    pub fn is_older_than(&self, other: &CachedProcess) -> bool {
        match (
            self.resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok()),
            other
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok()),
        ) {
            (Some(mine), Some(theirs)) => mine < theirs,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_by_namespace_then_name_and_round_trip() {
        let mut keys = [
            ObjectKey::new("b", "a"),
            ObjectKey::new("a", "z"),
            ObjectKey::new("a", "b"),
        ];
        keys.sort();
        let shown: Vec<String> = keys.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["a/b", "a/z", "b/a"]);
        assert_eq!(ObjectKey::parse("a/b"), Some(ObjectKey::new("a", "b")));
        assert_eq!(ObjectKey::parse("ab"), None);
        assert_eq!(ObjectKey::parse("/b"), None);
    }
}

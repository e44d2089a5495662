//! What must exist for a deployment and how it differs from what exists. Pure: `reconcile` feeds
//! the caches in and writes the results out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use apollo_crds::{
    DeviceProcess, DeviceProcessDeployment, NetworkSwitch, LABEL_DEPLOYMENT, LABEL_DEVICE_NAME,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use serde_json::{Map, Value};

use crate::names::{child_name, hashed_child_name, label_value};
use crate::selector::{Selector, SelectorError};

/// Why the desired set of a deployment cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredError {
    /// The deployment's selector is invalid; nothing can be selected.
    #[error("invalid selector: {0}")]
    InvalidSelector(#[from] SelectorError),
    /// The deployment lacks a field the API server always sets.
    #[error("deployment has no {0}")]
    MissingField(&'static str),
}

/// The controller owner reference every child of `deployment` carries. `blockOwnerDeletion` makes
/// foreground deletion of the deployment wait for its children.
pub fn owner_reference(
    deployment: &DeviceProcessDeployment,
) -> Result<OwnerReference, DesiredError> {
    Ok(OwnerReference {
        api_version: DeviceProcessDeployment::api_version(&()).into_owned(),
        kind: DeviceProcessDeployment::kind(&()).into_owned(),
        name: deployment
            .metadata
            .name
            .clone()
            .ok_or(DesiredError::MissingField("metadata.name"))?,
        uid: deployment
            .metadata
            .uid
            .clone()
            .ok_or(DesiredError::MissingField("metadata.uid"))?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Whether `child` is controlled by the deployment with `uid`.
pub fn is_controlled_by(child: &DeviceProcess, uid: &str) -> bool {
    child
        .owner_references()
        .iter()
        .any(|r| r.controller == Some(true) && r.uid == uid)
}

/// Whether `child` has no controller at all: its deployment was deleted with
/// `propagationPolicy: Orphan` (the garbage collector removed the owner reference), or someone
/// removed the reference by hand.
pub fn is_orphan(child: &DeviceProcess) -> bool {
    child
        .owner_references()
        .iter()
        .all(|r| r.controller != Some(true))
}

/// Whether the orphan `child` was made for a deployment named like `deployment`: it carries that
/// deployment label (as a DaemonSet adopts the orphaned Pods its selector matches). Without
/// adoption the name stays taken and every create of it is refused (409).
fn adoptable_by(child: &DeviceProcess, deployment: &str) -> bool {
    is_orphan(child)
        && child.labels().get(LABEL_DEPLOYMENT).map(String::as_str)
            == Some(label_value(deployment).as_str())
}

/// What must exist for a deployment.
#[derive(Debug, Default)]
pub struct Desired {
    /// The DeviceProcesses that must exist, keyed by name.
    pub children: BTreeMap<String, DeviceProcess>,
    /// The labels of each child's NetworkSwitch, keyed by child name (canaries, groups).
    pub device_labels: BTreeMap<String, BTreeMap<String, String>>,
}

/// The name the child of (`deployment`, `device`) has or gets, given the DeviceProcesses of the
/// namespace (`existing`, any owner, by name): the candidate name (see [`crate::names`]) a child
/// of ours (or an orphan we would adopt) already has; else the preferred name unless another
/// object holds it; else the hashed name, which is unique to the pair.
///
/// The hashed name (a SHA-256) is only computed when the preferred one is not already our
/// child's: a reconcile resolves the name of every child of the deployment, and in the common
/// case every child holds its preferred name.
pub fn resolve_child_name(
    deployment: &str,
    uid: &str,
    device: &str,
    existing: &HashMap<&str, &DeviceProcess>,
) -> String {
    let ours = |c: &DeviceProcess| is_controlled_by(c, uid) && c.spec.device_ref.name == device;
    let held = |name: &str, keep: &dyn Fn(&DeviceProcess) -> bool| {
        existing.get(name).is_some_and(|c| keep(c))
    };
    let preferred = child_name(deployment, device);
    if held(&preferred, &ours) {
        return preferred;
    }
    let hashed = hashed_child_name(deployment, device);
    let candidates: &[&String] = if hashed == preferred {
        &[&preferred]
    } else {
        &[&preferred, &hashed]
    };
    let adoptable = |c: &DeviceProcess| adoptable_by(c, deployment);
    for keep in [&ours as &dyn Fn(&DeviceProcess) -> bool, &adoptable] {
        if let Some(name) = candidates.iter().find(|n| held(n, keep)) {
            return (*name).clone();
        }
    }
    if existing.contains_key(preferred.as_str()) {
        hashed
    } else {
        preferred
    }
}

/// The DeviceProcesses that must exist for `deployment`: one per switch in the deployment's
/// namespace that its selector matches and that is not being deleted. `existing` are the
/// DeviceProcesses of the namespace (any owner), which decide between a child's candidate names.
pub fn desired_children<'a>(
    deployment: &DeviceProcessDeployment,
    switches: impl IntoIterator<Item = &'a NetworkSwitch>,
    existing: &[Arc<DeviceProcess>],
) -> Result<Desired, DesiredError> {
    let selector = Selector::new(&deployment.spec.selector)?;
    let namespace = deployment
        .metadata
        .namespace
        .as_deref()
        .ok_or(DesiredError::MissingField("metadata.namespace"))?;
    let deployment_name = deployment
        .metadata
        .name
        .as_deref()
        .ok_or(DesiredError::MissingField("metadata.name"))?;
    let owner = owner_reference(deployment)?;
    let template = &deployment.spec.template;
    let by_name: HashMap<&str, &DeviceProcess> = existing
        .iter()
        .filter_map(|c| Some((c.metadata.name.as_deref()?, c.as_ref())))
        .collect();
    let deployment_label = label_value(deployment_name);

    let mut desired = Desired::default();
    for switch in switches {
        let Some(device) = switch.metadata.name.as_deref() else {
            continue;
        };
        if switch.metadata.namespace.as_deref() != Some(namespace)
            || switch.metadata.deletion_timestamp.is_some()
            || !selector.matches(switch.labels())
        {
            continue;
        }
        let name = resolve_child_name(deployment_name, &owner.uid, device, &by_name);
        let mut labels = template.metadata.labels.clone();
        labels.insert(LABEL_DEVICE_NAME.to_owned(), label_value(device));
        labels.insert(LABEL_DEPLOYMENT.to_owned(), deployment_label.clone());
        let child = DeviceProcess {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.to_owned()),
                labels: Some(labels),
                annotations: (!template.metadata.annotations.is_empty())
                    .then(|| template.metadata.annotations.clone()),
                owner_references: Some(vec![owner.clone()]),
                ..ObjectMeta::default()
            },
            spec: template.spec.for_device(device),
            status: None,
        };
        desired
            .device_labels
            .insert(name.clone(), switch.labels().clone());
        desired.children.insert(name, child);
    }
    Ok(desired)
}

/// Whether `existing` must be written to become `desired`.
///
/// Labels are compared exactly: they are what selectors see, so a label removed from the template
/// must disappear from the children. Annotations only need to include the template's, because
/// tools routinely annotate objects and stripping their annotations would fight them.
pub fn needs_update(existing: &DeviceProcess, desired: &DeviceProcess) -> bool {
    let annotations_present = desired
        .annotations()
        .iter()
        .all(|(k, v)| existing.annotations().get(k) == Some(v));
    existing.spec != desired.spec || existing.labels() != desired.labels() || !annotations_present
}

/// An existing child whose spec or metadata must be brought to the template.
#[derive(Debug, Clone)]
pub struct ChildUpdate {
    /// The child as last seen.
    pub existing: Arc<DeviceProcess>,
    /// What it must become.
    pub desired: DeviceProcess,
}

impl ChildUpdate {
    /// Whether this update adopts an orphan (sets our controller reference on it).
    pub fn adopts(&self) -> bool {
        is_orphan(&self.existing)
    }

    /// Whether this update gives the child a new spec (the part a rollout paces).
    pub fn changes_spec(&self) -> bool {
        self.existing.spec != self.desired.spec
    }

    /// The same update without the spec change: metadata (and adoption) only.
    pub fn metadata_only(&self) -> Self {
        let mut desired = self.desired.clone();
        desired.spec = self.existing.spec.clone();
        Self {
            existing: Arc::clone(&self.existing),
            desired,
        }
    }

    /// JSON merge patch turning `existing` into `desired`, carrying the existing
    /// `resourceVersion` so a write based on a stale cache fails with 409 instead of repeating.
    /// Adopting an orphan adds the desired controller reference to the ones it has (a merge patch
    /// replaces the whole list, so the list written is complete); under the `resourceVersion`,
    /// an orphan someone else adopted meanwhile is not taken over.
    pub fn merge_patch(&self) -> Result<Value, serde_json::Error> {
        let mut desired_annotations = self.existing.annotations().clone();
        desired_annotations.extend(
            self.desired
                .annotations()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        let old = serde_json::json!({
            "metadata": {
                "labels": self.existing.labels(),
                "annotations": self.existing.annotations(),
            },
            "spec": serde_json::to_value(&self.existing.spec)?,
        });
        let new = serde_json::json!({
            "metadata": {
                "labels": self.desired.labels(),
                "annotations": desired_annotations,
            },
            "spec": serde_json::to_value(&self.desired.spec)?,
        });
        let mut patch = merge_patch_diff(&old, &new);
        if self.adopts() {
            let mut owners = self.existing.owner_references().to_vec();
            owners.extend(self.desired.owner_references().iter().cloned());
            insert_metadata(&mut patch, "ownerReferences", serde_json::to_value(owners)?);
        }
        if let Some(rv) = self.existing.metadata.resource_version.as_ref() {
            insert_metadata(&mut patch, "resourceVersion", Value::String(rv.clone()));
        }
        Ok(patch)
    }
}

fn insert_metadata(patch: &mut Value, key: &str, value: Value) {
    if let Some(patch) = patch.as_object_mut() {
        let metadata = patch
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(metadata) = metadata.as_object_mut() {
            metadata.insert(key.to_owned(), value);
        }
    }
}

/// RFC 7386 merge patch that turns `old` into `new`: changed or added keys carry the new value,
/// removed keys carry `null`, arrays and scalars are replaced whole. Equal inputs give `{}`.
pub fn merge_patch_diff(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(old), Value::Object(new)) => {
            let mut patch = Map::new();
            for (key, old_value) in old {
                match new.get(key) {
                    None => {
                        patch.insert(key.clone(), Value::Null);
                    }
                    Some(new_value) if new_value != old_value => {
                        let nested = match (old_value, new_value) {
                            (Value::Object(_), Value::Object(_)) => {
                                merge_patch_diff(old_value, new_value)
                            }
                            _ => new_value.clone(),
                        };
                        patch.insert(key.clone(), nested);
                    }
                    Some(_) => {}
                }
            }
            for (key, new_value) in new {
                if !old.contains_key(key) {
                    patch.insert(key.clone(), new_value.clone());
                }
            }
            Value::Object(patch)
        }
        _ => new.clone(),
    }
}

/// What reconciling one deployment has to do.
#[derive(Debug, Default)]
pub struct Plan {
    /// Children to create.
    pub create: Vec<DeviceProcess>,
    /// Children to bring to the template.
    pub update: Vec<ChildUpdate>,
    /// Children whose device is no longer selected (or no longer exists).
    pub delete: Vec<Arc<DeviceProcess>>,
    /// Children already as they should be.
    pub unchanged: Vec<Arc<DeviceProcess>>,
}

impl Plan {
    /// Whether the plan writes nothing.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}

/// Compare `desired` with the children that exist. `existing` may contain objects of other
/// deployments; only those controlled by `owner_uid` are considered, and orphans that hold a
/// desired name for a deployment of this name, which are adopted (an update that sets the
/// controller reference). A child already being deleted is left alone: it is neither deleted
/// again nor replaced until it is gone.
pub fn plan(
    owner_uid: &str,
    desired: &BTreeMap<String, DeviceProcess>,
    existing: &[Arc<DeviceProcess>],
) -> Plan {
    let mut plan = Plan::default();
    let mut seen: HashSet<&str> = HashSet::with_capacity(existing.len());
    for child in existing {
        let Some(name) = child.metadata.name.as_deref() else {
            continue;
        };
        if !is_controlled_by(child, owner_uid) {
            let Some(want) = desired.get(name).filter(|want| {
                want.labels()
                    .get(LABEL_DEPLOYMENT)
                    .is_some_and(|d| adoptable_by_label(child, d))
            }) else {
                continue;
            };
            seen.insert(name);
            if child.metadata.deletion_timestamp.is_none() {
                plan.update.push(ChildUpdate {
                    existing: child.clone(),
                    desired: want.clone(),
                });
            }
            continue;
        }
        seen.insert(name);
        if child.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match desired.get(name) {
            None => plan.delete.push(child.clone()),
            Some(want) if needs_update(child, want) => plan.update.push(ChildUpdate {
                existing: child.clone(),
                desired: want.clone(),
            }),
            Some(_) => plan.unchanged.push(child.clone()),
        }
    }
    plan.create = desired
        .iter()
        .filter(|(name, _)| !seen.contains(name.as_str()))
        .map(|(_, child)| child.clone())
        .collect();
    plan
}

/// [`adoptable_by`] with the deployment label value already computed.
pub fn adoptable_by_label(child: &DeviceProcess, deployment_label: &str) -> bool {
    is_orphan(child)
        && child.labels().get(LABEL_DEPLOYMENT).map(String::as_str) == Some(deployment_label)
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;

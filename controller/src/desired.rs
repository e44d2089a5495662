//! The pure half of reconciliation: what must exist, how it differs from what exists, and the
//! status that describes it. No I/O here; `reconcile` feeds caches in and writes the results out.
//!
//! # Child names
//! A deployment `D` selecting device `S` owns the DeviceProcess `D-S`. When that name is not a
//! valid object name (longer than 253 characters, or not a DNS-1123 subdomain), the name is
//! `<prefix>-<hash>`: `hash` is the first 10 hex digits of SHA-256 over `D/S` (`/` cannot occur
//! in either name, so distinct pairs never hash the same input), and `prefix` is `D-S` lowercased,
//! with every character outside `[a-z0-9-]` replaced by `-`, cut so the whole name fits in 253
//! characters, with leading and trailing `-` removed. The rule depends only on `D` and `S`, so
//! every controller replica and every restart derives the same name.
//!
//! # Label values
//! Label values are limited to 63 characters, but device and deployment names may be up to 253.
//! [`label_value`] keeps valid values as they are and otherwise applies the same prefix-plus-hash
//! rule within 63 characters. Readers that need the exact device use `spec.deviceRef.name`.

use std::collections::BTreeMap;
use std::sync::Arc;

use apollo_crds::{
    conditions::{self, Condition},
    spec_hash, DeviceProcess, DeviceProcessDeployment, DeviceProcessDeploymentStatus,
    DeviceProcessSpec, NetworkSwitch, LABEL_DEPLOYMENT, LABEL_DEVICE_NAME,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::selector::{Selector, SelectorError};

/// Longest object name Kubernetes accepts (DNS-1123 subdomain).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label value Kubernetes accepts.
pub const MAX_LABEL_VALUE_LEN: usize = 63;
/// Hex digits of SHA-256 kept in a shortened name (40 bits: collisions are not a practical concern
/// among the children of one namespace).
const HASH_HEX_LEN: usize = 10;

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

/// Name of the DeviceProcess that `deployment` keeps on `device` (see the module docs).
pub fn child_name(deployment: &str, device: &str) -> String {
    let plain = format!("{deployment}-{device}");
    if plain.len() <= MAX_NAME_LEN && is_dns1123_subdomain(&plain) {
        return plain;
    }
    let hash = short_hash(&format!("{deployment}/{device}"));
    let prefix: String = plain
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NAME_LEN - HASH_HEX_LEN - 1)
        .collect();
    join_prefix_and_hash(prefix.trim_matches('-'), &hash)
}

/// `value` if it is a valid label value, otherwise a stable shortened form (see the module docs).
pub fn label_value(value: &str) -> String {
    if is_label_value(value) {
        return value.to_owned();
    }
    let hash = short_hash(value);
    let prefix: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_LABEL_VALUE_LEN - HASH_HEX_LEN - 1)
        .collect();
    join_prefix_and_hash(
        prefix.trim_matches(|c: char| !c.is_ascii_alphanumeric()),
        &hash,
    )
}

fn join_prefix_and_hash(prefix: &str, hash: &str) -> String {
    if prefix.is_empty() {
        hash.to_owned()
    } else {
        format!("{prefix}-{hash}")
    }
}

fn short_hash(input: &str) -> String {
    let digest = hex::encode(Sha256::digest(input.as_bytes()));
    digest[..HASH_HEX_LEN].to_owned()
}

/// DNS-1123 subdomain: dot-separated labels of `[a-z0-9-]`, each starting and ending with an
/// alphanumeric, at most 253 characters in all.
pub fn is_dns1123_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
                && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
        })
}

/// Label value: empty, or at most 63 characters of `[A-Za-z0-9-_.]` starting and ending with an
/// alphanumeric.
pub fn is_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    value.is_empty()
        || (bytes.len() <= MAX_LABEL_VALUE_LEN
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric))
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

/// Whether the orphan `child` is to be adopted as `want`: it holds `want`'s name and carries the
/// same deployment label, i.e. it was made for a deployment of this name (as a DaemonSet adopts
/// the orphaned Pods its selector matches). Without adoption the name stays taken and every
/// create of it is refused (409).
fn adoptable(child: &DeviceProcess, want: &DeviceProcess) -> bool {
    is_orphan(child)
        && child.labels().get(LABEL_DEPLOYMENT).is_some()
        && child.labels().get(LABEL_DEPLOYMENT) == want.labels().get(LABEL_DEPLOYMENT)
}

/// The DeviceProcesses that must exist for `deployment`, keyed by name: one per switch in the
/// deployment's namespace that its selector matches and that is not being deleted.
pub fn desired_children<'a>(
    deployment: &DeviceProcessDeployment,
    switches: impl IntoIterator<Item = &'a NetworkSwitch>,
) -> Result<BTreeMap<String, DeviceProcess>, DesiredError> {
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

    let mut children = BTreeMap::new();
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
        let name = child_name(deployment_name, device);
        let mut labels = template.metadata.labels.clone();
        labels.insert(LABEL_DEVICE_NAME.to_owned(), label_value(device));
        labels.insert(LABEL_DEPLOYMENT.to_owned(), label_value(deployment_name));
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
        children.insert(name, child);
    }
    Ok(children)
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
            if let Some(patch) = patch.as_object_mut() {
                let metadata = patch
                    .entry("metadata")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(metadata) = metadata.as_object_mut() {
                    metadata.insert("ownerReferences".into(), serde_json::to_value(owners)?);
                }
            }
        }
        if let (Some(metadata), Some(rv)) = (
            patch.as_object_mut().map(|p| {
                p.entry("metadata")
                    .or_insert_with(|| Value::Object(Map::new()))
            }),
            self.existing.metadata.resource_version.as_ref(),
        ) {
            if let Some(metadata) = metadata.as_object_mut() {
                metadata.insert("resourceVersion".into(), Value::String(rv.clone()));
            }
        }
        Ok(patch)
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
    let mut seen = std::collections::BTreeSet::new();
    for child in existing {
        let name = child.name_any();
        if !is_controlled_by(child, owner_uid) {
            let Some(want) = desired.get(&name).filter(|want| adoptable(child, want)) else {
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
        seen.insert(name.clone());
        if child.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match desired.get(&name) {
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
        .filter(|(name, _)| !seen.contains(*name))
        .map(|(_, child)| child.clone())
        .collect();
    plan
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

/// DaemonSet-style status of `deployment`, whose current status is `current`.
///
/// `children` are the children that exist for desired devices after this reconcile's writes.
/// `selector_problem` is the reason nothing could be selected, if any. `now` (RFC 3339) is used
/// only when a condition changes status.
pub fn deployment_status(
    deployment: &DeviceProcessDeployment,
    current_status: Option<&DeviceProcessDeploymentStatus>,
    desired: &BTreeMap<String, DeviceProcess>,
    children: &[&DeviceProcess],
    selector_problem: Option<&str>,
    now: &str,
) -> DeviceProcessDeploymentStatus {
    let current: Vec<&DeviceProcess> = children
        .iter()
        .copied()
        .filter(|c| desired.contains_key(&c.name_any()))
        .collect();
    let count = |pred: &dyn Fn(&DeviceProcess) -> bool| {
        i32::try_from(current.iter().filter(|c| pred(c)).count()).unwrap_or(i32::MAX)
    };
    let up_to_date = |c: &DeviceProcess| {
        desired
            .get(&c.name_any())
            .is_some_and(|want| !needs_update(c, want))
    };
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

    DeviceProcessDeploymentStatus {
        observed_generation: deployment.metadata.generation,
        desired_number_scheduled: i32::try_from(desired.len()).unwrap_or(i32::MAX),
        current_number_scheduled: count(&|_| true),
        updated_number_scheduled: count(&up_to_date),
        number_agent_connected: count(&agent_connected),
        // Observing an outdated spec is not observing the template's.
        number_spec_observed: count(&|c| up_to_date(c) && spec_observed(c)),
        conditions,
    }
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
/// (`numberAgentConnected`, `numberSpecObserved`). Those change with every device during a rollout
/// wave, so they are written at a bounded rate; everything else is written at once.
pub fn only_agent_counts_changed(
    current: &DeviceProcessDeploymentStatus,
    next: &DeviceProcessDeploymentStatus,
) -> bool {
    let without_agent_counts = |s: &DeviceProcessDeploymentStatus| DeviceProcessDeploymentStatus {
        number_agent_connected: 0,
        number_spec_observed: 0,
        ..s.clone()
    };
    !status_changed(
        Some(&without_agent_counts(current)),
        &without_agent_counts(next),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use apollo_crds::{
        DeviceProcessDeploymentSpec, DeviceProcessStatus, DeviceProcessTemplate, NetworkSwitchSpec,
        TemplateMetadata,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use serde_json::json;

    const NS: &str = "fabric";
    const UID: &str = "uid-dpd-1";
    const NOW: &str = "2026-01-01T00:00:00Z";

    fn string_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn deployment(args: &[&str]) -> DeviceProcessDeployment {
        let mut d = DeviceProcessDeployment::new(
            "logger",
            DeviceProcessDeploymentSpec {
                selector: LabelSelector {
                    match_labels: Some(string_map(&[("role", "tor")])),
                    match_expressions: None,
                },
                template: DeviceProcessTemplate {
                    metadata: TemplateMetadata {
                        labels: string_map(&[("app", "logger")]),
                        annotations: string_map(&[("team", "netops")]),
                    },
                    spec: crate::fixtures::workload("alpine:3.19", &["/bin/sh"], args),
                },
            },
        );
        d.metadata.namespace = Some(NS.into());
        d.metadata.uid = Some(UID.into());
        d.metadata.generation = Some(3);
        d
    }

    fn switch(name: &str, namespace: &str, labels: &[(&str, &str)]) -> NetworkSwitch {
        let mut s = NetworkSwitch::new(name, NetworkSwitchSpec::default());
        s.metadata.namespace = Some(namespace.into());
        s.metadata.labels = Some(string_map(labels));
        s
    }

    fn existing(child: &DeviceProcess) -> Arc<DeviceProcess> {
        let mut c = child.clone();
        c.metadata.resource_version = Some("41".into());
        c.metadata.uid = Some(format!("uid-{}", c.name_any()));
        Arc::new(c)
    }

    #[test]
    fn a_process_failure_holds_for_its_generation_and_goes_when_resolved() {
        let d = deployment(&["v1"]);
        let desired =
            desired_children(&d, &[switch("tor1-01", NS, &[("role", "tor")])]).expect("desired");
        let mut status = deployment_status(&d, None, &desired, &[], None, NOW);
        assert_eq!(recorded_failure(&d, Some(&status)), None);
        let failure = ProcessFailure::new(
            REASON_FAILED_CREATE,
            "logger-tor1-01",
            "metadata.labels: Invalid value",
        );
        assert_eq!(
            failure.message,
            "DeviceProcess logger-tor1-01: metadata.labels: Invalid value"
        );
        set_process_failure(&mut status, Some(&failure), d.metadata.generation, NOW);
        let cond = conditions::find(&status.conditions, PROCESS_FAILURE).expect("condition");
        assert_eq!(
            (cond.status.as_str(), cond.reason.as_str()),
            ("True", "FailedCreate")
        );
        assert_eq!(recorded_failure(&d, Some(&status)), Some(failure.clone()));
        // A new generation may carry a fixed template: the failure no longer holds for it.
        let mut changed = d.clone();
        changed.metadata.generation = Some(4);
        assert_eq!(recorded_failure(&changed, Some(&status)), None);
        // Recording it again keeps the transition time; resolving removes the condition.
        let mut again = status.clone();
        set_process_failure(
            &mut again,
            Some(&failure),
            d.metadata.generation,
            "2030-01-01T00:00:00Z",
        );
        assert!(!status_changed(Some(&status), &again));
        set_process_failure(&mut again, None, d.metadata.generation, NOW);
        assert!(conditions::find(&again.conditions, PROCESS_FAILURE).is_none());
        assert!(conditions::find(&again.conditions, SELECTOR_VALID).is_some());
        // Long answers are cut (an Event's note is at most 1024 bytes).
        let long = ProcessFailure::new(REASON_FAILED_UPDATE, "c", &"é".repeat(2000));
        assert!(long.message.len() <= MAX_FAILURE_MESSAGE_LEN);
    }

    #[test]
    fn plain_names_are_deployment_dash_device() {
        assert_eq!(child_name("logger", "tor1-01"), "logger-tor1-01");
        assert_eq!(child_name("logger", "tor1.sfo"), "logger-tor1.sfo");
    }

    #[test]
    fn overlong_names_get_a_stable_hashed_suffix_within_the_limit() {
        let device = "d".repeat(250);
        let name = child_name("logger", &device);
        assert_eq!(name.len(), MAX_NAME_LEN);
        assert!(is_dns1123_subdomain(&name));
        assert!(name.starts_with("logger-ddd"));
        assert_eq!(name, child_name("logger", &device), "stable");
        let other = child_name("logger", &format!("{}e", "d".repeat(249)));
        assert_ne!(name, other, "different devices, different names");
        assert_eq!(
            &name[name.len() - HASH_HEX_LEN..],
            &short_hash(&format!("logger/{device}"))
        );
    }

    #[test]
    fn invalid_names_are_sanitised_and_hashed() {
        let name = child_name("logger", "Tor_01");
        assert!(is_dns1123_subdomain(&name), "{name}");
        assert!(name.starts_with("logger-tor-01-"), "{name}");
        assert_eq!(name.len(), "logger-tor-01-".len() + HASH_HEX_LEN);
    }

    #[test]
    fn dns_subdomain_rule() {
        assert!(is_dns1123_subdomain("a-b.c1"));
        assert!(!is_dns1123_subdomain("a..b"));
        assert!(!is_dns1123_subdomain("-a"));
        assert!(!is_dns1123_subdomain("a-"));
        assert!(!is_dns1123_subdomain("A"));
        assert!(!is_dns1123_subdomain(""));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)));
    }

    #[test]
    fn long_label_values_are_shortened_stably() {
        assert_eq!(label_value("tor1-01"), "tor1-01");
        let long = "x".repeat(100);
        let v = label_value(&long);
        assert!(is_label_value(&v), "{v}");
        assert_eq!(v.len(), MAX_LABEL_VALUE_LEN);
        assert_eq!(v, label_value(&long));
        assert_ne!(v, label_value(&"x".repeat(101)));
    }

    #[test]
    fn desired_set_selects_matching_switches_in_the_namespace() {
        let d = deployment(&["a"]);
        let switches = [
            switch("tor1-01", NS, &[("role", "tor")]),
            switch("tor1-02", NS, &[("role", "tor"), ("rack", "r2")]),
            switch("spine1", NS, &[("role", "spine")]),
            switch("tor9-01", "elsewhere", &[("role", "tor")]),
        ];
        let children = desired_children(&d, &switches).expect("desired");
        assert_eq!(
            children.keys().collect::<Vec<_>>(),
            ["logger-tor1-01", "logger-tor1-02"]
        );
        let child = &children["logger-tor1-01"];
        assert_eq!(child.metadata.namespace.as_deref(), Some(NS));
        assert_eq!(
            child.labels(),
            &string_map(&[
                ("app", "logger"),
                (LABEL_DEVICE_NAME, "tor1-01"),
                (LABEL_DEPLOYMENT, "logger"),
            ])
        );
        assert_eq!(child.annotations(), &string_map(&[("team", "netops")]));
        assert_eq!(child.spec, d.spec.template.spec.for_device("tor1-01"));
        let owner = &child.owner_references()[0];
        assert_eq!(owner.kind, "DeviceProcessDeployment");
        assert_eq!(owner.api_version, "azure.com/v1alpha1");
        assert_eq!(owner.name, "logger");
        assert_eq!(owner.uid, UID);
        assert_eq!(owner.controller, Some(true));
        assert_eq!(owner.block_owner_deletion, Some(true));
    }

    #[test]
    fn switches_being_deleted_are_not_selected() {
        let d = deployment(&["a"]);
        let mut going = switch("tor1-01", NS, &[("role", "tor")]);
        going.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T00:00:00Z".parse().expect("time"),
            ));
        assert!(desired_children(&d, [&going]).expect("desired").is_empty());
    }

    #[test]
    fn invalid_selector_is_an_error_not_an_empty_set() {
        let mut d = deployment(&["a"]);
        d.spec.selector.match_expressions = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                key: "role".into(),
                operator: "Is".into(),
                values: Some(vec!["tor".into()]),
            },
        ]);
        let switches = [switch("tor1-01", NS, &[("role", "tor")])];
        assert!(matches!(
            desired_children(&d, &switches),
            Err(DesiredError::InvalidSelector(_))
        ));
    }

    #[test]
    fn plan_creates_updates_deletes_and_leaves_the_rest() {
        let old = deployment(&["a"]);
        let new = deployment(&["b"]);
        let switches = [
            switch("tor1-01", NS, &[("role", "tor")]),
            switch("tor1-02", NS, &[("role", "tor")]),
            switch("tor1-03", NS, &[("role", "tor")]),
        ];
        let old_children = desired_children(&old, &switches).expect("old");
        let new_children = desired_children(&new, &switches[..2]).expect("new");

        // tor1-01 is already on the new template, tor1-02 on the old one, tor1-03 left the
        // selection; a child of another deployment is ignored.
        let mut foreign = (*existing(&old_children["logger-tor1-03"])).clone();
        foreign.metadata.name = Some("other-tor1-03".into());
        foreign.metadata.owner_references.as_mut().expect("owners")[0].uid = "uid-other".into();
        let current = vec![
            existing(&new_children["logger-tor1-01"]),
            existing(&old_children["logger-tor1-02"]),
            existing(&old_children["logger-tor1-03"]),
            Arc::new(foreign),
        ];
        let p = plan(UID, &new_children, &current);
        assert!(p.create.is_empty());
        assert_eq!(p.unchanged.len(), 1);
        assert_eq!(p.unchanged[0].name_any(), "logger-tor1-01");
        assert_eq!(p.update.len(), 1);
        assert_eq!(p.update[0].existing.name_any(), "logger-tor1-02");
        assert_eq!(p.delete.len(), 1);
        assert_eq!(p.delete[0].name_any(), "logger-tor1-03");

        let nothing = plan(UID, &new_children, &[]);
        assert_eq!(nothing.create.len(), 2);
        assert!(nothing.update.is_empty() && nothing.delete.is_empty());
    }

    #[test]
    fn orphans_made_for_a_deployment_of_this_name_are_adopted_and_no_other() {
        let d = deployment(&["a"]);
        let switches = [
            switch("tor1-01", NS, &[("role", "tor")]),
            switch("tor1-02", NS, &[("role", "tor")]),
            switch("tor1-03", NS, &[("role", "tor")]),
        ];
        let children = desired_children(&d, &switches).expect("desired");
        let orphan = |name: &str| {
            let mut c = (*existing(&children[name])).clone();
            c.metadata.owner_references = None;
            c
        };
        // An orphan of this deployment's name: adopted, even though already on the template.
        let ours = orphan("logger-tor1-01");
        // An orphan holding the name but made for another deployment: not ours to take.
        let mut other_label = orphan("logger-tor1-02");
        other_label
            .labels_mut()
            .insert(LABEL_DEPLOYMENT.into(), "someone-else".into());
        // Controlled by another owner: never taken.
        let mut controlled = (*existing(&children["logger-tor1-03"])).clone();
        controlled
            .metadata
            .owner_references
            .as_mut()
            .expect("owners")[0]
            .uid = "uid-other".into();
        let p = plan(
            UID,
            &children,
            &[Arc::new(ours), Arc::new(other_label), Arc::new(controlled)],
        );
        assert_eq!(p.update.len(), 1);
        assert_eq!(p.update[0].existing.name_any(), "logger-tor1-01");
        assert!(p.update[0].adopts());
        let names: Vec<String> = p.create.iter().map(ResourceExt::name_any).collect();
        assert_eq!(
            names,
            ["logger-tor1-02", "logger-tor1-03"],
            "a create is refused with 409 and retried"
        );
        assert!(p.delete.is_empty(), "orphans are never deleted");

        let patch = p.update[0].merge_patch().expect("patch");
        assert_eq!(
            patch,
            json!({"metadata": {
                "ownerReferences": [{
                    "apiVersion": "azure.com/v1alpha1",
                    "kind": "DeviceProcessDeployment",
                    "name": "logger",
                    "uid": UID,
                    "controller": true,
                    "blockOwnerDeletion": true
                }],
                "resourceVersion": "41"
            }})
        );
        // An update of a child we control never touches its owner references.
        let owned = ChildUpdate {
            existing: existing(&children["logger-tor1-01"]),
            desired: children["logger-tor1-01"].clone(),
        };
        assert!(!owned.adopts());
        assert!(owned.merge_patch().expect("patch")["metadata"]
            .get("ownerReferences")
            .is_none());
    }

    #[test]
    fn plan_of_a_converged_deployment_is_empty() {
        let d = deployment(&["a"]);
        let switches = [switch("tor1-01", NS, &[("role", "tor")])];
        let children = desired_children(&d, &switches).expect("desired");
        let mut child = (*existing(&children["logger-tor1-01"])).clone();
        // Annotations added by other tools and a status do not make a child differ.
        child.annotations_mut().insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            "{}".into(),
        );
        child.status = Some(DeviceProcessStatus::default());
        let p = plan(UID, &children, &[Arc::new(child)]);
        assert!(p.is_empty());
        assert_eq!(p.unchanged.len(), 1);
    }

    #[test]
    fn children_being_deleted_are_left_alone() {
        let d = deployment(&["a"]);
        let switches = [switch("tor1-01", NS, &[("role", "tor")])];
        let children = desired_children(&d, &switches).expect("desired");
        let mut child = (*existing(&children["logger-tor1-01"])).clone();
        child.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(NOW.parse().expect("time")),
        );
        let child = Arc::new(child);
        assert!(plan(UID, &children, std::slice::from_ref(&child)).is_empty());
        assert!(plan(UID, &BTreeMap::new(), &[child]).is_empty());
    }

    #[test]
    fn label_changes_alone_need_an_update_and_removed_labels_become_null() {
        let d = deployment(&["a"]);
        let switches = [switch("tor1-01", NS, &[("role", "tor")])];
        let children = desired_children(&d, &switches).expect("desired");
        let mut stale = (*existing(&children["logger-tor1-01"])).clone();
        stale.labels_mut().insert("old".into(), "x".into());
        let update = ChildUpdate {
            existing: Arc::new(stale),
            desired: children["logger-tor1-01"].clone(),
        };
        assert!(needs_update(&update.existing, &update.desired));
        assert_eq!(
            update.merge_patch().expect("patch"),
            json!({"metadata": {"labels": {"old": null}, "resourceVersion": "41"}})
        );
    }

    #[test]
    fn spec_patch_nulls_removed_fields_and_replaces_lists() {
        let mut old = deployment(&["a"]);
        old.spec.template.spec.execution.working_dir = Some("/srv".into());
        let new = deployment(&["b", "c"]);
        let switches = [switch("tor1-01", NS, &[("role", "tor")])];
        let before = desired_children(&old, &switches).expect("old");
        let after = desired_children(&new, &switches).expect("new");
        let update = ChildUpdate {
            existing: existing(&before["logger-tor1-01"]),
            desired: after["logger-tor1-01"].clone(),
        };
        assert_eq!(
            update.merge_patch().expect("patch"),
            json!({
                "metadata": {"resourceVersion": "41"},
                "spec": {"execution": {"args": ["b", "c"], "workingDir": null}}
            })
        );
    }

    #[test]
    fn merge_patch_diff_of_equal_values_is_empty() {
        let v = json!({"a": {"b": [1, 2]}, "c": "d"});
        assert_eq!(merge_patch_diff(&v, &v), json!({}));
        assert_eq!(
            merge_patch_diff(&json!({"a": 1}), &json!({"b": 2})),
            json!({"a": null, "b": 2})
        );
    }

    fn with_conditions(
        child: &DeviceProcess,
        connected: bool,
        observed_hash: Option<String>,
    ) -> DeviceProcess {
        let mut c = child.clone();
        let mut conds = vec![];
        if connected {
            conds.push(Condition::new(
                conditions::AGENT_CONNECTED,
                conditions::TRUE,
                conditions::REASON_AGENT_CONNECTED,
                conditions::MESSAGE_AGENT_CONNECTED,
                NOW,
            ));
        }
        if observed_hash.is_some() {
            conds.push(Condition::new(
                conditions::SPEC_OBSERVED,
                conditions::TRUE,
                conditions::REASON_SPEC_OBSERVED,
                conditions::MESSAGE_SPEC_OBSERVED,
                NOW,
            ));
        }
        c.status = Some(DeviceProcessStatus {
            observed_spec_hash: observed_hash,
            conditions: conds,
            ..DeviceProcessStatus::default()
        });
        c
    }

    #[test]
    fn status_counts_follow_children_conditions_and_template() {
        let old = deployment(&["a"]);
        let new = deployment(&["b"]);
        let switches = [
            switch("tor1-01", NS, &[("role", "tor")]),
            switch("tor1-02", NS, &[("role", "tor")]),
            switch("tor1-03", NS, &[("role", "tor")]),
        ];
        let desired = desired_children(&new, &switches).expect("desired");
        let stale = desired_children(&old, &switches).expect("stale");
        let current_hash = spec_hash(&desired["logger-tor1-01"].spec);
        let old_hash = spec_hash(&stale["logger-tor1-02"].spec);
        // tor1-01: current template, connected, observed. tor1-02: old template, connected, observed
        // the old spec. tor1-03: missing.
        let one = with_conditions(&desired["logger-tor1-01"], true, Some(current_hash));
        let two = with_conditions(&stale["logger-tor1-02"], true, Some(old_hash));
        let status = deployment_status(&new, None, &desired, &[&one, &two], None, NOW);
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.desired_number_scheduled, 3);
        assert_eq!(status.current_number_scheduled, 2);
        assert_eq!(status.updated_number_scheduled, 1);
        assert_eq!(status.number_agent_connected, 2);
        assert_eq!(
            status.number_spec_observed, 1,
            "tor1-02 observed its spec, but it is old"
        );
        let cond = conditions::find(&status.conditions, SELECTOR_VALID).expect("condition");
        assert_eq!(cond.status, conditions::TRUE);
    }

    #[test]
    fn status_is_unchanged_when_recomputed_later() {
        let d = deployment(&["a"]);
        let desired = BTreeMap::new();
        let first = deployment_status(&d, None, &desired, &[], None, NOW);
        let mut stored = d.clone();
        stored.status = Some(first.clone());
        let again = deployment_status(
            &stored,
            stored.status.as_ref(),
            &desired,
            &[],
            None,
            "2026-02-02T00:00:00Z",
        );
        assert!(!status_changed(Some(&first), &again));
        assert!(status_changed(None, &again));
        let broken = deployment_status(
            &stored,
            stored.status.as_ref(),
            &desired,
            &[],
            Some("bad"),
            NOW,
        );
        assert!(status_changed(Some(&first), &broken));
    }

    #[test]
    fn agent_count_changes_are_told_apart_from_rollout_changes() {
        let current = DeviceProcessDeploymentStatus {
            observed_generation: Some(2),
            desired_number_scheduled: 3,
            current_number_scheduled: 3,
            updated_number_scheduled: 3,
            ..Default::default()
        };
        let agents_moved = DeviceProcessDeploymentStatus {
            number_agent_connected: 2,
            number_spec_observed: 1,
            ..current.clone()
        };
        assert!(only_agent_counts_changed(&current, &agents_moved));
        let rollout_moved = DeviceProcessDeploymentStatus {
            updated_number_scheduled: 2,
            ..agents_moved.clone()
        };
        assert!(!only_agent_counts_changed(&current, &rollout_moved));
    }
}

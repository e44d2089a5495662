//! `DeviceProcess`: one process bound to one device, and the workload types a deployment stamps
//! out per device.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::conditions::{self, Condition};

/// Desired state of one process on one device.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "azure.com",
    version = "v1alpha1",
    kind = "DeviceProcess",
    plural = "deviceprocesses",
    shortname = "dp",
    category = "apollo",
    namespaced,
    status = "DeviceProcessStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Device","type":"string","description":"Device this process is bound to","jsonPath":".spec.deviceRef.name"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","description":"Lifecycle phase","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Connected","type":"string","description":"Whether the device agent reports within the stale window","jsonPath":".status.conditions[?(@.type==\"AgentConnected\")].status"}"#,
    printcolumn = r#"{"name":"SpecObserved","type":"string","description":"Whether the agent has observed the current spec","jsonPath":".status.conditions[?(@.type==\"SpecObserved\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProcessSpec {
    /// The device this process runs on. Only that device's agent may report on it.
    pub device_ref: DeviceRef,
    /// What to run: where the artifact comes from.
    pub artifact: Artifact,
    /// How to run the artifact on the device.
    pub execution: Execution,
}

/// Reference to a device (a NetworkSwitch in the same namespace).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
pub struct DeviceRef {
    /// Name of the device, as its agent identifies itself (APOLLO_DEVICE_NAME).
    pub name: String,
}

/// The artifact a process runs.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
pub struct Artifact {
    /// Kind of artifact, e.g. `oci` for a container image or `http` for a tarball.
    #[serde(rename = "type")]
    pub type_: String,
    /// Where the artifact is fetched from (image reference or URL).
    pub url: String,
    /// Optional content digest (e.g. `sha256:...`) the device verifies after download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// Execution backend on the device.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Run as a container on the device's container runtime.
    Container,
    /// Run as a systemd unit.
    Systemd,
    /// Run as a SysV init script.
    Initd,
}

/// How the device runs the artifact.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Execution {
    /// Backend that runs the process: container, systemd or initd.
    pub backend: Backend,
    /// Entrypoint (argv[0] and fixed leading arguments).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments appended to the command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables set for the process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Working directory of the process; the backend's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

/// One environment variable.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
pub struct EnvVar {
    /// Variable name.
    pub name: String,
    /// Variable value (may be empty).
    #[serde(default)]
    pub value: String,
}

/// Observed state of a DeviceProcess, written only by the gateway.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProcessStatus {
    /// Lifecycle phase. `Pending` while the system only observes (nothing is executed yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// specHash (`sha256:<hex>`) the device agent last reported for this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_spec_hash: Option<String>,
    /// metadata.generation the gateway last projected this status from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// AgentConnected and SpecObserved conditions, keyed by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions::conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// A DeviceProcess spec without the device binding: what a deployment stamps out per device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
pub struct WorkloadSpec {
    /// What to run: where the artifact comes from.
    pub artifact: Artifact,
    /// How to run the artifact on the device.
    pub execution: Execution,
}

impl WorkloadSpec {
    /// The DeviceProcess spec for this workload bound to `device`.
    pub fn for_device(&self, device: &str) -> DeviceProcessSpec {
        DeviceProcessSpec {
            device_ref: DeviceRef {
                name: device.to_owned(),
            },
            artifact: self.artifact.clone(),
            execution: self.execution.clone(),
        }
    }
}

/// Labels and annotations copied onto every DeviceProcess a deployment creates.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
pub struct TemplateMetadata {
    /// Labels for each DeviceProcess (Apollo adds deviceName and deployment labels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations for each DeviceProcess.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Template of the DeviceProcess created for each selected device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
pub struct DeviceProcessTemplate {
    /// Metadata copied onto each DeviceProcess.
    #[serde(default)]
    pub metadata: TemplateMetadata,
    /// Spec of each DeviceProcess; `deviceRef` is filled in per device.
    pub spec: WorkloadSpec,
}

//! Apollo's Kubernetes API: the custom resources operators write and the gateway reports on.
//!
//! Group `azure.com`, version `v1alpha1`, all namespaced:
//! - [`DeviceProcess`]: one unit of work bound to one device (`spec.deviceRef.name`).
//! - [`DeviceProcessDeployment`]: fans a template out to one `DeviceProcess` per selected device.
//! - [`NetworkSwitch`]: the device inventory; its labels are what deployments select on.
//!
//! The YAML under `deploy/crds/` is generated from these types by the `crdgen` binary.
#![forbid(unsafe_code)]

pub mod conditions;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Spec hashing is part of the device protocol (specHash is a wire field); re-exported here.
pub use apollo_protocol::hash::{is_spec_hash, spec_hash};
pub use conditions::Condition;

/// API group of every Apollo resource.
pub const GROUP: &str = "azure.com";
/// API version of every Apollo resource.
pub const VERSION: &str = "v1alpha1";

/// Label put on every DeviceProcess naming the device it is bound to.
pub const LABEL_DEVICE_NAME: &str = "apollo.azure.com/deviceName";
/// Label put on every DeviceProcess created by a deployment, naming that deployment.
pub const LABEL_DEPLOYMENT: &str = "apollo.azure.com/deployment";

/// `status.phase` while a DeviceProcess is only observed (nothing is executed on devices yet).
pub const PHASE_PENDING: &str = "Pending";

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

/// Runs one DeviceProcess on every NetworkSwitch its selector matches (DaemonSet semantics).
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "azure.com",
    version = "v1alpha1",
    kind = "DeviceProcessDeployment",
    plural = "deviceprocessdeployments",
    shortname = "dpd",
    category = "apollo",
    namespaced,
    status = "DeviceProcessDeploymentStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Desired","type":"integer","description":"Devices selected","jsonPath":".status.desiredNumberScheduled"}"#,
    printcolumn = r#"{"name":"Current","type":"integer","description":"DeviceProcesses that exist","jsonPath":".status.currentNumberScheduled"}"#,
    printcolumn = r#"{"name":"Up-to-date","type":"integer","description":"DeviceProcesses with the current template","jsonPath":".status.updatedNumberScheduled"}"#,
    printcolumn = r#"{"name":"Connected","type":"integer","description":"DeviceProcesses whose agent is connected","jsonPath":".status.numberAgentConnected"}"#,
    printcolumn = r#"{"name":"Observed","type":"integer","description":"DeviceProcesses whose agent observed the current spec","jsonPath":".status.numberSpecObserved"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProcessDeploymentSpec {
    /// Selects NetworkSwitch objects in this namespace by label.
    pub selector: LabelSelector,
    /// The DeviceProcess stamped out for each selected device.
    pub template: DeviceProcessTemplate,
}

/// DaemonSet-style counts for a deployment, written by the controller.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProcessDeploymentStatus {
    /// metadata.generation the controller last reconciled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of devices the selector matches.
    #[serde(default)]
    pub desired_number_scheduled: i32,
    /// Number of DeviceProcesses that exist for selected devices.
    #[serde(default)]
    pub current_number_scheduled: i32,
    /// Number of DeviceProcesses whose spec matches the current template.
    #[serde(default)]
    pub updated_number_scheduled: i32,
    /// Number of DeviceProcesses with AgentConnected=True.
    #[serde(default)]
    pub number_agent_connected: i32,
    /// Number of DeviceProcesses with SpecObserved=True.
    #[serde(default)]
    pub number_spec_observed: i32,
    /// Conditions of the deployment, keyed by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions::conditions_schema")]
    pub conditions: Vec<Condition>,
}

/// A network device in the inventory. Deployments select devices by this object's labels.
#[derive(
    CustomResource, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema,
)]
#[kube(
    group = "azure.com",
    version = "v1alpha1",
    kind = "NetworkSwitch",
    plural = "networkswitches",
    shortname = "nsw",
    category = "apollo",
    namespaced,
    derive = "PartialEq",
    printcolumn = r#"{"name":"Site","type":"string","description":"Site of the device","jsonPath":".spec.site"}"#,
    printcolumn = r#"{"name":"Role","type":"string","description":"Role of the device","jsonPath":".spec.role"}"#,
    printcolumn = r#"{"name":"Address","type":"string","description":"Management address","jsonPath":".spec.managementAddress"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSwitchSpec {
    /// Site (data centre, PoP) the device lives in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Role of the device in the network, e.g. `tor`, `spine`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Management address (IP or DNS name) of the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub management_address: Option<String>,
}

/// Every CRD this project defines, in a stable order, with the file crdgen writes it to.
pub fn all_crds() -> Vec<(
    &'static str,
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
)> {
    use kube::CustomResourceExt;
    vec![
        ("deviceprocesses.yaml", DeviceProcess::crd()),
        (
            "deviceprocessdeployments.yaml",
            DeviceProcessDeployment::crd(),
        ),
        ("networkswitches.yaml", NetworkSwitch::crd()),
    ]
}

/// The YAML crdgen writes for each CRD: `(file name, contents)`.
pub fn render_all_crds() -> Result<Vec<(&'static str, String)>, serde_saphyr::ser::Error> {
    all_crds()
        .into_iter()
        .map(|(file, crd)| {
            let body = serde_saphyr::to_string(&crd)?;
            Ok((
                file,
                format!(
                    "# Generated by `cargo run -p apollo-crds --bin crdgen`. Do not edit.\n{body}"
                ),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;
    use serde_json::json;

    fn version0(
        crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    ) -> serde_json::Value {
        serde_json::to_value(&crd.spec.versions[0]).expect("serialise version")
    }

    fn column_names(v: &serde_json::Value) -> Vec<String> {
        v["additionalPrinterColumns"]
            .as_array()
            .expect("printer columns")
            .iter()
            .map(|c| c["name"].as_str().expect("name").to_owned())
            .collect()
    }

    #[test]
    fn device_process_crd_has_short_name_columns_and_status() {
        let crd = DeviceProcess::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("deviceprocesses.azure.com")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["dp".to_owned()]));
        let v = version0(&crd);
        assert_eq!(v["name"], "v1alpha1");
        assert_eq!(v["subresources"]["status"], json!({}));
        assert_eq!(
            column_names(&v),
            ["Device", "Phase", "Connected", "SpecObserved", "Age"]
        );
        let connected = &v["additionalPrinterColumns"][2]["jsonPath"];
        assert_eq!(
            connected,
            ".status.conditions[?(@.type==\"AgentConnected\")].status"
        );
    }

    #[test]
    fn conditions_are_a_list_map_keyed_by_type() {
        let v = version0(&DeviceProcess::crd());
        let conds =
            &v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conds["x-kubernetes-list-type"], "map");
        assert_eq!(conds["x-kubernetes-list-map-keys"], json!(["type"]));
    }

    #[test]
    fn every_schema_property_has_a_description() {
        fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = schema["properties"].as_object() {
                for (name, prop) in props {
                    let here = format!("{path}.{name}");
                    // metadata is Kubernetes' own; apiVersion/kind are generated.
                    let generated = matches!(name.as_str(), "apiVersion" | "kind" | "metadata")
                        && path.is_empty();
                    if !generated && prop.get("description").is_none() {
                        missing.push(here.clone());
                    }
                    walk(&here, prop, missing);
                }
            }
            if schema["items"].is_object() {
                walk(&format!("{path}[]"), &schema["items"], missing);
            }
        }
        for (_, crd) in all_crds() {
            let v = version0(&crd);
            let mut missing = Vec::new();
            walk("", &v["schema"]["openAPIV3Schema"], &mut missing);
            // LabelSelector internals come from k8s-openapi and carry its own descriptions.
            missing.retain(|p| !p.starts_with(".spec.selector."));
            assert!(
                missing.is_empty(),
                "{}: undocumented fields {missing:?}",
                crd.spec.names.kind
            );
        }
    }

    #[test]
    fn deployment_crd_has_counts_and_short_name() {
        let crd = DeviceProcessDeployment::crd();
        assert_eq!(crd.spec.names.short_names, Some(vec!["dpd".to_owned()]));
        let v = version0(&crd);
        assert_eq!(v["subresources"]["status"], json!({}));
        assert_eq!(
            column_names(&v),
            [
                "Desired",
                "Current",
                "Up-to-date",
                "Connected",
                "Observed",
                "Age"
            ]
        );
    }

    #[test]
    fn network_switch_crd_has_short_name_and_no_status() {
        let crd = NetworkSwitch::crd();
        assert_eq!(crd.spec.names.short_names, Some(vec!["nsw".to_owned()]));
        let v = version0(&crd);
        assert!(v
            .get("subresources")
            .is_none_or(|s| s.get("status").is_none()));
        assert_eq!(column_names(&v), ["Site", "Role", "Address", "Age"]);
    }

    #[test]
    fn spec_round_trips_with_camel_case_and_type_field() {
        let spec: DeviceProcessSpec = serde_json::from_value(json!({
            "deviceRef": {"name": "tor1-01"},
            "artifact": {"type": "oci", "url": "alpine:3.19"},
            "execution": {"backend": "container", "command": ["/bin/sh"], "workingDir": "/tmp",
                          "env": [{"name": "A", "value": "1"}]}
        }))
        .expect("parse spec");
        assert_eq!(spec.execution.backend, Backend::Container);
        assert_eq!(spec.execution.working_dir.as_deref(), Some("/tmp"));
        let back = serde_json::to_value(&spec).expect("serialise");
        assert_eq!(back["artifact"]["type"], "oci");
        assert_eq!(back["execution"]["workingDir"], "/tmp");
    }

    #[test]
    fn workload_for_device_sets_device_ref() {
        let w = WorkloadSpec {
            artifact: Artifact {
                type_: "oci".into(),
                url: "alpine".into(),
                digest: None,
            },
            execution: Execution {
                backend: Backend::Systemd,
                command: vec![],
                args: vec!["x".into()],
                env: vec![],
                working_dir: None,
            },
        };
        let spec = w.for_device("tor1-02");
        assert_eq!(spec.device_ref.name, "tor1-02");
        assert_eq!(spec.execution, w.execution);
    }

    #[test]
    fn device_process_spec_hash_ignores_json_field_order_and_tracks_changes() {
        let a: DeviceProcessSpec = serde_json::from_str(
            r#"{"deviceRef":{"name":"d"},"artifact":{"type":"oci","url":"u"},
                "execution":{"backend":"container","args":["x"]}}"#,
        )
        .expect("parse a");
        let b: DeviceProcessSpec = serde_json::from_str(
            r#"{"execution":{"args":["x"],"backend":"container"},
                "artifact":{"url":"u","type":"oci"},"deviceRef":{"name":"d"}}"#,
        )
        .expect("parse b");
        assert_eq!(spec_hash(&a), spec_hash(&b));
        assert!(is_spec_hash(&spec_hash(&a)));
        let mut c = a.clone();
        c.execution.env.push(EnvVar {
            name: "K".into(),
            value: "V".into(),
        });
        assert_ne!(spec_hash(&a), spec_hash(&c));
        let mut d = a.clone();
        d.artifact.digest = Some("sha256:00".into());
        assert_ne!(spec_hash(&a), spec_hash(&d));
    }
}

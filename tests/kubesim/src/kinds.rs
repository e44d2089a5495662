//! The resource types kubesim serves: built-in kinds plus every registered CRD.

use serde_json::{json, Value};

/// Where a resource's objects live. Two served resources may share one store (the two Event views).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey {
    pub group: String,
    pub resource: String,
}

/// How stored objects are shown through a served resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Objects are served as stored (apiVersion rewritten to the requested version).
    Plain,
    /// `events.k8s.io/v1` view over core/v1 events, which is the stored form.
    EventsV1,
}

/// Where `/scale` reads and writes replicas.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleSpec {
    /// Dotted path, e.g. `.spec.replicas`.
    pub spec_replicas_path: String,
    pub status_replicas_path: String,
    pub label_selector_path: Option<String>,
    /// Built-in workloads keep a `LabelSelector` object there; CRDs keep a string.
    pub selector_is_object: bool,
}

/// One `additionalPrinterColumns` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// Everything the server needs to know about one served group/version/resource.
#[derive(Debug, Clone, PartialEq)]
pub struct KindInfo {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    pub status_subresource: bool,
    pub scale: Option<ScaleSpec>,
    pub printer_columns: Vec<PrinterColumn>,
    /// Built-in kinds accept strategic merge patch; custom resources answer 415.
    pub built_in: bool,
    /// Whether writes maintain `metadata.generation`.
    pub tracks_generation: bool,
    /// Custom resources reject PUT without `metadata.resourceVersion`; most built-ins allow it.
    pub allow_unconditional_update: bool,
    pub store: StoreKey,
    pub view: View,
    /// The CRD that defines this resource, if any.
    pub crd_name: Option<String>,
    /// The CRD's `openAPIV3Schema` for this version: list-map keys for apply come from here.
    pub schema: Option<Value>,
}

impl KindInfo {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// Matches `kubectl` names for the resource: plural, singular, short name or kind.
    pub fn answers_to(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.plural == name
            || self.singular == name
            || self.kind.to_ascii_lowercase() == name
            || self.short_names.contains(&name)
    }
}

/// The version every built-in kind is served at.
const BUILT_IN_VERSION: &str = "v1";

/// Scope, subresources and write rules of a built-in kind.
#[derive(Clone, Copy)]
struct Traits {
    namespaced: bool,
    status: bool,
    scale: bool,
    generation: bool,
}

/// A namespaced kind with no subresources whose writes leave `metadata.generation` alone.
const PLAIN: Traits = Traits {
    namespaced: true,
    status: false,
    scale: false,
    generation: false,
};
/// [`PLAIN`] plus a status subresource.
const WITH_STATUS: Traits = Traits {
    status: true,
    ..PLAIN
};
/// A workload: status and scale subresources, and spec writes bump `metadata.generation`.
const WORKLOAD: Traits = Traits {
    status: true,
    scale: true,
    generation: true,
    ..PLAIN
};
/// A cluster-scoped [`WITH_STATUS`] kind.
const CLUSTER_WITH_STATUS: Traits = Traits {
    namespaced: false,
    ..WITH_STATUS
};
/// [`CLUSTER_WITH_STATUS`] whose spec writes bump `metadata.generation`.
const CLUSTER_WITH_STATUS_AND_GENERATION: Traits = Traits {
    generation: true,
    ..CLUSTER_WITH_STATUS
};

/// One row of [`BUILT_INS`].
struct BuiltIn {
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    short_names: &'static [&'static str],
    traits: Traits,
}

impl BuiltIn {
    const fn new(
        group: &'static str,
        kind: &'static str,
        plural: &'static str,
        short_names: &'static [&'static str],
        traits: Traits,
    ) -> Self {
        Self {
            group,
            kind,
            plural,
            short_names,
            traits,
        }
    }
}

/// The built-in kinds, all served at [`BUILT_IN_VERSION`]: group, kind, plural, short names, traits.
const BUILT_INS: &[BuiltIn] = &[
    BuiltIn::new("", "Namespace", "namespaces", &["ns"], CLUSTER_WITH_STATUS),
    BuiltIn::new("", "Event", "events", &["ev"], PLAIN),
    BuiltIn::new("", "ConfigMap", "configmaps", &["cm"], PLAIN),
    BuiltIn::new("", "Secret", "secrets", &[], PLAIN),
    BuiltIn::new("", "Service", "services", &["svc"], WITH_STATUS),
    BuiltIn::new("", "ServiceAccount", "serviceaccounts", &["sa"], PLAIN),
    BuiltIn::new("apps", "StatefulSet", "statefulsets", &["sts"], WORKLOAD),
    BuiltIn::new("apps", "Deployment", "deployments", &["deploy"], WORKLOAD),
    BuiltIn::new("coordination.k8s.io", "Lease", "leases", &[], PLAIN),
    BuiltIn::new(
        "discovery.k8s.io",
        "EndpointSlice",
        "endpointslices",
        &[],
        PLAIN,
    ),
    BuiltIn::new("events.k8s.io", "Event", "events", &["ev"], PLAIN),
    BuiltIn::new(
        "apiextensions.k8s.io",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        &["crd", "crds"],
        CLUSTER_WITH_STATUS_AND_GENERATION,
    ),
];

/// Columns `kubectl get` shows for built-ins beyond Name and Age, where a JSONPath can express them.
fn built_in_columns(group: &str, plural: &str) -> Vec<PrinterColumn> {
    let column = |name: &str, type_: &str, json_path: &str| PrinterColumn {
        name: name.into(),
        type_: type_.into(),
        format: String::new(),
        description: String::new(),
        priority: 0,
        json_path: json_path.into(),
    };
    let mut columns = match (group, plural) {
        ("", "namespaces") => vec![column("Status", "string", ".status.phase")],
        ("coordination.k8s.io", "leases") => {
            vec![column("Holder", "string", ".spec.holderIdentity")]
        }
        ("", "events") => vec![
            column("Type", "string", ".type"),
            column("Reason", "string", ".reason"),
            column("Object", "string", ".involvedObject.name"),
            column("Message", "string", ".message"),
        ],
        ("apps", "statefulsets") | ("apps", "deployments") => vec![
            column("Replicas", "integer", ".spec.replicas"),
            column("Ready", "integer", ".status.readyReplicas"),
        ],
        _ => Vec::new(),
    };
    columns.push(age_column());
    columns
}

/// The built-in kinds every kubesim serves.
pub fn built_in_kinds() -> Vec<KindInfo> {
    BUILT_INS
        .iter()
        .map(|b| {
            let (store, view) = if b.plural == "events" {
                let view = if b.group == "events.k8s.io" {
                    View::EventsV1
                } else {
                    View::Plain
                };
                (
                    StoreKey {
                        group: String::new(),
                        resource: "events".into(),
                    },
                    view,
                )
            } else {
                (
                    StoreKey {
                        group: b.group.into(),
                        resource: b.plural.into(),
                    },
                    View::Plain,
                )
            };
            KindInfo {
                group: b.group.into(),
                version: BUILT_IN_VERSION.into(),
                kind: b.kind.into(),
                plural: b.plural.into(),
                singular: b.kind.to_ascii_lowercase(),
                short_names: b.short_names.iter().map(|s| s.to_string()).collect(),
                // kubectl's `get all` expands the "all" category.
                categories: if matches!(b.plural, "services" | "statefulsets" | "deployments") {
                    vec!["all".into()]
                } else {
                    Vec::new()
                },
                namespaced: b.traits.namespaced,
                status_subresource: b.traits.status,
                scale: b.traits.scale.then(|| ScaleSpec {
                    spec_replicas_path: ".spec.replicas".into(),
                    status_replicas_path: ".status.replicas".into(),
                    label_selector_path: Some(".spec.selector".into()),
                    selector_is_object: true,
                }),
                printer_columns: built_in_columns(b.group, b.plural),
                built_in: true,
                tracks_generation: b.traits.generation,
                allow_unconditional_update: true,
                store,
                view,
                crd_name: None,
                schema: None,
            }
        })
        .collect()
}

fn str_field(value: &Value, path: &[&str]) -> String {
    let mut current = value;
    for key in path {
        current = &current[*key];
    }
    current.as_str().unwrap_or_default().to_string()
}

fn string_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The served resources a CRD defines: one [`KindInfo`] per served version, all sharing one store.
pub fn kinds_from_crd(crd: &Value) -> Vec<KindInfo> {
    let spec = &crd["spec"];
    let group = str_field(spec, &["group"]);
    let names = &spec["names"];
    let plural = str_field(names, &["plural"]);
    let kind = str_field(names, &["kind"]);
    let singular = match str_field(names, &["singular"]) {
        s if s.is_empty() => kind.to_ascii_lowercase(),
        s => s,
    };
    let namespaced = spec["scope"].as_str() != Some("Cluster");
    let crd_name = str_field(crd, &["metadata", "name"]);
    let Some(versions) = spec["versions"].as_array() else {
        return Vec::new();
    };
    versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .map(|v| {
            let subresources = &v["subresources"];
            let scale = subresources
                .get("scale")
                .filter(|s| s.is_object())
                .map(|s| ScaleSpec {
                    spec_replicas_path: str_field(s, &["specReplicasPath"]),
                    status_replicas_path: str_field(s, &["statusReplicasPath"]),
                    label_selector_path: s["labelSelectorPath"].as_str().map(str::to_string),
                    selector_is_object: false,
                });
            let mut printer_columns: Vec<PrinterColumn> = v["additionalPrinterColumns"]
                .as_array()
                .map(|columns| {
                    columns
                        .iter()
                        .map(|c| PrinterColumn {
                            name: str_field(c, &["name"]),
                            type_: str_field(c, &["type"]),
                            format: str_field(c, &["format"]),
                            description: str_field(c, &["description"]),
                            priority: c["priority"].as_i64().unwrap_or(0),
                            json_path: str_field(c, &["jsonPath"]),
                        })
                        .collect()
                })
                .unwrap_or_default();
            if printer_columns.is_empty() {
                printer_columns.push(age_column());
            }
            KindInfo {
                group: group.clone(),
                version: str_field(v, &["name"]),
                kind: kind.clone(),
                plural: plural.clone(),
                singular: singular.clone(),
                short_names: string_list(&names["shortNames"]),
                categories: string_list(&names["categories"]),
                namespaced,
                status_subresource: subresources.get("status").is_some_and(|s| s.is_object()),
                scale,
                printer_columns,
                built_in: false,
                tracks_generation: true,
                allow_unconditional_update: false,
                store: StoreKey {
                    group: group.clone(),
                    resource: plural.clone(),
                },
                view: View::Plain,
                crd_name: Some(crd_name.clone()),
                schema: v["schema"].get("openAPIV3Schema").cloned(),
            }
        })
        .collect()
}

/// The Age column the apiserver shows when a CRD defines no printer columns.
pub fn age_column() -> PrinterColumn {
    PrinterColumn {
        name: "Age".into(),
        type_: "date".into(),
        format: String::new(),
        description: "CreationTimestamp is a timestamp representing the server time when this object was created.".into(),
        priority: 0,
        json_path: ".metadata.creationTimestamp".into(),
    }
}

/// The status a registered CRD reports: names accepted and established at once.
pub fn crd_status(crd: &Value, now: &str) -> Value {
    let spec = &crd["spec"];
    let stored: Vec<Value> = spec["versions"]
        .as_array()
        .map(|versions| {
            versions
                .iter()
                .filter(|v| v["storage"].as_bool().unwrap_or(false))
                .map(|v| v["name"].clone())
                .collect()
        })
        .unwrap_or_default();
    let condition = |type_: &str, reason: &str, message: &str| json!({"type": type_, "status": "True", "lastTransitionTime": now, "reason": reason, "message": message});
    json!({
        "acceptedNames": spec["names"].clone(),
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": stored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crd_with_two_served_versions_yields_two_kinds_sharing_a_store() {
        let crd = json!({
            "metadata": {"name": "foos.example.com"},
            "spec": {
                "group": "example.com",
                "scope": "Namespaced",
                "names": {"plural": "foos", "kind": "Foo", "shortNames": ["fo"]},
                "versions": [
                    {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}}},
                    {"name": "v1beta1", "served": true, "storage": false},
                    {"name": "v1alpha1", "served": false, "storage": false},
                ],
            },
        });
        let kinds = kinds_from_crd(&crd);
        assert_eq!(kinds.len(), 2);
        assert_eq!(kinds[0].store, kinds[1].store);
        assert!(kinds[0].status_subresource && kinds[0].scale.is_some());
        assert!(!kinds[1].status_subresource);
        assert_eq!(kinds[0].singular, "foo");
        assert_eq!(kinds[0].printer_columns, vec![age_column()]);
        assert!(kinds[0].answers_to("fo") && kinds[0].answers_to("Foo"));
    }
}

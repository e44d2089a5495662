//! Shape of the generated CRDs and of the types' JSON.
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
    let conds = &v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
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
                let generated =
                    matches!(name.as_str(), "apiVersion" | "kind" | "metadata") && path.is_empty();
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
            "Available",
            "Connected",
            "Observed",
            "Progressing",
            "Age"
        ]
    );
    // The agent counts only with `-o wide`.
    let columns = v["additionalPrinterColumns"].as_array().expect("columns");
    assert_eq!(columns[4]["priority"], 1);
    assert_eq!(columns[5]["priority"], 1);
    assert_eq!(
        columns[6]["jsonPath"],
        ".status.conditions[?(@.type==\"Progressing\")].reason"
    );
}

#[test]
fn deployment_spec_defaults_to_a_rolling_update_of_a_quarter() {
    let spec: DeviceProcessDeploymentSpec = serde_json::from_value(json!({
        "selector": {"matchLabels": {"role": "tor"}},
        "template": {"spec": {"artifact": {"type": "oci", "url": "u"},
                              "execution": {"backend": "container"}}}
    }))
    .expect("parse spec");
    assert!(!spec.paused);
    assert_eq!(spec.min_ready_seconds, 0);
    assert_eq!(spec.progress_deadline_seconds, 600);
    assert_eq!(
        spec.update_strategy.type_,
        UpdateStrategyType::RollingUpdate
    );
    let rolling = &spec.update_strategy.rolling_update;
    assert_eq!(
        rolling.max_unavailable,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("25%".into())
    );
    assert_eq!(rolling.max_failed, 0);
    assert!(rolling.canary.is_none() && rolling.max_unavailable_per_group.is_none());

    // The apiserver applies the same defaults (they are in the schema) and validates with CEL.
    let v = version0(&DeviceProcessDeployment::crd());
    let props = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(props["progressDeadlineSeconds"]["default"], 600);
    let max_unavailable =
        &props["updateStrategy"]["properties"]["rollingUpdate"]["properties"]["maxUnavailable"];
    assert_eq!(max_unavailable["default"], "25%");
    assert_eq!(max_unavailable["nullable"], false);
    assert!(max_unavailable["x-kubernetes-validations"][0]["rule"].is_string());
    assert!(props["selector"]["x-kubernetes-validations"][0]["rule"]
        .as_str()
        .is_some_and(|r| r.contains("size(self.matchLabels) > 0")));
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

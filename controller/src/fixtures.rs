//! Objects the unit tests build (compiled for tests only).

use std::collections::BTreeMap;
use std::sync::Arc;

use apollo_crds::{
    Artifact, Backend, DeviceProcess, DeviceProcessDeployment, DeviceProcessDeploymentSpec,
    DeviceProcessTemplate, Execution, NetworkSwitch, NetworkSwitchSpec, TemplateMetadata,
    UpdateStrategy, WorkloadSpec, DEFAULT_PROGRESS_DEADLINE_SECONDS,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;

/// Namespace of the fixtures.
pub(crate) const NS: &str = "fabric";
/// uid of [`deployment`].
pub(crate) const UID: &str = "uid-dpd-1";
/// A time conditions are stamped with.
pub(crate) const NOW: &str = "2026-01-01T00:00:00Z";

/// A container workload of the OCI image `url` running `command` with `args`.
pub(crate) fn workload(url: &str, command: &[&str], args: &[&str]) -> WorkloadSpec {
    let owned = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
    WorkloadSpec {
        artifact: Artifact {
            type_: "oci".into(),
            url: url.into(),
            digest: None,
        },
        execution: Execution {
            backend: Backend::Container,
            command: owned(command),
            args: owned(args),
            env: vec![],
            working_dir: None,
        },
    }
}

/// A label (or annotation) map.
pub(crate) fn string_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The deployment spec `selector` + `template` with every rollout field at its default.
pub(crate) fn spec(
    selector: LabelSelector,
    template: DeviceProcessTemplate,
) -> DeviceProcessDeploymentSpec {
    DeviceProcessDeploymentSpec {
        selector,
        template,
        paused: false,
        min_ready_seconds: 0,
        progress_deadline_seconds: DEFAULT_PROGRESS_DEADLINE_SECONDS,
        update_strategy: UpdateStrategy::default(),
    }
}

/// The deployment `logger` in [`NS`] (uid [`UID`], generation 3) selecting `role=tor`, its
/// template running `/bin/sh` with `args`.
pub(crate) fn deployment(args: &[&str]) -> DeviceProcessDeployment {
    let mut d = DeviceProcessDeployment::new(
        "logger",
        spec(
            LabelSelector {
                match_labels: Some(string_map(&[("role", "tor")])),
                match_expressions: None,
            },
            DeviceProcessTemplate {
                metadata: TemplateMetadata {
                    labels: string_map(&[("app", "logger")]),
                    annotations: string_map(&[("team", "netops")]),
                },
                spec: workload("alpine:3.19", &["/bin/sh"], args),
            },
        ),
    );
    d.metadata.namespace = Some(NS.into());
    d.metadata.uid = Some(UID.into());
    d.metadata.generation = Some(3);
    d
}

/// The NetworkSwitch `name` in `namespace` with `labels`.
pub(crate) fn switch(name: &str, namespace: &str, labels: &[(&str, &str)]) -> NetworkSwitch {
    let mut s = NetworkSwitch::new(name, NetworkSwitchSpec::default());
    s.metadata.namespace = Some(namespace.into());
    s.metadata.labels = Some(string_map(labels));
    s
}

/// `child` as the apiserver would have it (resourceVersion 41, a uid).
pub(crate) fn existing(child: &DeviceProcess) -> Arc<DeviceProcess> {
    let mut c = child.clone();
    c.metadata.resource_version = Some("41".into());
    c.metadata.uid = Some(format!("uid-{}", c.name_any()));
    Arc::new(c)
}

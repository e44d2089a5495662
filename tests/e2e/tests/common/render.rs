//! The kustomize render of `deploy/` (the real kubectl, offline) and typed views of its workloads.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, PodTemplateSpec, Service};
use serde_json::Value;

use super::{host_port_of_url, repo_root, NAMESPACE, SAMPLE_POD_IP};

/// `kubectl kustomize deploy/` as text.
pub fn rendered_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        let out = Command::new(apollo_test_support::kubectl_program())
            .arg("kustomize")
            .arg(repo_root().join("deploy"))
            .output()
            .expect("run kubectl kustomize");
        assert!(
            out.status.success(),
            "kubectl kustomize deploy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 render")
    })
}

/// Every object of the render.
pub fn rendered() -> &'static [Value] {
    static RENDERED: OnceLock<Vec<Value>> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(rendered_text()).expect("parse the render");
        docs.into_iter().filter(|d| !d.is_null()).collect()
    })
}

pub fn objects<K: serde::de::DeserializeOwned>(kind: &str) -> Vec<K> {
    rendered()
        .iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| serde_json::from_value(d.clone()).unwrap_or_else(|e| panic!("{kind}: {e}")))
        .collect()
}

/// A pod-running object of the render: its name, what its pods would be called, and their template.
pub struct Workload {
    pub kind: &'static str,
    pub name: String,
    pub pod_name: String,
    pub template: PodTemplateSpec,
}

pub fn workloads() -> Vec<Workload> {
    let mut out = Vec::new();
    for d in objects::<Deployment>("Deployment") {
        let name = d.metadata.name.clone().unwrap_or_default();
        out.push(Workload {
            kind: "Deployment",
            pod_name: format!("{name}-5d9c7b8f4-x2k9q"),
            name,
            template: d.spec.expect("deployment spec").template,
        });
    }
    for s in objects::<StatefulSet>("StatefulSet") {
        let name = s.metadata.name.clone().unwrap_or_default();
        out.push(Workload {
            kind: "StatefulSet",
            pod_name: format!("{name}-0"),
            name,
            template: s.spec.expect("statefulset spec").template,
        });
    }
    assert!(
        rendered()
            .iter()
            .all(|d| !matches!(d["kind"].as_str(), Some("DaemonSet" | "Job" | "CronJob"))),
        "a new kind of workload: teach this test to read it"
    );
    out
}

pub fn containers(w: &Workload) -> Vec<Container> {
    let spec = w.template.spec.clone().expect("pod spec");
    spec.init_containers
        .unwrap_or_default()
        .into_iter()
        .chain(spec.containers)
        .collect()
}

/// The container's environment as its process would see it; downward-API values get what the
/// kubelet would fill in for the first pod of `w`.
pub fn container_env(w: &Workload, c: &Container) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in c.env.clone().unwrap_or_default() {
        let value = match (var.value, var.value_from) {
            (Some(v), None) => v,
            (None, Some(from)) => {
                let field = from
                    .field_ref
                    .unwrap_or_else(|| panic!("{}: env {} is not a fieldRef", w.name, var.name))
                    .field_path;
                match field.as_str() {
                    "metadata.name" => w.pod_name.clone(),
                    "metadata.namespace" => NAMESPACE.to_owned(),
                    "status.podIP" => SAMPLE_POD_IP.to_owned(),
                    other => panic!("{}: env {} uses fieldRef {other}", w.name, var.name),
                }
            }
            _ => panic!(
                "{}: env {} has neither value nor valueFrom",
                w.name, var.name
            ),
        };
        env.insert(var.name, value);
    }
    env
}

pub fn command_line(c: &Container) -> Vec<String> {
    let mut argv = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    argv
}

/// The ServiceAccount the pods running `program` use in the render.
pub fn service_account_running(program: &str) -> String {
    let found: Vec<String> = workloads()
        .iter()
        .filter(|w| {
            containers(w)
                .iter()
                .any(|c| command_line(c).first().map(String::as_str) == Some(program))
        })
        .filter_map(|w| w.template.spec.as_ref()?.service_account_name.clone())
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one workload with a ServiceAccount runs {program}: {found:?}"
    );
    found[0].clone()
}

pub fn named_port(c: &Container, name: &str) -> Option<u16> {
    c.ports
        .as_ref()?
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| p.container_port as u16)
}

pub fn service(name: &str) -> Service {
    objects::<Service>("Service")
        .into_iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no Service {name} in the render"))
}

pub fn service_has_port(name: &str, port: u16) -> bool {
    service(name)
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .iter()
        .any(|p| p.port == i32::from(port))
}

/// The Redis URL names a Service of the render, on a port that Service exposes.
pub fn assert_redis_is_the_rendered_service(who: &str, url: &str) {
    let (host, port) = host_port_of_url(url);
    assert!(
        service_has_port(&host, port),
        "{who}: --redis-url {url} is not a Service port of the render"
    );
}

pub fn assert_probes_hit_admin(w: &Workload, c: &Container, admin_port: u16) {
    assert_eq!(
        named_port(c, "admin"),
        Some(admin_port),
        "{}: container port `admin` must be the --admin-listen port",
        w.name
    );
    for (what, probe) in [
        ("readiness", c.readiness_probe.as_ref()),
        ("liveness", c.liveness_probe.as_ref()),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{}: no HTTP {what} probe", w.name));
        let expected = if what == "readiness" {
            "/readyz"
        } else {
            "/healthz"
        };
        assert_eq!(
            get.path.as_deref(),
            Some(expected),
            "{}: {what} path",
            w.name
        );
        assert_eq!(
            serde_json::to_value(&get.port).expect("port"),
            Value::from("admin"),
            "{}: {what} probe port",
            w.name
        );
    }
}

/// The directory of `file` is mounted from a Secret volume.
pub fn assert_secret_mounted(w: &Workload, c: &Container, file: &Path) {
    let dir = file.parent().expect("secret file in a directory");
    let mount = c
        .volume_mounts
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|m| Path::new(&m.mount_path) == dir)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {}", w.name, dir.display()));
    let volumes = w
        .template
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let volume = volumes
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("{}: no volume {}", w.name, mount.name));
    assert!(
        volume.secret.is_some(),
        "{}: {} must come from a Secret",
        w.name,
        dir.display()
    );
}

//! `kubectl apply --server-side --dry-run=server -k deploy/` against the real kube-apiserver: every
//! manifest of the render is validated by Kubernetes itself (schemas, CRD structural schemas,
//! RBAC objects, admission including Pod Security), as a first install would be, and nothing but
//! the install namespace is left behind.
//!
//! What makes the dry run meaningful: only the Namespace is applied for real first (a dry-run
//! create in a namespace that does not exist is refused by the NamespaceLifecycle admission before
//! any validation). Everything else, the CRDs included, does not exist beforehand, so each object
//! is validated as a creation (for CRDs the full structural-schema validation, not the ratcheting
//! of an update). The namespace carries the render's `pod-security.kubernetes.io/warn: restricted`
//! label, so a workload whose pod template breaks the restricted Pod Security Standard comes back
//! as a warning, which fails the test. The render holds no custom resources, so no CRD has to be
//! Established for the dry run; the test says so if that changes.

mod common;

use std::collections::BTreeSet;

use apollo_test_support::ControlPlane;
use serde_json::Value;

use common::render::{rendered, rendered_text};
use common::{repo_root, NAMESPACE};

/// `kind.group/name` as kubectl prints an applied object (`service/apollo-router`,
/// `customresourcedefinition.apiextensions.k8s.io/deviceprocesses.azure.com`).
fn kubectl_name(doc: &Value) -> String {
    let kind = doc["kind"].as_str().expect("kind").to_lowercase();
    let api_version = doc["apiVersion"].as_str().expect("apiVersion");
    let name = doc["metadata"]["name"].as_str().expect("name");
    match api_version.split_once('/') {
        Some((group, _)) => format!("{kind}.{group}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn the_whole_render_passes_a_server_side_dry_run_on_the_real_apiserver() {
    let docs = rendered();
    let crd_groups: BTreeSet<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .filter_map(|d| d["spec"]["group"].as_str())
        .collect();
    let custom: Vec<String> = docs
        .iter()
        .filter(|d| {
            d["apiVersion"]
                .as_str()
                .and_then(|v| v.split_once('/'))
                .is_some_and(|(group, _)| crd_groups.contains(group))
        })
        .map(kubectl_name)
        .collect();
    assert!(
        custom.is_empty(),
        "the render now holds custom resources {custom:?}: apply their CRDs for real and wait \
         until they are Established before the dry run"
    );

    let cp = ControlPlane::shared().await;
    for doc in docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
    {
        let name = doc["metadata"]["name"].as_str().expect("CRD name");
        let out = cp.kubectl(["get", "crd", name, "--ignore-not-found"]).await;
        assert!(
            out.status.success() && out.stdout.is_empty(),
            "CRD {name} exists before the dry run: {}",
            text(&out)
        );
    }

    // The install namespace, for real, exactly as the render has it.
    let namespaces: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Namespace").collect();
    assert_eq!(namespaces.len(), 1, "the render creates its namespace");
    assert_eq!(namespaces[0]["metadata"]["name"], NAMESPACE);
    let dir = tempfile::tempdir().expect("tempdir");
    let ns_file = dir.path().join("namespace.json");
    std::fs::write(&ns_file, namespaces[0].to_string()).expect("write the namespace");
    let out = cp
        .kubectl([
            "apply".as_ref(),
            "--server-side".as_ref(),
            "-f".as_ref(),
            ns_file.as_os_str(),
        ])
        .await;
    assert!(out.status.success(), "create {NAMESPACE}: {}", text(&out));

    let deploy = repo_root().join("deploy");
    let out = cp
        .kubectl([
            "apply".as_ref(),
            "--server-side".as_ref(),
            "--dry-run=server".as_ref(),
            "-k".as_ref(),
            deploy.as_os_str(),
        ])
        .await;
    assert!(
        out.status.success(),
        "kube-apiserver refuses part of `kubectl apply -k deploy/`:\n{}\nrender:\n{}",
        text(&out),
        rendered_text()
    );
    // Warnings (Pod Security, deprecated APIs, unknown fields) come on stderr.
    assert!(
        out.stderr.is_empty(),
        "kube-apiserver warns about the render:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applied: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            l.strip_suffix(" serverside-applied (server dry run)")
                .unwrap_or_else(|| panic!("not a dry-run apply: {l}"))
                .to_owned()
        })
        .collect();
    let expected: BTreeSet<String> = docs.iter().map(kubectl_name).collect();
    assert_eq!(expected.len(), docs.len(), "every object once");
    assert_eq!(
        applied, expected,
        "every object of the render, and only those"
    );

    // A dry run: nothing but the namespace was created.
    let mut get = vec!["-n".to_owned(), NAMESPACE.to_owned(), "get".to_owned()];
    get.extend(
        docs.iter()
            .filter(|d| d["kind"] != "Namespace")
            .map(kubectl_name),
    );
    get.push("--ignore-not-found".to_owned());
    let out = cp.kubectl(&get).await;
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "objects exist after a dry run: {}",
        text(&out)
    );
}

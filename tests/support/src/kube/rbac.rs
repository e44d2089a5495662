//! The RBAC of `deploy/rbac/`, applied for one test namespace: the same rules, the
//! ServiceAccounts and namespaced objects in the test namespace, cluster-scoped objects named
//! `<name>-<namespace>` (as a kustomize overlay deploying Apollo into a second namespace would),
//! so concurrent tests never share or overwrite each other's bindings.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams};
use serde_json::Value;

use super::{workspace_root, TEST_FIELD_MANAGER};

/// An Apollo component with an identity of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// apollo-gateway.
    Gateway,
    /// apollo-controller.
    Controller,
    /// apollo-router (no Kubernetes access at all).
    Router,
}

impl Component {
    /// Every component.
    pub const ALL: [Component; 3] = [Component::Gateway, Component::Controller, Component::Router];

    /// Its ServiceAccount (as in `deploy/rbac/`).
    pub fn service_account(self) -> &'static str {
        match self {
            Component::Gateway => "apollo-gateway",
            Component::Controller => "apollo-controller",
            Component::Router => "apollo-router",
        }
    }

    fn rbac_file(self) -> &'static str {
        match self {
            Component::Gateway => "gateway.yaml",
            Component::Controller => "controller.yaml",
            Component::Router => "router.yaml",
        }
    }
}

/// The documents of `deploy/rbac/<component>.yaml`, rewritten for `namespace`; with
/// `suffix_cluster_objects`, cluster-scoped objects are named `<name>-<namespace>` (tests: many
/// namespaces on one control plane), otherwise they keep their names (one Apollo per cluster, as
/// `kubectl apply -k deploy/` installs it).
pub fn render(component: Component, namespace: &str, suffix_cluster_objects: bool) -> Vec<Value> {
    let path = workspace_root()
        .join("deploy/rbac")
        .join(component.rbac_file());
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
    docs.into_iter()
        .filter(|d| !d.is_null())
        .map(|doc| rewrite(doc, namespace, suffix_cluster_objects))
        .collect()
}

fn rewrite(mut doc: Value, namespace: &str, suffix: bool) -> Value {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let cluster_scoped = matches!(kind.as_str(), "ClusterRole" | "ClusterRoleBinding");
    if cluster_scoped && suffix {
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        doc["metadata"]["name"] = Value::String(format!("{name}-{namespace}"));
    } else if !cluster_scoped {
        doc["metadata"]["namespace"] = Value::String(namespace.to_owned());
    }
    if let Some(subjects) = doc.get_mut("subjects").and_then(Value::as_array_mut) {
        for subject in subjects {
            if subject["kind"] == "ServiceAccount" {
                subject["namespace"] = Value::String(namespace.to_owned());
            }
        }
    }
    if suffix && doc["roleRef"]["kind"] == "ClusterRole" {
        let name = doc["roleRef"]["name"].as_str().unwrap_or_default();
        doc["roleRef"]["name"] = Value::String(format!("{name}-{namespace}"));
    }
    doc
}

/// Applies the RBAC of every component for `namespace` (server-side apply); see [`render`].
pub async fn apply(client: &kube::Client, namespace: &str, suffix_cluster_objects: bool) {
    for component in Component::ALL {
        for doc in render(component, namespace, suffix_cluster_objects) {
            apply_one(client, namespace, doc).await;
        }
    }
}

async fn apply_one(client: &kube::Client, namespace: &str, doc: Value) {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let name = doc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let params = PatchParams::apply(TEST_FIELD_MANAGER).force();
    let what = format!("apply {kind} {name}");
    let result = match kind.as_str() {
        "ServiceAccount" => {
            let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
            api.patch(&name, &params, &Patch::Apply(&doc))
                .await
                .map(drop)
        }
        "Role" => {
            let api: Api<Role> = Api::namespaced(client.clone(), namespace);
            api.patch(&name, &params, &Patch::Apply(&doc))
                .await
                .map(drop)
        }
        "RoleBinding" => {
            let api: Api<RoleBinding> = Api::namespaced(client.clone(), namespace);
            api.patch(&name, &params, &Patch::Apply(&doc))
                .await
                .map(drop)
        }
        "ClusterRole" => {
            let api: Api<ClusterRole> = Api::all(client.clone());
            api.patch(&name, &params, &Patch::Apply(&doc))
                .await
                .map(drop)
        }
        "ClusterRoleBinding" => {
            let api: Api<ClusterRoleBinding> = Api::all(client.clone());
            api.patch(&name, &params, &Patch::Apply(&doc))
                .await
                .map(drop)
        }
        other => panic!("deploy/rbac holds a {other}, which the test harness does not apply"),
    };
    result.unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_rbac_is_rewritten_for_the_namespace() {
        let docs = render(Component::Gateway, "t-1", true);
        let binding = docs
            .iter()
            .find(|d| d["kind"] == "ClusterRoleBinding")
            .expect("a ClusterRoleBinding");
        assert_eq!(binding["metadata"]["name"], "apollo-gateway-t-1");
        assert_eq!(binding["roleRef"]["name"], "apollo-gateway-t-1");
        assert_eq!(binding["subjects"][0]["namespace"], "t-1");
        let role = docs.iter().find(|d| d["kind"] == "Role").expect("a Role");
        assert_eq!(role["metadata"]["namespace"], "t-1");
        let rules = docs
            .iter()
            .find(|d| d["kind"] == "ClusterRole")
            .expect("a ClusterRole")["rules"]
            .clone();
        assert!(rules.to_string().contains("deviceprocesses/status"));
        let plain = render(Component::Gateway, "apollo-system", false);
        let binding = plain
            .iter()
            .find(|d| d["kind"] == "ClusterRoleBinding")
            .expect("a ClusterRoleBinding");
        assert_eq!(binding["metadata"]["name"], "apollo-gateway");
        assert_eq!(binding["subjects"][0]["namespace"], "apollo-system");
        assert!(binding["metadata"].get("namespace").is_none());
    }
}

//! What each component calls in Kubernetes, and the rules the render grants its ServiceAccount.

use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};

use super::render::objects;
use super::NAMESPACE;

/// Where a rule applies: every namespace, or one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Cluster,
    Namespace(String),
}

#[derive(Debug)]
pub struct Grant {
    pub scope: Scope,
    pub rule: PolicyRule,
}

/// The rules bound to service account `sa` of the install namespace.
pub fn grants_of(sa: &str) -> Vec<Grant> {
    let cluster_roles = objects::<ClusterRole>("ClusterRole");
    let roles = objects::<Role>("Role");
    let binds_sa = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(NAMESPACE)
        })
    };
    let cluster_role_rules = |name: &str| -> Vec<PolicyRule> {
        cluster_roles
            .iter()
            .find(|r| r.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("a binding names the missing ClusterRole {name}"))
            .rules
            .clone()
            .unwrap_or_default()
    };
    let mut grants = Vec::new();
    for b in objects::<ClusterRoleBinding>("ClusterRoleBinding") {
        if binds_sa(&b.subjects) {
            assert_eq!(b.role_ref.kind, "ClusterRole");
            for rule in cluster_role_rules(&b.role_ref.name) {
                grants.push(Grant {
                    scope: Scope::Cluster,
                    rule,
                });
            }
        }
    }
    for b in objects::<RoleBinding>("RoleBinding") {
        if !binds_sa(&b.subjects) {
            continue;
        }
        let ns = b.metadata.namespace.clone().expect("RoleBinding namespace");
        let rules = match b.role_ref.kind.as_str() {
            "ClusterRole" => cluster_role_rules(&b.role_ref.name),
            "Role" => roles
                .iter()
                .find(|r| {
                    r.metadata.name.as_deref() == Some(b.role_ref.name.as_str())
                        && r.metadata.namespace.as_deref() == Some(ns.as_str())
                })
                .unwrap_or_else(|| {
                    panic!("a binding names the missing Role {ns}/{}", b.role_ref.name)
                })
                .rules
                .clone()
                .unwrap_or_default(),
            other => panic!("roleRef kind {other}"),
        };
        for rule in rules {
            grants.push(Grant {
                scope: Scope::Namespace(ns.clone()),
                rule,
            });
        }
    }
    grants
}

/// Whether `grants` allow `verb` on `group`/`resource` everywhere `scope` covers.
pub fn allows(grants: &[Grant], group: &str, resource: &str, verb: &str, scope: &Scope) -> bool {
    grants.iter().any(|g| {
        let covers = g.scope == Scope::Cluster || &g.scope == scope;
        let r = &g.rule;
        covers
            && r.resource_names.is_none()
            && r.api_groups
                .iter()
                .flatten()
                .any(|x| x == group || x == "*")
            && r.resources
                .iter()
                .flatten()
                .any(|x| x == resource || x == "*")
            && r.verbs.iter().any(|x| x == verb || x == "*")
    })
}

/// (API group, resource[/subresource], verbs).
pub type Need = (&'static str, &'static str, &'static [&'static str]);

pub fn assert_needs(sa: &str, grants: &[Grant], needs: &[Need], scope: &Scope) {
    for (group, resource, verbs) in needs {
        for verb in *verbs {
            assert!(
                allows(grants, group, resource, verb, scope),
                "{sa} cannot {verb} {group}/{resource} in {scope:?}"
            );
        }
    }
}

/// DeviceProcesses and the deployments live in any namespace, so these grants are cluster-wide.
pub const GATEWAY_CLUSTER_NEEDS: &[Need] = &[
    ("azure.com", "deviceprocesses", &["get", "list", "watch"]),
    ("azure.com", "deviceprocesses/status", &["patch"]),
    ("events.k8s.io", "events", &["create"]),
];
/// Shard Leases: only in the gateway's own namespace.
pub const GATEWAY_LEASE_NEEDS: &[Need] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "create", "update"],
)];
pub const CONTROLLER_CLUSTER_NEEDS: &[Need] = &[
    (
        "azure.com",
        "deviceprocessdeployments",
        &["get", "list", "watch"],
    ),
    ("azure.com", "deviceprocessdeployments/status", &["patch"]),
    (
        "azure.com",
        "deviceprocesses",
        &["get", "list", "watch", "create", "patch", "delete"],
    ),
    ("azure.com", "networkswitches", &["get", "list", "watch"]),
    ("events.k8s.io", "events", &["create"]),
];
pub const CONTROLLER_LEASE_NEEDS: &[Need] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "create", "update"],
)];

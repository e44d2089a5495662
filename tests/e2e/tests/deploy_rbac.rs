//! `deploy/rbac/` as rendered by kustomize: each component's ServiceAccount is granted what the
//! component calls (cluster-wide where its objects live in any namespace, Leases only in the install
//! namespace), nothing it has no business with, no wildcard, and the router nothing at all. The
//! same identities are exercised against the real apiserver by deploy_compose_stack.rs and by the
//! harness (tests/support's TestNamespace).

mod common;

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};

use common::rbac::{
    allows, assert_needs, grants_of, Scope, CONTROLLER_CLUSTER_NEEDS, CONTROLLER_LEASE_NEEDS,
    GATEWAY_CLUSTER_NEEDS, GATEWAY_LEASE_NEEDS,
};
use common::render::{objects, workloads};
use common::{CONTROLLER, GATEWAY, NAMESPACE, ROUTER};

#[test]
fn rbac_grants_each_component_what_it_calls_and_the_router_nothing() {
    let own = Scope::Namespace(NAMESPACE.to_owned());

    let gateway = grants_of(GATEWAY);
    assert_needs(GATEWAY, &gateway, GATEWAY_CLUSTER_NEEDS, &Scope::Cluster);
    assert_needs(GATEWAY, &gateway, GATEWAY_LEASE_NEEDS, &own);
    // The gateway projects status; the spec belongs to the controller and to operators.
    for verb in ["create", "update", "patch", "delete"] {
        assert!(
            !allows(&gateway, "azure.com", "deviceprocesses", verb, &own),
            "the gateway must not {verb} DeviceProcesses"
        );
    }
    for (group, resource) in [
        ("azure.com", "deviceprocessdeployments"),
        ("azure.com", "networkswitches"),
        ("", "secrets"),
    ] {
        assert!(
            !allows(&gateway, group, resource, "get", &own),
            "the gateway has no business reading {resource}"
        );
    }
    assert!(
        !allows(
            &gateway,
            "coordination.k8s.io",
            "leases",
            "get",
            &Scope::Namespace("kube-system".into())
        ),
        "shard Leases are namespaced to the install namespace"
    );

    let controller = grants_of(CONTROLLER);
    assert_needs(
        CONTROLLER,
        &controller,
        CONTROLLER_CLUSTER_NEEDS,
        &Scope::Cluster,
    );
    assert_needs(CONTROLLER, &controller, CONTROLLER_LEASE_NEEDS, &own);
    assert!(
        !allows(
            &controller,
            "azure.com",
            "deviceprocesses/status",
            "patch",
            &own
        ),
        "DeviceProcess status is the gateway's to write"
    );

    // The router reads membership from Redis and never talks to Kubernetes.
    assert!(
        grants_of(ROUTER).is_empty(),
        "the router must have no RBAC grants"
    );
    let router_sa = objects::<ServiceAccount>("ServiceAccount")
        .into_iter()
        .find(|s| s.metadata.name.as_deref() == Some(ROUTER))
        .expect("router ServiceAccount");
    assert_eq!(router_sa.automount_service_account_token, Some(false));
    let router_pods = workloads()
        .into_iter()
        .find(|w| w.name == ROUTER)
        .expect("router workload");
    let spec = router_pods.template.spec.expect("pod spec");
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.service_account_name.as_deref(), Some(ROUTER));

    // Every workload runs as a ServiceAccount of the render, and no rule uses a wildcard.
    let accounts: BTreeSet<String> = objects::<ServiceAccount>("ServiceAccount")
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    for w in workloads() {
        if let Some(sa) = w
            .template
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
        {
            assert!(
                accounts.contains(&sa),
                "{} runs as missing ServiceAccount {sa}",
                w.name
            );
        }
    }
    let rules = objects::<ClusterRole>("ClusterRole")
        .into_iter()
        .flat_map(|r| r.rules.unwrap_or_default())
        .chain(
            objects::<Role>("Role")
                .into_iter()
                .flat_map(|r| r.rules.unwrap_or_default()),
        );
    for rule in rules {
        let all = rule
            .verbs
            .iter()
            .chain(rule.resources.iter().flatten())
            .chain(rule.api_groups.iter().flatten());
        assert!(all.into_iter().all(|x| x != "*"), "wildcard in {rule:?}");
    }
}

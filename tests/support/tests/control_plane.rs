//! The test harness against the real control plane: identities get exactly the RBAC of
//! `deploy/rbac/` (calls outside it are refused with 403), the audit log counts what the
//! apiserver served by user, owner-reference garbage collection is kube-controller-manager's
//! own, the fault proxy injects what it is told, and the control plane survives restarts.

use std::time::Duration;

use apollo_test_support::{wait_until, Component, ControlPlane, Fault, FaultProxy, TestNamespace};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("azure.com", "v1alpha1", kind),
        plural,
    )
}

fn device_processes(client: kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, ns, &resource("DeviceProcess", "deviceprocesses"))
}

fn device_process(name: &str) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "azure.com/v1alpha1",
        "kind": "DeviceProcess",
        "metadata": {"name": name},
        "spec": {
            "deviceRef": {"name": "tor1-01"},
            "artifact": {"type": "oci", "url": "alpine:1"},
            "execution": {"backend": "container", "args": ["run"]}
        }
    }))
    .expect("a DeviceProcess")
}

fn code(err: kube::Error) -> u16 {
    match err {
        kube::Error::Api(status) => status.code,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn each_component_gets_exactly_the_rbac_of_deploy_rbac() {
    let cp = ControlPlane::shared().await;
    let ns = TestNamespace::create(cp, "rbac").await;
    let admin = device_processes(ns.client(), ns.name());
    admin
        .create(&PostParams::default(), &device_process("dp-1"))
        .await
        .expect("admin creates a DeviceProcess");

    // The gateway reads DeviceProcesses and patches their status; it may not touch the spec.
    let gateway = ns.client_as(Component::Gateway).await;
    let as_gateway = device_processes(gateway.clone(), ns.name());
    let listed = as_gateway
        .list(&ListParams::default())
        .await
        .expect("the gateway lists DeviceProcesses");
    assert_eq!(listed.items.len(), 1);
    as_gateway
        .patch_status(
            "dp-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Pending"}})),
        )
        .await
        .expect("the gateway patches status");
    let spec_change = as_gateway
        .patch(
            "dp-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"artifact": {"url": "evil:1"}}})),
        )
        .await
        .expect_err("the gateway may not change a spec");
    assert_eq!(code(spec_change), 403);
    let gateway_leases: Api<Lease> = Api::namespaced(gateway, ns.name());
    gateway_leases
        .list(&ListParams::default())
        .await
        .map(drop)
        .expect_err("the gateway gets and updates its Leases but never lists them");

    // The controller owns DeviceProcesses but never writes their status.
    let controller = ns.client_as(Component::Controller).await;
    let as_controller = device_processes(controller, ns.name());
    let status_write = as_controller
        .patch_status(
            "dp-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .expect_err("the controller may not write DeviceProcess status");
    assert_eq!(code(status_write), 403);
    as_controller
        .delete("dp-1", &DeleteParams::default())
        .await
        .expect("the controller deletes DeviceProcesses");

    // The router has no business with Kubernetes at all.
    let router = ns.client_as(Component::Router).await;
    let as_router = device_processes(router.clone(), ns.name());
    assert_eq!(
        code(
            as_router
                .list(&ListParams::default())
                .await
                .expect_err("router")
        ),
        403
    );
    let configmaps: Api<ConfigMap> = Api::namespaced(router, ns.name());
    assert_eq!(
        code(
            configmaps
                .list(&ListParams::default())
                .await
                .expect_err("router")
        ),
        403
    );

    // The audit log saw each of these, under each identity, with its answer.
    let requests = ns.requests().await;
    let by = |user: &str, verb: &str, sub: &str, status: u16| {
        requests
            .iter()
            .filter(|r| {
                r.user == user && r.verb == verb && r.subresource == sub && r.code == status
            })
            .count()
    };
    let gateway_user = ns.username(Component::Gateway);
    assert_eq!(by(&gateway_user, "list", "", 200), 1, "{requests:#?}");
    assert_eq!(
        by(&gateway_user, "patch", "status", 200),
        1,
        "{requests:#?}"
    );
    assert_eq!(by(&gateway_user, "patch", "", 403), 1, "{requests:#?}");
    let controller_user = ns.username(Component::Controller);
    assert_eq!(
        by(&controller_user, "patch", "status", 403),
        1,
        "{requests:#?}"
    );
    assert_eq!(by(&controller_user, "delete", "", 200), 1, "{requests:#?}");
    assert_eq!(ns.requests_by(Component::Router).await.len(), 2);
    assert!(
        requests.iter().all(|r| r.user != "apollo-admin"),
        "the admin's own requests are not counted as a component's"
    );
}

#[tokio::test]
async fn owner_reference_garbage_collection_is_kube_controller_managers() {
    let cp = ControlPlane::shared().await;
    let ns = TestNamespace::create(cp, "gc").await;
    let owners: Api<DynamicObject> = Api::namespaced_with(
        ns.client(),
        ns.name(),
        &resource("DeviceProcessDeployment", "deviceprocessdeployments"),
    );
    let owner: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "azure.com/v1alpha1", "kind": "DeviceProcessDeployment",
        "metadata": {"name": "owner"},
        "spec": {
            "selector": {"matchLabels": {"role": "tor"}},
            "template": {"spec": {
                "artifact": {"type": "oci", "url": "alpine:1"},
                "execution": {"backend": "container", "args": ["run"]}
            }}
        }
    }))
    .expect("a deployment");
    let owner = owners
        .create(&PostParams::default(), &owner)
        .await
        .expect("create the owner");
    let mut child = device_process("owned");
    child.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "azure.com/v1alpha1".into(),
            kind: "DeviceProcessDeployment".into(),
            name: "owner".into(),
            uid: owner.metadata.uid.clone().expect("uid"),
            controller: Some(true),
            block_owner_deletion: Some(true),
        },
    ]);
    let children = device_processes(ns.client(), ns.name());
    children
        .create(&PostParams::default(), &child)
        .await
        .expect("create the child");
    owners
        .delete("owner", &DeleteParams::background())
        .await
        .expect("delete the owner");
    // The garbage collector starts watching a CRD's objects at its next discovery pass (every
    // 30 s) after the CRD appears, so on a fresh control plane this can take that long.
    wait_until(
        Duration::from_secs(120),
        "kube-controller-manager collects the child",
        || async { matches!(children.get_opt("owned").await, Ok(None)) },
    )
    .await;
}

#[tokio::test]
async fn the_fault_proxy_answers_what_it_is_told_and_passes_the_rest_through() {
    let cp = ControlPlane::shared().await;
    let ns = TestNamespace::create(cp, "proxy").await;
    let proxy = FaultProxy::start(cp).await;
    let kubeconfig = ns.kubeconfig_via(Component::Gateway, &proxy).await;
    let client = apollo_test_support::kube::client_from_kubeconfig(&kubeconfig).await;
    let api = device_processes(client, ns.name());
    assert!(api.list(&ListParams::default()).await.is_ok());
    // 500, not 503: kube's client retries 429, 503 and 504 by itself.
    proxy.add_fault(Fault {
        times: Some(2),
        ..Fault::status("list", "deviceprocesses", 500)
    });
    for _ in 0..2 {
        assert_eq!(
            code(api.list(&ListParams::default()).await.expect_err("500")),
            500
        );
    }
    assert!(
        api.list(&ListParams::default()).await.is_ok(),
        "the fault expired"
    );
    // Requests that went through carry the gateway's identity; injected ones never reached it.
    let lists = ns
        .requests_by(Component::Gateway)
        .await
        .into_iter()
        .filter(|r| r.verb == "list")
        .count();
    assert_eq!(lists, 2);
}

#[tokio::test]
async fn a_private_control_plane_survives_an_apiserver_restart_with_its_data() {
    let cp = ControlPlane::start().await;
    let ns = TestNamespace::create(&cp, "restart").await;
    let api = device_processes(ns.client(), ns.name());
    api.create(&PostParams::default(), &device_process("kept"))
        .await
        .expect("create");
    cp.restart_apiserver().await;
    let client = cp.admin_client().await;
    let again = device_processes(client, ns.name());
    wait_until(DEADLINE, "the object is served again", || async {
        matches!(again.get_opt("kept").await, Ok(Some(_)))
    })
    .await;
}

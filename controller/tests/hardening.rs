//! Defects of issue 13 that are the controller's, each against the real control plane and the
//! real `apollo-controller` under its own ServiceAccount: child names that collide across
//! deployments, an empty selector, and memory kept for deployments long gone.

mod common;

use apollo_controller::names::hashed_child_name;
use apollo_crds::{DeviceProcess, DeviceProcessDeployment};
use common::{labels, match_labels, new_deployment, template, Cluster, DEADLINE};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams};
use kube::ResourceExt;
use serde_json::json;

/// Creates of DeviceProcesses the apiserver refused with 409.
async fn refused_creates(cluster: &Cluster) -> usize {
    cluster
        .requests()
        .await
        .iter()
        .filter(|r| r.verb == "create" && r.resource == "deviceprocesses" && r.code == 409)
        .count()
}

#[tokio::test]
async fn deployments_whose_child_names_collide_both_get_their_children() {
    let (cluster, controller) = Cluster::with_controller().await;
    // `bgp` + `leaf-spine-1` and `bgp-leaf` + `spine-1` both spell `bgp-leaf-spine-1`.
    cluster
        .switch("leaf-spine-1", &[("role", "tor"), ("fabric", "a")])
        .await;
    cluster
        .switch("spine-1", &[("role", "tor"), ("fabric", "b")])
        .await;
    // Both at once: whichever creates second meets the other's child under the name.
    let bgp = new_deployment("bgp", match_labels(&[("fabric", "a")]), &["v1"]);
    let bgp_leaf = new_deployment("bgp-leaf", match_labels(&[("fabric", "b")]), &["v1"]);
    let params = PostParams::default();
    let (a, b) = tokio::join!(
        cluster.deployments.create(&params, &bgp),
        cluster.deployments.create(&params, &bgp_leaf)
    );
    a.expect("create bgp");
    b.expect("create bgp-leaf");
    cluster.converged("bgp", 1).await;
    cluster.converged("bgp-leaf", 1).await;

    let ours = cluster.children_of("bgp").await;
    let theirs = cluster.children_of("bgp-leaf").await;
    assert_eq!(ours.len(), 1);
    assert_eq!(theirs.len(), 1);
    assert_eq!(ours[0].spec.device_ref.name, "leaf-spine-1");
    assert_eq!(theirs[0].spec.device_ref.name, "spine-1");
    let names = [ours[0].name_any(), theirs[0].name_any()];
    let disambiguated = [
        hashed_child_name("bgp", "leaf-spine-1"),
        hashed_child_name("bgp-leaf", "spine-1"),
    ];
    assert!(
        names.contains(&"bgp-leaf-spine-1".to_owned())
            && (names.contains(&disambiguated[0]) || names.contains(&disambiguated[1])),
        "one keeps the plain name, the other gets the name unique to it: {names:?}"
    );
    // At most the one create of the race was refused; nothing is retried after that.
    let refused = refused_creates(&cluster).await;
    assert!(refused <= 1, "{refused} creates refused with 409");

    // A restarted controller finds both children under their names: no write at all.
    drop(controller);
    cluster.reset_requests().await;
    let _restarted = cluster.controller("controller-b").await;
    cluster.wait_for_holder("controller-b").await;
    cluster.converged("bgp", 1).await;
    cluster.converged("bgp-leaf", 1).await;
    cluster
        .assert_no_requests(
            &["create", "delete"],
            &["deviceprocesses"],
            "names are found again after a restart",
        )
        .await;
}

#[tokio::test]
async fn a_name_held_by_a_device_process_of_another_owner_costs_one_refused_create() {
    let (cluster, _controller) = Cluster::with_controller().await;
    // Made by hand, without the deployment label: the controller's cache never shows it.
    let mut squatter =
        DeviceProcess::new("logger-tor1-01", template(&["x"]).spec.for_device("other"));
    squatter.metadata.labels = Some(labels(&[("made-by", "hand")]));
    let squatter = cluster
        .children
        .create(&PostParams::default(), &squatter)
        .await
        .expect("create the squatter");

    cluster.roll_out_logger(&["tor1-01"]).await;
    let children = cluster.children_of("logger").await;
    assert_eq!(children.len(), 1);
    assert_eq!(
        children[0].name_any(),
        hashed_child_name("logger", "tor1-01")
    );
    assert_eq!(children[0].spec.device_ref.name, "tor1-01");
    let untouched = cluster
        .children
        .get("logger-tor1-01")
        .await
        .expect("the squatter is still there");
    assert_eq!(untouched.resource_version(), squatter.resource_version());
    assert_eq!(refused_creates(&cluster).await, 1);
}

#[tokio::test]
async fn the_apiserver_refuses_an_empty_selector_as_it_does_for_a_daemonset() {
    let cluster = Cluster::start().await;
    let params = PostParams::default();
    let empty = new_deployment("everything", LabelSelector::default(), &["v1"]);
    match cluster.deployments.create(&params, &empty).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains("spec.selector")
                    && status.message.contains("empty selector is invalid"),
                "{}",
                status.message
            );
        }
        other => panic!("an empty selector was not refused: {other:?}"),
    }
    let mut stingy = new_deployment("stingy", match_labels(&[("role", "tor")]), &["v1"]);
    stingy.spec.update_strategy.rolling_update.max_unavailable =
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0);
    match cluster.deployments.create(&params, &stingy).await {
        Err(kube::Error::Api(status)) => assert!(
            status.code == 422 && status.message.contains("maxUnavailable"),
            "{status:?}"
        ),
        other => panic!("maxUnavailable 0 was not refused: {other:?}"),
    }
    // What the apiserver stores for a deployment that says nothing about rollouts: the schema's
    // defaults (sent as plain JSON, so no Rust default is involved).
    let resource = ApiResource::erase::<DeviceProcessDeployment>(&());
    let raw: Api<DynamicObject> =
        Api::namespaced_with(cluster.client.clone(), cluster.namespace(), &resource);
    let plain: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "azure.com/v1alpha1",
        "kind": "DeviceProcessDeployment",
        "metadata": {"name": "plain"},
        "spec": {
            "selector": {"matchLabels": {"role": "tor"}},
            "template": {"spec": {"artifact": {"type": "oci", "url": "alpine"},
                                  "execution": {"backend": "container"}}}
        }
    }))
    .expect("object");
    let stored = raw.create(&params, &plain).await.expect("create");
    let spec = &stored.data["spec"];
    assert_eq!(
        spec["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxFailed": 0}})
    );
    assert_eq!(
        (
            &spec["paused"],
            &spec["minReadySeconds"],
            &spec["progressDeadlineSeconds"]
        ),
        (&json!(false), &json!(0), &json!(600))
    );
}

#[tokio::test]
async fn the_controller_forgets_deleted_deployments() {
    let (cluster, controller) = Cluster::with_controller().await;
    cluster.tor_switches(&["tor1-01"]).await;
    let names = ["logger-a", "logger-b", "logger-c"];
    for name in names {
        cluster
            .deployment(name, common::tor_selector(), &["v1"])
            .await;
        cluster.converged(name, 1).await;
    }
    let remembered = || controller.metric("apollo_controller_remembered_deployments", &[]);
    apollo_test_support::wait_until(DEADLINE, "three deployments remembered", || async {
        remembered().await == 3.0
    })
    .await;
    for name in names {
        cluster
            .deployments
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete deployment");
    }
    apollo_test_support::wait_until(DEADLINE, "deleted deployments forgotten", || async {
        remembered().await == 0.0
    })
    .await;
}

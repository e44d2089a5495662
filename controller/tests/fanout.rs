//! The "Done when" list of the controller issue, against the real Kubernetes control plane and the
//! real `apollo-controller` binary running under its own ServiceAccount with exactly the RBAC of
//! `deploy/rbac/controller.yaml`. Owner-reference garbage collection is kube-controller-manager's.

mod common;

use std::time::Duration;

use apollo_crds::{
    spec_hash, DeviceProcess, DeviceProcessDeployment, NetworkSwitch, LABEL_DEPLOYMENT,
    LABEL_DEVICE_NAME,
};
use apollo_test_support::kube::AuditLog;
use apollo_test_support::kube::KUBE_APISERVER;
use apollo_test_support::{wait_for, wait_until};
use apollo_test_support::{Component, ControlPlaneOptions, Fault, TestNamespace};
use common::{
    labels, new_deployment, new_switch, template, tor_selector, Cluster, DEADLINE, ROLE_TOR,
    WATCH_RECOVERY_DEADLINE,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;

/// Metric label filters for the DeviceProcess creates a controller made.
const CHILD_CREATES: &[&str] = &[r#"resource="deviceprocesses""#, r#"verb="create""#];

fn tor_in_sfo() -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(&[ROLE_TOR])),
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "site".into(),
            operator: "In".into(),
            values: Some(vec!["sfo".into()]),
        }]),
    }
}

async fn patch_template_args(cluster: &Cluster, name: &str, args: &[&str]) {
    let patch = json!({"spec": {"template": {"spec": {"execution": {"args": args}}}}});
    cluster
        .deployments
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch deployment template");
}

async fn relabel_switch(cluster: &Cluster, name: &str, key: &str, value: &str) {
    let patch = json!({"metadata": {"labels": {key: value}}});
    cluster
        .switches
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("relabel switch");
}

fn names<K: ResourceExt>(objects: &[K]) -> Vec<String> {
    objects.iter().map(ResourceExt::name_any).collect()
}

#[tokio::test]
async fn two_matching_switches_and_one_other_yield_exactly_two_device_processes() {
    let (cluster, _controller) = Cluster::with_controller().await;
    cluster
        .switch("tor1-01", &[("role", "tor"), ("site", "sfo")])
        .await;
    cluster
        .switch(
            "tor1-02",
            &[("role", "tor"), ("site", "sfo"), ("rack", "r2")],
        )
        .await;
    cluster
        .switch("spine1", &[("role", "spine"), ("site", "sfo")])
        .await;
    let created = cluster
        .deployment("logger", tor_in_sfo(), &["echo hi"])
        .await;

    let deployment = cluster.converged("logger", 2).await;
    let all = cluster
        .children
        .list(&Default::default())
        .await
        .expect("list")
        .items;
    assert_eq!(all.len(), 2, "only selected devices get a DeviceProcess");
    let children = cluster.children_of("logger").await;
    assert_eq!(names(&children), ["logger-tor1-01", "logger-tor1-02"]);
    for (child, device) in children.iter().zip(["tor1-01", "tor1-02"]) {
        assert_eq!(
            child.labels(),
            &labels(&[
                ("app", "logger"),
                (LABEL_DEVICE_NAME, device),
                (LABEL_DEPLOYMENT, "logger")
            ])
        );
        assert_eq!(
            child.annotations().get("apollo.azure.com/owner-team"),
            Some(&"netops".to_owned())
        );
        let owners = child.owner_references();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "DeviceProcessDeployment");
        assert_eq!(owners[0].name, "logger");
        assert_eq!(Some(&owners[0].uid), created.metadata.uid.as_ref());
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].block_owner_deletion, Some(true));
        assert_eq!(child.spec, template(&["echo hi"]).spec.for_device(device));
        assert_eq!(child.metadata.generation, Some(1));
    }
    let status = deployment.status.expect("status");
    assert_eq!(status.number_agent_connected, 0);
    assert_eq!(status.number_spec_observed, 0);

    assert_eq!(cluster.count("create", "deviceprocesses", None).await, 2);
    cluster.assert_events("logger", "SuccessfulCreate", 2).await;
}

#[tokio::test]
async fn template_change_updates_each_child_once_and_leaves_unchanged_children_alone() {
    let (cluster, _controller) = Cluster::with_controller().await;
    cluster.tor_switches(&["tor1-01", "tor1-02"]).await;
    cluster.deployment("logger", tor_selector(), &["v1"]).await;
    cluster.deployment("metrics", tor_selector(), &["m1"]).await;
    cluster.converged("logger", 2).await;
    cluster.converged("metrics", 2).await;
    let untouched_before = cluster.children_of("metrics").await;

    cluster.reset_requests().await;
    patch_template_args(&cluster, "logger", &["v2"]).await;
    let deployment = cluster.converged("logger", 2).await;
    assert_eq!(deployment.metadata.generation, Some(2));

    for child in cluster.children_of("logger").await {
        assert_eq!(child.spec.execution.args, ["v2"], "{}", child.name_any());
        assert_eq!(child.metadata.generation, Some(2), "bumped exactly once");
    }
    let untouched_after = cluster.children_of("metrics").await;
    for (before, after) in untouched_before.iter().zip(&untouched_after) {
        assert_eq!(before.resource_version(), after.resource_version());
        assert_eq!(after.metadata.generation, Some(1));
    }
    assert_eq!(
        cluster
            .count_requests(&["patch", "update"], "deviceprocesses", Some(""))
            .await,
        2,
        "one write per changed child, none for the other deployment's"
    );
    cluster
        .assert_no_requests(
            &["create", "delete"],
            &["deviceprocesses"],
            "a template change updates children in place",
        )
        .await;
}

#[tokio::test]
async fn relabelled_or_deleted_switch_loses_its_child_and_a_new_one_gains_one() {
    let (cluster, _controller) = Cluster::with_controller().await;
    cluster.roll_out_logger(&["tor1-01", "tor1-02"]).await;

    relabel_switch(&cluster, "tor1-02", "role", "spine").await;
    cluster.converged("logger", 1).await;
    assert_eq!(cluster.child_names("logger").await, ["logger-tor1-01"]);
    cluster.assert_events("logger", "SuccessfulDelete", 1).await;

    cluster.tor_switches(&["tor1-03"]).await;
    cluster.converged("logger", 2).await;
    assert_eq!(
        cluster.child_names("logger").await,
        ["logger-tor1-01", "logger-tor1-03"]
    );

    cluster
        .switches
        .delete("tor1-01", &DeleteParams::default())
        .await
        .expect("delete switch");
    cluster.converged("logger", 1).await;
    assert_eq!(cluster.child_names("logger").await, ["logger-tor1-03"]);
    cluster.assert_events("logger", "SuccessfulDelete", 2).await;
}

#[tokio::test]
async fn deleting_the_deployment_garbage_collects_its_children() {
    let (cluster, _controller) = Cluster::with_controller().await;
    cluster.roll_out_logger(&["tor1-01", "tor1-02"]).await;
    cluster.wait_for_garbage_collector().await;
    let audit = AuditLog::from_end(cluster.control_plane().audit_log_path());

    cluster
        .deployments
        .delete("logger", &DeleteParams::default())
        .await
        .expect("delete deployment");
    wait_until(DEADLINE, "children are garbage-collected", || async {
        cluster
            .children
            .list(&Default::default())
            .await
            .is_ok_and(|l| l.items.is_empty())
    })
    .await;
    cluster
        .assert_no_requests(
            &["delete"],
            &["deviceprocesses"],
            "the garbage collector removed them, not the controller",
        )
        .await;
    // kube-controller-manager's garbage collector did, under its own identity.
    let mut collected: Vec<String> = audit
        .requests()
        .into_iter()
        .filter(|r| {
            r.verb == "delete"
                && r.resource == "deviceprocesses"
                && r.namespace == cluster.namespace()
                && r.code == 200
        })
        .map(|r| {
            assert_eq!(
                r.user, "system:serviceaccount:kube-system:generic-garbage-collector",
                "{r:?}"
            );
            r.name
        })
        .collect();
    collected.sort();
    assert_eq!(collected, ["logger-tor1-01", "logger-tor1-02"]);
}

#[tokio::test]
async fn steady_state_makes_no_writes_for_ten_seconds() {
    let cluster = Cluster::start().await;
    // A short resync makes the window contain level-triggered reconciles that must write nothing.
    let controller = cluster
        .controller_with("controller-a", &[("--resync-period", "1s")])
        .await;
    // The rollout's last writes are the converged status and, right after it, the
    // RolloutStarted Event (no agent reports, so the children never become available and the
    // rollout stays in progress; CI: a reset between the two counted the Event in the window): from
    // there on nothing may be written.
    cluster.roll_out_logger(&["tor1-01", "tor1-02"]).await;
    cluster.assert_events("logger", "RolloutStarted", 1).await;
    cluster.reset_requests().await;
    let reconciles_before = controller
        .metric("apollo_controller_reconciles_total", &[r#"result="ok""#])
        .await;
    tokio::time::sleep(Duration::from_secs(10)).await; // the measured window itself
    let writes = cluster.writes_except_leases().await;
    assert!(writes.is_empty(), "writes in steady state: {writes:?}");
    cluster
        .assert_no_requests(
            &["list"],
            &[
                "deviceprocesses",
                "networkswitches",
                "deviceprocessdeployments",
            ],
            "reads come from the watch caches",
        )
        .await;
    let reconciles = controller
        .metric("apollo_controller_reconciles_total", &[r#"result="ok""#])
        .await
        - reconciles_before;
    assert!(
        reconciles >= 5.0,
        "resyncs ran during the window ({reconciles})"
    );
    // Only the lease is renewed: at most once per retry period (250ms).
    let lease_updates = cluster.count("update", "leases", None).await;
    assert!(lease_updates <= 44, "lease renewals: {lease_updates}");
}

#[tokio::test]
async fn only_the_lease_holder_writes_and_a_standby_takes_over_when_it_dies() {
    let cluster = Cluster::start().await;
    let mut leader = cluster.controller("controller-a").await;
    cluster.wait_for_holder("controller-a").await;
    let standby = cluster.controller("controller-b").await;

    cluster.roll_out_logger(&["tor1-01", "tor1-02"]).await;
    assert_eq!(
        cluster.lease_holder().await.as_deref(),
        Some("controller-a")
    );
    assert_eq!(standby.writes_except_leases().await, 0.0, "standby wrote");
    assert_eq!(leader.kube_writes(CHILD_CREATES).await, 2.0);
    assert_eq!(cluster.count("create", "deviceprocesses", None).await, 2);

    leader.proc.kill();
    cluster.tor_switches(&["tor1-03"]).await;
    cluster.converged("logger", 3).await;
    assert_eq!(
        cluster.lease_holder().await.as_deref(),
        Some("controller-b")
    );
    assert_eq!(
        standby.kube_writes(CHILD_CREATES).await,
        1.0,
        "the new leader created only the missing child"
    );
    assert_eq!(cluster.count("create", "deviceprocesses", None).await, 3);
}

#[tokio::test]
async fn sigterm_releases_the_lease_and_exits_cleanly() {
    let cluster = Cluster::start().await;
    // A long lease: a successor that had to wait for expiry would take 30 s.
    let slow_expiry = [
        ("--lease-duration", "30s"),
        ("--lease-renew-deadline", "20s"),
    ];
    let mut controller = cluster.controller_with("controller-a", &slow_expiry).await;
    cluster.wait_for_holder("controller-a").await;
    let status = controller
        .proc
        .terminate(Duration::from_secs(5))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert_eq!(cluster.lease_holder().await, None, "lease released");
    // A successor takes the released lease at once rather than after expiry.
    let started = tokio::time::Instant::now();
    let _successor = cluster.controller_with("controller-b", &slow_expiry).await;
    cluster.wait_for_holder("controller-b").await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn kubectl_get_dpd_shows_the_counts() {
    let (cluster, _controller) = Cluster::with_controller().await;
    cluster.switch("spine1", &[("role", "spine")]).await;
    cluster.roll_out_logger(&["tor1-01", "tor1-02"]).await;

    let table = |args: &'static [&'static str]| {
        let cluster = &cluster;
        async move {
            let output = cluster.ns.kubectl(args).await;
            assert!(
                output.status.success(),
                "kubectl failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
    };
    let split = |stdout: &str| -> Vec<Vec<String>> {
        stdout
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect()
    };
    let stdout = table(&["get", "dpd"]).await;
    let rows = split(&stdout);
    assert_eq!(
        rows[0],
        [
            "NAME",
            "DESIRED",
            "CURRENT",
            "UP-TO-DATE",
            "AVAILABLE",
            "PROGRESSING",
            "AGE"
        ],
        "{stdout}"
    );
    // No agents: nothing available, the rollout in progress.
    assert_eq!(
        rows[1][..6],
        ["logger", "2", "2", "2", "0", "RollingUpdate"],
        "{stdout}"
    );
    let wide = table(&["get", "dpd", "-o", "wide"]).await;
    let rows = split(&wide);
    assert_eq!(
        rows[0],
        [
            "NAME",
            "DESIRED",
            "CURRENT",
            "UP-TO-DATE",
            "AVAILABLE",
            "CONNECTED",
            "OBSERVED",
            "PROGRESSING",
            "AGE"
        ],
        "{wide}"
    );
    assert_eq!(
        rows[1][..7],
        ["logger", "2", "2", "2", "0", "0", "0"],
        "{wide}"
    );
}

#[tokio::test]
async fn an_invalid_selector_is_reported_and_touches_no_child() {
    let (cluster, _controller) = Cluster::with_controller().await;
    cluster.roll_out_logger(&["tor1-01"]).await;

    let patch = json!({"spec": {"selector": {"matchExpressions": [
        {"key": "role", "operator": "Equals", "values": ["tor"]}
    ]}}});
    cluster
        .deployments
        .patch("logger", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch selector");
    cluster
        .wait_for_deployment("logger", "SelectorValid=False is reported", |d| {
            d.status.as_ref().is_some_and(|s| {
                s.observed_generation == d.metadata.generation
                    && s.conditions.iter().any(|c| {
                        c.type_ == "SelectorValid"
                            && c.status == "False"
                            && c.reason == "InvalidSelector"
                    })
            })
        })
        .await;
    assert_eq!(cluster.child_names("logger").await, ["logger-tor1-01"]);
    cluster
        .assert_no_requests(
            &["delete"],
            &["deviceprocesses"],
            "an invalid selector deletes no child",
        )
        .await;
}

#[tokio::test]
async fn agent_counts_follow_the_childrens_conditions_at_a_paced_rate() {
    let (cluster, _controller) = Cluster::with_controller().await;
    cluster.roll_out_logger(&["tor1-01", "tor1-02"]).await;
    cluster.reset_requests().await;

    // What the gateway does when agents connect and observe their specs: four status changes.
    let now = "2026-01-01T00:00:00Z";
    for child in cluster.children_of("logger").await {
        let connected = json!({"status": {"phase": "Pending", "conditions": [
            {"type": "AgentConnected", "status": "True", "reason": "AgentConnected",
             "message": "agent reports within the stale window", "lastTransitionTime": now}
        ]}});
        let observed = json!({"status": {
        "observedSpecHash": spec_hash(&child.spec),
        "conditions": [
            {"type": "AgentConnected", "status": "True", "reason": "AgentConnected",
             "message": "agent reports within the stale window", "lastTransitionTime": now},
            {"type": "SpecObserved", "status": "True", "reason": "SpecObserved",
             "message": "agent observed the current spec", "lastTransitionTime": now}
        ]}});
        for body in [connected, observed] {
            cluster
                .children
                .patch_status(
                    &child.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&body),
                )
                .await
                .expect("patch child status");
        }
    }
    cluster
        .wait_for_deployment("logger", "Connected and Observed reach 2", |d| {
            d.status
                .as_ref()
                .is_some_and(|s| s.number_agent_connected == 2 && s.number_spec_observed == 2)
        })
        .await;
    let status_writes = cluster
        .count("patch", "deviceprocessdeployments", Some("status"))
        .await;
    // Paced at --agent-count-interval (2s): at most one write now and one when the interval ends.
    assert!(
        (1..=2).contains(&status_writes),
        "four child transitions cost {status_writes} deployment status writes"
    );
}

#[tokio::test]
async fn a_namespace_scoped_controller_leaves_other_namespaces_alone() {
    let cluster = Cluster::start().await;
    // Another namespace of the same control plane, where the controller's ServiceAccount may read
    // and write as much as in its own (its ClusterRoleBinding): only --namespace keeps it out.
    let other = TestNamespace::create(cluster.control_plane(), "other").await;
    let _controller = cluster.controller("controller-a").await;
    let other_switches: Api<NetworkSwitch> = other.api();
    let other_deployments: Api<DeviceProcessDeployment> = other.api();
    other_switches
        .create(&PostParams::default(), &new_switch("tor9-01", &[ROLE_TOR]))
        .await
        .expect("create switch in other namespace");
    other_deployments
        .create(
            &PostParams::default(),
            &new_deployment("logger", tor_selector(), &["v1"]),
        )
        .await
        .expect("create deployment in other namespace");
    // The in-scope deployment is created last: once it has converged, the other one has had
    // every chance to be (wrongly) reconciled.
    cluster.roll_out_logger(&["tor1-01"]).await;

    let untouched = other_deployments.get("logger").await.expect("get");
    assert_eq!(untouched.status, None);
    let other_children: Api<DeviceProcess> = other.api();
    assert!(other_children
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .is_empty());
    // Not a single request of the controller concerned the other namespace.
    let elsewhere: Vec<_> = cluster
        .requests()
        .await
        .into_iter()
        .filter(|r| r.namespace != cluster.namespace())
        .collect();
    assert!(
        elsewhere.is_empty(),
        "requests outside its namespace: {elsewhere:#?}"
    );
}

#[tokio::test]
async fn a_child_deleted_by_hand_is_recreated() {
    let (cluster, _controller) = Cluster::with_controller().await;
    cluster.roll_out_logger(&["tor1-01"]).await;
    let original = cluster.children.get("logger-tor1-01").await.expect("child");

    cluster
        .children
        .delete("logger-tor1-01", &DeleteParams::default())
        .await
        .expect("delete child");
    let children = cluster.children.clone();
    wait_until(DEADLINE, "the child is recreated", || {
        let children = children.clone();
        let original_uid = original.uid();
        async move {
            children
                .get_opt("logger-tor1-01")
                .await
                .ok()
                .flatten()
                .is_some_and(|c| c.uid() != original_uid)
        }
    })
    .await;
    cluster.assert_events("logger", "SuccessfulCreate", 2).await;
}

#[tokio::test]
async fn failed_writes_are_retried_with_backoff_until_converged() {
    let cluster = Cluster::start_with_fault_proxy().await;
    let controller = cluster.controller("controller-a").await;
    cluster.tor_switches(&["tor1-01", "tor1-02"]).await;
    // 500, which kube's client does not retry by itself (it retries 429, 503 and 504): the
    // controller's own backoff has to.
    cluster.proxy().add_fault(Fault {
        times: Some(2),
        ..Fault::status("create", "deviceprocesses", 500)
    });
    cluster.deployment("logger", tor_selector(), &["v1"]).await;
    cluster.converged("logger", 2).await;
    // The two refused creates never reached the apiserver (the proxy answered them): it served
    // exactly one create per child, each a success.
    let creates: Vec<_> = cluster
        .requests()
        .await
        .into_iter()
        .filter(|r| r.verb == "create" && r.resource == "deviceprocesses")
        .collect();
    assert_eq!(creates.len(), 2, "one create per child: {creates:#?}");
    assert!(creates.iter().all(|r| r.code == 201), "{creates:#?}");
    // Two refused creates, then one per child: four attempts in all.
    assert_eq!(
        controller
            .kube_writes(&[r#"resource="deviceprocesses""#, r#"outcome="error""#])
            .await,
        2.0
    );
    assert_eq!(
        controller
            .kube_writes(&[r#"resource="deviceprocesses""#, r#"verb="create""#])
            .await,
        4.0,
        "two refused creates, then one per child"
    );
    assert!(
        controller
            .metric("apollo_controller_reconciles_total", &[r#"result="error""#])
            .await
            >= 2.0
    );
}

/// The controller binary does its whole job under its own ServiceAccount with exactly the RBAC of
/// `deploy/rbac/controller.yaml`: every call of a life cycle (leader election and release, watch
/// caches, child create/patch/delete, deployment status, Events) is one the apiserver allowed,
/// and the calls it makes are exactly these. (That a call outside those rules, such as writing
/// DeviceProcess status, is refused with 403 is shown in tests/support/tests/control_plane.rs.)
#[tokio::test]
async fn the_controller_does_its_whole_job_with_exactly_the_rbac_of_deploy_rbac() {
    let cluster = Cluster::start().await;
    let mut controller = cluster.controller("controller-a").await;
    cluster.wait_for_holder("controller-a").await;
    cluster.roll_out_logger(&["tor1-01", "tor1-02"]).await;
    patch_template_args(&cluster, "logger", &["v2"]).await;
    cluster.converged("logger", 2).await;
    relabel_switch(&cluster, "tor1-02", "role", "spine").await;
    cluster.converged("logger", 1).await;
    cluster.assert_events("logger", "SuccessfulCreate", 2).await;
    cluster.assert_events("logger", "SuccessfulDelete", 1).await;
    let status = controller
        .proc
        .terminate(Duration::from_secs(5))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
    assert_eq!(cluster.lease_holder().await, None, "lease released");

    let requests = cluster.requests().await;
    let controller_user = cluster.ns.username(Component::Controller);
    let foreign: Vec<_> = requests
        .iter()
        .filter(|r| r.user != controller_user)
        .collect();
    assert!(
        foreign.is_empty(),
        "not the controller's identity: {foreign:#?}"
    );
    let refused: Vec<_> = requests
        .iter()
        .filter(|r| matches!(r.code, 401 | 403))
        .collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");
    let used: std::collections::BTreeSet<String> = requests
        .iter()
        .map(|r| {
            let resource = if r.subresource.is_empty() {
                format!("{}/{}", r.group, r.resource)
            } else {
                format!("{}/{}/{}", r.group, r.resource, r.subresource)
            };
            format!("{} {resource}", r.verb)
        })
        .collect();
    let expected: std::collections::BTreeSet<String> = [
        "list azure.com/deviceprocessdeployments",
        "watch azure.com/deviceprocessdeployments",
        "patch azure.com/deviceprocessdeployments/status",
        "list azure.com/networkswitches",
        "watch azure.com/networkswitches",
        "list azure.com/deviceprocesses",
        "watch azure.com/deviceprocesses",
        "create azure.com/deviceprocesses",
        "patch azure.com/deviceprocesses",
        "delete azure.com/deviceprocesses",
        "create events.k8s.io/events",
        "get coordination.k8s.io/leases",
        "create coordination.k8s.io/leases",
        "update coordination.k8s.io/leases",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(used, expected, "the controller's calls");
}

/// Names as long as Kubernetes allows (253 characters, dots included): every object the
/// controller derives from them (child names, label values, Events) must still be valid for the
/// real apiserver, which validates each of them.
#[tokio::test]
async fn the_longest_names_kubernetes_allows_still_yield_valid_children_and_events() {
    let cluster = Cluster::start().await;
    let long = |prefix: &str| {
        let mut name = prefix.to_owned();
        while name.len() < 253 {
            name.push_str(if name.len() % 40 == 39 { "." } else { "x" });
        }
        name.truncate(252);
        name.push('z');
        name
    };
    let device = long("tor1.sfo.");
    let deployment = long("logger-");
    // The identity defaults to `<POD_NAME>_<pid><nanos>`, and a Pod's name may be 253 characters.
    let identity = format!("{}_4d2a1b2c3d4e", long("apollo-controller-"));
    assert_eq!((device.len(), deployment.len()), (253, 253));
    let _controller = cluster
        .controller_with("controller-a", &[("--identity", identity.as_str())])
        .await;
    cluster.wait_for_holder(&identity).await;
    cluster.switch(&device, &[ROLE_TOR]).await;
    cluster
        .deployment(&deployment, tor_selector(), &["v1"])
        .await;
    cluster.converged(&deployment, 1).await;

    let child_name = apollo_controller::names::child_name(&deployment, &device);
    let child = cluster.children.get(&child_name).await.expect("the child");
    assert!(child_name.len() <= 253, "{child_name}");
    assert_eq!(child.spec.device_ref.name, device);
    assert_eq!(
        child.labels().get(LABEL_DEPLOYMENT),
        Some(&apollo_controller::names::label_value(&deployment))
    );
    assert_eq!(
        child.labels().get(LABEL_DEVICE_NAME),
        Some(&apollo_controller::names::label_value(&device))
    );
    // The Event about the deployment is accepted too (its name derives from the deployment's).
    let events = cluster.events_for(&deployment, "SuccessfulCreate").await;
    assert_eq!(events.len(), 1, "{events:#?}");
    let instance = events[0].reporting_instance.clone().unwrap_or_default();
    assert!(
        !instance.is_empty() && identity.starts_with(&instance),
        "reportingInstance {instance:?} names the replica"
    );

    // Removing the device deletes the child and reports that as well.
    cluster
        .switches
        .delete(&device, &DeleteParams::default())
        .await
        .expect("delete switch");
    cluster.converged(&deployment, 0).await;
    cluster
        .assert_events(&deployment, "SuccessfulDelete", 1)
        .await;
}

/// Foreground deletion: the apiserver keeps the deployment (deletionTimestamp set, finalizer
/// `foregroundDeletion`) until kube-controller-manager's garbage collector has deleted every child
/// that blocks it (`blockOwnerDeletion`). Meanwhile the controller must neither recreate the
/// children being deleted nor write anything else.
#[tokio::test]
async fn foreground_deletion_of_the_deployment_is_left_to_the_garbage_collector() {
    let (cluster, _controller) = Cluster::with_controller().await;
    cluster.roll_out_logger(&["tor1-01", "tor1-02"]).await;
    cluster.wait_for_garbage_collector().await;
    cluster.reset_requests().await;

    cluster
        .deployments
        .delete("logger", &DeleteParams::foreground())
        .await
        .expect("delete deployment");
    wait_until(
        DEADLINE,
        "the deployment and its children are gone",
        || async {
            matches!(cluster.deployments.get_opt("logger").await, Ok(None))
                && cluster
                    .children
                    .list(&Default::default())
                    .await
                    .is_ok_and(|l| l.items.is_empty())
        },
    )
    .await;
    let writes = cluster.writes_except_leases().await;
    assert!(
        writes.is_empty(),
        "writes while the deployment was deleted: {writes:?}"
    );
}

/// Clusters that enable the OwnerReferencesPermissionEnforcement admission plugin let only
/// users who may update the owner's `finalizers` set `blockOwnerDeletion` on an owner reference.
/// The controller sets it on every child; `deploy/rbac/controller.yaml` grants
/// `deviceprocessdeployments/finalizers` update for that, and this is the proof.
#[tokio::test]
async fn the_rbac_suffices_where_owner_reference_permissions_are_enforced() {
    let cluster = Cluster::start_private(ControlPlaneOptions {
        apiserver_args: vec![
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement".to_owned(),
        ],
        ..ControlPlaneOptions::default()
    })
    .await;
    let apiserver_log = cluster.control_plane().log_tail(KUBE_APISERVER, 100_000);
    assert!(
        apiserver_log.contains("OwnerReferencesPermissionEnforcement"),
        "the admission plugin is enabled"
    );
    let _controller = cluster.controller("controller-a").await;
    cluster.roll_out_logger(&["tor1-01", "tor1-02"]).await;
    for child in cluster.children_of("logger").await {
        let owner = &child.owner_references()[0];
        assert_eq!(
            owner.block_owner_deletion,
            Some(true),
            "{}",
            child.name_any()
        );
    }
    let refused: Vec<_> = cluster
        .requests()
        .await
        .into_iter()
        .filter(|r| matches!(r.code, 401 | 403 | 422))
        .collect();
    assert!(refused.is_empty(), "refused: {refused:#?}");
    assert_eq!(cluster.count("create", "deviceprocesses", None).await, 2);
}

/// The CRD lets any string map through as template labels, but the apiserver validates the labels
/// of every DeviceProcess made from the template (kubesim did not). A template it refuses is
/// reported on the deployment (condition `ProcessFailure`, one `Warning FailedCreate` Event, as a
/// ReplicaSet reports `ReplicaFailure`), with the status still counting what exists; the refused
/// write is not repeated until the template changes, since it would be refused again.
#[tokio::test]
async fn a_template_the_apiserver_refuses_is_reported_and_not_retried_until_it_changes() {
    let (cluster, _controller) = Cluster::with_controller().await;
    cluster.tor_switches(&["tor1-01", "tor1-02"]).await;
    let mut refused = new_deployment("logger", tor_selector(), &["v1"]);
    // A space is not allowed in a label value.
    refused
        .spec
        .template
        .metadata
        .labels
        .insert("app".into(), "logger v1".into());
    cluster
        .deployments
        .create(&PostParams::default(), &refused)
        .await
        .expect("the CRD's schema accepts the template");
    let failing = |d: &DeviceProcessDeployment| {
        d.status.as_ref().is_some_and(|s| {
            s.observed_generation == d.metadata.generation
                && s.conditions.iter().any(|c| {
                    c.type_ == "ProcessFailure" && c.status == "True" && c.reason == "FailedCreate"
                })
        })
    };
    let deployment = cluster
        .wait_for_deployment("logger", "ProcessFailure=True is reported", failing)
        .await;
    let status = deployment.status.expect("status");
    assert_eq!(
        (
            status.desired_number_scheduled,
            status.current_number_scheduled,
            status.updated_number_scheduled
        ),
        (2, 0, 0)
    );
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "ProcessFailure")
        .expect("ProcessFailure");
    assert!(
        condition.message.contains("metadata.labels") && condition.message.contains("logger v1"),
        "the apiserver's reason: {condition:?}"
    );
    let events = cluster.events_for("logger", "FailedCreate").await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].type_.as_deref(), Some("Warning"));
    let creates = || async {
        cluster
            .requests()
            .await
            .into_iter()
            .filter(|r| r.verb == "create" && r.resource == "deviceprocesses")
            .map(|r| r.code)
            .collect::<Vec<_>>()
    };
    assert_eq!(creates().await, [422], "one refused create");

    // A new device is counted, but nothing is created from the same template.
    cluster.tor_switches(&["tor1-03"]).await;
    cluster
        .wait_for_deployment("logger", "three devices desired", |d| {
            failing(d)
                && d.status
                    .as_ref()
                    .is_some_and(|s| s.desired_number_scheduled == 3)
        })
        .await;
    assert_eq!(creates().await, [422], "not retried with the same template");
    cluster.assert_events("logger", "FailedCreate", 1).await;

    // Fixed: the children are created and the failure is gone.
    let patch = json!({"spec": {"template": {"metadata": {"labels": {"app": "logger"}}}}});
    cluster
        .deployments
        .patch("logger", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("fix the template");
    let deployment = cluster.converged("logger", 3).await;
    let status = deployment.status.expect("status");
    assert!(
        status
            .conditions
            .iter()
            .all(|c| c.type_ != "ProcessFailure"),
        "{:?}",
        status.conditions
    );
    assert_eq!(cluster.child_names("logger").await.len(), 3);
    cluster.assert_events("logger", "SuccessfulCreate", 3).await;
}

/// The same for a template change the apiserver refuses on the existing children: they keep what
/// they have, the failure is reported once, and nothing is retried until the template changes.
#[tokio::test]
async fn a_template_change_the_apiserver_refuses_leaves_the_children_as_they_were() {
    let (cluster, _controller) = Cluster::with_controller().await;
    let before = cluster.roll_out_logger(&["tor1-01", "tor1-02"]).await;
    let children_before = cluster.children_of("logger").await;
    cluster.reset_requests().await;

    let patch = json!({"spec": {"template": {
        "metadata": {"annotations": {"not a key!": "x"}},
        "spec": {"execution": {"args": ["v2"]}}
    }}});
    cluster
        .deployments
        .patch("logger", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("the CRD's schema accepts the template");
    let deployment = cluster
        .wait_for_deployment("logger", "ProcessFailure=True (FailedUpdate)", |d| {
            d.metadata.generation > before.metadata.generation
                && d.status.as_ref().is_some_and(|s| {
                    s.observed_generation == d.metadata.generation
                        && s.conditions.iter().any(|c| {
                            c.type_ == "ProcessFailure"
                                && c.status == "True"
                                && c.reason == "FailedUpdate"
                                && c.message.contains("metadata.annotations")
                        })
                })
        })
        .await;
    let status = deployment.status.expect("status");
    assert_eq!(
        (
            status.desired_number_scheduled,
            status.current_number_scheduled,
            status.updated_number_scheduled
        ),
        (2, 2, 0)
    );
    for (before, after) in children_before
        .iter()
        .zip(cluster.children_of("logger").await)
    {
        assert_eq!(before.resource_version(), after.resource_version());
    }
    let patches: Vec<u16> = cluster
        .requests()
        .await
        .into_iter()
        .filter(|r| r.verb == "patch" && r.resource == "deviceprocesses")
        .map(|r| r.code)
        .collect();
    assert_eq!(
        patches,
        [422],
        "one refused patch, the other child not tried"
    );
    cluster.assert_events("logger", "FailedUpdate", 1).await;

    let fix = json!({"spec": {"template": {"metadata": {"annotations": {"not a key!": null}}}}});
    cluster
        .deployments
        .patch("logger", &PatchParams::default(), &Patch::Merge(&fix))
        .await
        .expect("fix the template");
    let deployment = cluster.converged("logger", 2).await;
    assert!(deployment
        .status
        .expect("status")
        .conditions
        .iter()
        .all(|c| c.type_ != "ProcessFailure"));
    for child in cluster.children_of("logger").await {
        assert_eq!(child.spec.execution.args, ["v2"], "{}", child.name_any());
    }
}

/// A child edited by hand is brought back to the template with one JSON merge patch under the
/// resourceVersion it was read at: the spec and labels as the template says (a label added by
/// hand is removed: `null` in a merge patch deletes), while annotations other tools wrote stay.
#[tokio::test]
async fn a_child_edited_by_hand_is_brought_back_and_foreign_annotations_stay() {
    let (cluster, _controller) = Cluster::with_controller().await;
    cluster.roll_out_logger(&["tor1-01"]).await;
    cluster.reset_requests().await;

    let edit = json!({
        "metadata": {
            "labels": {"extra": "by-hand"},
            "annotations": {"example.com/note": "keep me", "apollo.azure.com/owner-team": "other"}
        },
        "spec": {"execution": {"args": ["hacked"]}}
    });
    let edited = cluster
        .children
        .patch(
            "logger-tor1-01",
            &PatchParams::default(),
            &Patch::Merge(&edit),
        )
        .await
        .expect("edit the child");
    let restored = wait_for(DEADLINE, "the child is back on the template", || async {
        let child = cluster.children.get("logger-tor1-01").await.ok()?;
        (child.metadata.generation > edited.metadata.generation).then_some(child)
    })
    .await;
    assert_eq!(restored.spec, template(&["v1"]).spec.for_device("tor1-01"));
    assert_eq!(
        restored.labels(),
        &labels(&[
            ("app", "logger"),
            (LABEL_DEVICE_NAME, "tor1-01"),
            (LABEL_DEPLOYMENT, "logger")
        ])
    );
    assert_eq!(
        restored.annotations(),
        &labels(&[
            ("apollo.azure.com/owner-team", "netops"),
            ("example.com/note", "keep me")
        ])
    );
    let patches: Vec<_> = cluster
        .requests()
        .await
        .into_iter()
        // Lease renewals aside.
        .filter(|r| r.is_write() && r.resource != "leases")
        .map(|r| (r.verb, r.resource, r.name, r.code))
        .collect();
    assert_eq!(
        patches,
        [(
            "patch".to_owned(),
            "deviceprocesses".to_owned(),
            "logger-tor1-01".to_owned(),
            200
        )],
        "one patch of the child, nothing else"
    );
}

/// kube-apiserver killed and restarted (every watch and connection drops; the new apiserver's
/// watch cache starts from etcd, so resuming a watch may be answered 410 Gone and the caches
/// relist; until its RBAC caches have synced it refuses requests with 403): the controller keeps
/// its lease or takes it again, and converges on what changed once its watch caches' backoff
/// lets them retry (see [`WATCH_RECOVERY_DEADLINE`]).
#[tokio::test]
async fn the_controller_rides_out_an_apiserver_restart() {
    let cluster = Cluster::start_private(ControlPlaneOptions::default()).await;
    let _controller = cluster.controller("controller-a").await;
    cluster.roll_out_logger(&["tor1-01", "tor1-02"]).await;

    cluster.control_plane().restart_apiserver().await;
    // The test's own client may have lost its connection too: create through a fresh one.
    let switches: Api<NetworkSwitch> = Api::namespaced(
        cluster.control_plane().admin_client().await,
        cluster.namespace(),
    );
    switches
        .create(&PostParams::default(), &new_switch("tor1-03", &[ROLE_TOR]))
        .await
        .expect("create a switch after the restart");
    cluster
        .converged_within(WATCH_RECOVERY_DEADLINE, "logger", 3)
        .await;
    assert_eq!(
        cluster.child_names("logger").await,
        ["logger-tor1-01", "logger-tor1-02", "logger-tor1-03"]
    );
    assert_eq!(
        cluster.count("create", "deviceprocesses", None).await,
        3,
        "no child created twice"
    );
    cluster.assert_events("logger", "SuccessfulCreate", 3).await;
    cluster.wait_for_holder("controller-a").await;
}

/// `kubectl delete dpd logger --cascade=orphan`, then the deployment is created again (how one
/// replaces a deployment without touching the running processes): kube-controller-manager's
/// garbage collector strips the children's owner reference, and the new deployment adopts them
/// (as a DaemonSet adopts orphaned Pods) instead of trying, and failing with 409 for as long as
/// they exist, to create children under the names they hold.
#[tokio::test]
async fn children_orphaned_by_their_deleted_deployment_are_adopted_by_its_successor() {
    let (cluster, _controller) = Cluster::with_controller().await;
    cluster.roll_out_logger(&["tor1-01", "tor1-02"]).await;
    let before = cluster.children_of("logger").await;
    cluster.wait_for_garbage_collector().await;
    let orphan = DeleteParams {
        propagation_policy: Some(kube::api::PropagationPolicy::Orphan),
        ..DeleteParams::default()
    };
    cluster
        .deployments
        .delete("logger", &orphan)
        .await
        .expect("delete deployment, orphaning its children");
    wait_until(DEADLINE, "the children are orphaned", || async {
        matches!(cluster.deployments.get_opt("logger").await, Ok(None))
            && cluster
                .children_of("logger")
                .await
                .iter()
                .all(|c| c.owner_references().is_empty())
    })
    .await;
    cluster.reset_requests().await;

    let successor = cluster.deployment("logger", tor_selector(), &["v1"]).await;
    cluster.converged("logger", 2).await;
    let after = cluster.children_of("logger").await;
    for (before, after) in before.iter().zip(&after) {
        assert_eq!(before.uid(), after.uid(), "the same object, adopted");
        let owners = after.owner_references();
        assert_eq!(owners.len(), 1, "{owners:?}");
        assert_eq!(Some(&owners[0].uid), successor.metadata.uid.as_ref());
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].block_owner_deletion, Some(true));
    }
    let mut child_writes: Vec<_> = cluster
        .requests()
        .await
        .into_iter()
        .filter(|r| r.is_write() && r.resource == "deviceprocesses")
        .map(|r| (r.verb, r.name, r.code))
        .collect();
    child_writes.sort();
    assert_eq!(
        child_writes,
        [
            ("patch".to_owned(), "logger-tor1-01".to_owned(), 200),
            ("patch".to_owned(), "logger-tor1-02".to_owned(), 200)
        ],
        "one adopting patch per child, no create"
    );
}

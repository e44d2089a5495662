//! Conformance of the write paths kube-rs controllers and leader election depend on: server-side
//! apply ownership, JSON patch `test` (kube's finalizer helper), strategic merge patch, finalizers,
//! cascading deletion, dry runs, generateName, streaming lists, Events and Lease elections.

mod common;

use std::sync::Arc;

use apollo_crds::DeviceProcess;
use common::*;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::Barrier;

fn lease_body(holder: &str) -> serde_json::Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader"},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}})
}

#[tokio::test]
async fn server_side_apply_conflicts_between_managers_and_force_takes_ownership() {
    let (_sim, client) = start().await;
    let leases: Api<Lease> = Api::default_namespaced(client);
    let as_a = PatchParams::apply("candidate-a");
    let created = leases
        .patch("leader", &as_a, &Patch::Apply(lease_body("a")))
        .await
        .expect("apply creates");
    assert_eq!(
        created
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("a")
    );
    let managers: Vec<(String, String)> = created
        .managed_fields()
        .iter()
        .map(|m| {
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        managers,
        vec![("candidate-a".to_string(), "Apply".to_string())]
    );

    let conflict = api_error(
        leases
            .patch(
                "leader",
                &PatchParams::apply("candidate-b"),
                &Patch::Apply(lease_body("b")),
            )
            .await
            .expect_err("conflict"),
    );
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    let causes = conflict.details.expect("details").causes;
    assert_eq!(causes.len(), 1);
    assert_eq!(causes[0].field, ".spec.holderIdentity");
    assert_eq!(causes[0].message, "conflict with \"candidate-a\"");
    assert_eq!(causes[0].reason, "FieldManagerConflict");

    let forced = leases
        .patch(
            "leader",
            &PatchParams::apply("candidate-b").force(),
            &Patch::Apply(lease_body("b")),
        )
        .await
        .expect("force");
    assert_eq!(
        forced
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("b")
    );
    let back = api_error(
        leases
            .patch("leader", &as_a, &Patch::Apply(lease_body("a")))
            .await
            .expect_err("a lost ownership"),
    );
    assert_eq!(back.code, 409);

    // A field dropped from one's configuration stays while another manager still owns it...
    let minimal = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "leader"}, "spec": {"holderIdentity": "b"}});
    let trimmed = leases
        .patch(
            "leader",
            &PatchParams::apply("candidate-b"),
            &Patch::Apply(minimal.clone()),
        )
        .await
        .expect("apply");
    assert_eq!(
        trimmed.spec.as_ref().and_then(|s| s.lease_duration_seconds),
        Some(15),
        "candidate-a still owns it"
    );
    assert!(managers_of(&trimmed).contains(&"candidate-a".to_string()));
    // ...and re-applying the same configuration changes nothing.
    let again = leases
        .patch(
            "leader",
            &PatchParams::apply("candidate-b"),
            &Patch::Apply(minimal),
        )
        .await
        .expect("apply");
    assert_eq!(again.resource_version(), trimmed.resource_version());

    // A sole owner that stops applying a field removes it.
    let maps: Api<ConfigMap> = Api::default_namespaced(leases.clone().into_client());
    let config = |data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied"}, "data": data});
    maps.patch(
        "applied",
        &PatchParams::apply("solo"),
        &Patch::Apply(config(json!({"x": "1", "y": "2"}))),
    )
    .await
    .expect("apply");
    let shrunk = maps
        .patch(
            "applied",
            &PatchParams::apply("solo"),
            &Patch::Apply(config(json!({"x": "1"}))),
        )
        .await
        .expect("apply");
    assert_eq!(
        shrunk.data.expect("data").keys().collect::<Vec<_>>(),
        vec!["x"]
    );
}

fn managers_of<K: Resource>(object: &K) -> Vec<String> {
    object
        .meta()
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect()
}

#[tokio::test]
async fn lease_election_with_two_contenders_has_exactly_one_winner() {
    let (_sim, client) = start().await;
    let leases: Api<Lease> = Api::default_namespaced(client);

    // Round 1: both try to create the Lease; the apiserver lets exactly one through.
    let barrier = Arc::new(Barrier::new(2));
    let contend_create = |identity: &'static str| {
        let leases = leases.clone();
        let barrier = barrier.clone();
        tokio::spawn(async move {
            let lease: Lease = serde_json::from_value(lease_body(identity)).expect("lease");
            barrier.wait().await;
            leases.create(&PostParams::default(), &lease).await
        })
    };
    let (a, b) = tokio::join!(contend_create("a"), contend_create("b"));
    let results = [a.expect("task"), b.expect("task")];
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "exactly one create wins"
    );
    let loser = results.into_iter().find_map(Result::err).expect("a loser");
    assert_eq!(api_error(loser).reason, "AlreadyExists");

    // Round 2: the holder steps down; both read the same version and replace with it.
    merge_patch(&leases, "leader", json!({"spec": {"holderIdentity": ""}}))
        .await
        .expect("step down");
    let barrier = Arc::new(Barrier::new(2));
    let contend_replace = |identity: &'static str| {
        let leases = leases.clone();
        let barrier = barrier.clone();
        tokio::spawn(async move {
            let mut lease = leases.get("leader").await.expect("get");
            barrier.wait().await;
            if let Some(spec) = lease.spec.as_mut() {
                spec.holder_identity = Some(identity.to_string());
            }
            leases
                .replace("leader", &PostParams::default(), &lease)
                .await
                .map(|_| identity)
        })
    };
    let (a, b) = tokio::join!(contend_replace("a"), contend_replace("b"));
    let results = [a.expect("task"), b.expect("task")];
    let winners: Vec<&str> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    assert_eq!(winners.len(), 1, "exactly one replace wins");
    let loser = results.into_iter().find_map(Result::err).expect("a loser");
    assert_eq!(api_error(loser).reason, "Conflict");
    let holder = leases
        .get("leader")
        .await
        .expect("get")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(holder.as_deref(), Some(winners[0]));

    // Round 3: server-side apply without force (kube-lease-manager's lock): the second applier loses.
    leases
        .delete("leader", &DeleteParams::default())
        .await
        .expect("delete");
    let barrier = Arc::new(Barrier::new(2));
    let contend_apply = |identity: &'static str| {
        let leases = leases.clone();
        let barrier = barrier.clone();
        tokio::spawn(async move {
            barrier.wait().await;
            leases
                .patch(
                    "leader",
                    &PatchParams::apply(&format!("lease-{identity}")),
                    &Patch::Apply(lease_body(identity)),
                )
                .await
        })
    };
    let (a, b) = tokio::join!(contend_apply("a"), contend_apply("b"));
    let results = [a.expect("task"), b.expect("task")];
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "exactly one apply wins"
    );
    let loser = results.into_iter().find_map(Result::err).expect("a loser");
    assert_eq!(api_error(loser).reason, "Conflict");
}

#[tokio::test]
async fn kube_finalizer_helper_adds_cleans_up_and_removes_its_finalizer() {
    let (_sim, client) = start_with_crds().await;
    let processes: Api<DeviceProcess> = Api::default_namespaced(client.clone());
    create_process(&processes, "p", "tor1").await;
    const NAME: &str = "apollo.azure.com/cleanup";

    let reconcile = |object: DeviceProcess| {
        let processes = processes.clone();
        async move {
            finalizer(&processes, NAME, Arc::new(object), |event| async move {
                Ok::<_, std::io::Error>(match event {
                    FinalizerEvent::Apply(_) => Action::await_change(),
                    FinalizerEvent::Cleanup(_) => Action::await_change(),
                })
            })
            .await
        }
    };
    // First pass: JSON patch `test /metadata/finalizers == null` then `add` (apiserver semantics).
    reconcile(processes.get("p").await.expect("get"))
        .await
        .expect("finalizer added");
    let with_finalizer = processes.get("p").await.expect("get");
    assert_eq!(with_finalizer.finalizers(), [NAME.to_string()]);
    reconcile(with_finalizer).await.expect("apply pass");

    processes
        .delete("p", &DeleteParams::default())
        .await
        .expect("delete marks");
    let terminating = processes.get("p").await.expect("still present");
    assert!(terminating.metadata.deletion_timestamp.is_some());
    let late = api_error(
        merge_patch(
            &processes,
            "p",
            json!({"metadata": {"finalizers": [NAME, "late/one"]}}),
        )
        .await
        .expect_err("no new finalizers while deleting"),
    );
    assert_eq!(late.code, 422);
    reconcile(terminating)
        .await
        .expect("cleanup removes the finalizer");
    assert!(
        processes.get_opt("p").await.expect("get").is_none(),
        "removing the last finalizer deletes"
    );
}

#[tokio::test]
async fn json_patch_test_failures_are_422() {
    let (_sim, client) = start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let map: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "m"}, "data": {"a": "1"}})).expect("cm");
    maps.create(&PostParams::default(), &map)
        .await
        .expect("create");
    let failing = json!([
        {"op": "test", "path": "/data/a", "value": "2"},
        {"op": "replace", "path": "/data/a", "value": "3"},
    ]);
    let request = http::Request::builder()
        .method("PATCH")
        .uri("/api/v1/namespaces/default/configmaps/m")
        .header("content-type", "application/json-patch+json")
        .body(failing.to_string().into_bytes())
        .expect("request");
    let response = within(client.send(request.map(Into::into)))
        .await
        .expect("response");
    assert_eq!(response.status().as_u16(), 422);
    assert_eq!(
        maps.get("m").await.expect("get").data.expect("data")["a"],
        "1"
    );
}

#[tokio::test]
async fn strategic_merge_patch_on_built_ins_and_415_on_custom_resources() {
    let (_sim, client) = start_with_crds().await;
    let sets: Api<StatefulSet> = Api::default_namespaced(client.clone());
    let set: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {"keep": "1", "drop": "1"}},
        "spec": {"replicas": 1, "serviceName": "web", "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [
                     {"name": "app", "image": "app:1"}, {"name": "sidecar", "image": "side:1"}]}}},
    }))
    .expect("sts");
    sets.create(&PostParams::default(), &set)
        .await
        .expect("create");
    let patch = json!({
        "metadata": {"labels": {"drop": null}},
        "spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "app:2"},
            {"name": "sidecar", "$patch": "delete"},
            {"name": "new", "image": "new:1"},
        ]}}},
    });
    let patched = sets
        .patch("web", &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .expect("smp");
    let labels = patched.metadata.labels.clone().expect("labels");
    assert!(labels.contains_key("keep") && !labels.contains_key("drop"));
    let containers: Vec<(String, Option<String>)> = patched
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec")
        .containers
        .into_iter()
        .map(|c| (c.name, c.image))
        .collect();
    assert_eq!(
        containers,
        vec![
            ("app".to_string(), Some("app:2".to_string())),
            ("new".to_string(), Some("new:1".to_string()))
        ]
    );
    let processes: Api<DeviceProcess> = Api::default_namespaced(client);
    create_process(&processes, "p", "tor1").await;
    let unsupported = api_error(
        processes
            .patch(
                "p",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {}})),
            )
            .await
            .expect_err("415"),
    );
    assert_eq!(
        (unsupported.code, unsupported.reason.as_str()),
        (415, "UnsupportedMediaType")
    );
}

fn owned_map(name: &str, owner: &ConfigMap, finalizers: &[&str]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "finalizers": finalizers, "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": owner.name_any(),
            "uid": owner.uid().expect("uid"), "blockOwnerDeletion": true,
        }]},
    }))
    .expect("cm")
}

fn plain_map(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}})).expect("cm")
}

#[tokio::test]
async fn cascading_deletion_background_foreground_and_orphan() {
    let (_sim, client) = start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let pp = PostParams::default();

    let owner = maps
        .create(&pp, &plain_map("bg-owner"))
        .await
        .expect("owner");
    maps.create(&pp, &owned_map("bg-child", &owner, &[]))
        .await
        .expect("child");
    maps.delete("bg-owner", &DeleteParams::background())
        .await
        .expect("delete");
    eventually_gone("background collection", &maps, "bg-child").await;

    let owner = maps
        .create(&pp, &plain_map("orphan-owner"))
        .await
        .expect("owner");
    maps.create(&pp, &owned_map("orphan-child", &owner, &[]))
        .await
        .expect("child");
    maps.delete("orphan-owner", &DeleteParams::orphan())
        .await
        .expect("delete");
    eventually_gone("the owner to go", &maps, "orphan-owner").await;
    let orphan = maps.get("orphan-child").await.expect("orphan kept");
    assert!(
        orphan.owner_references().is_empty(),
        "orphaned dependents lose the owner reference"
    );

    let owner = maps
        .create(&pp, &plain_map("fg-owner"))
        .await
        .expect("owner");
    maps.create(&pp, &owned_map("fg-child", &owner, &["test/hold"]))
        .await
        .expect("child");
    let foreground = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Foreground),
        ..Default::default()
    };
    maps.delete("fg-owner", &foreground).await.expect("delete");
    let waiting = maps
        .get("fg-owner")
        .await
        .expect("owner waits for its dependents");
    assert!(waiting
        .finalizers()
        .contains(&"foregroundDeletion".to_string()));
    assert!(waiting.metadata.deletion_timestamp.is_some());
    let child = maps
        .get("fg-child")
        .await
        .expect("child held by its finalizer");
    assert!(child.metadata.deletion_timestamp.is_some());
    merge_patch(&maps, "fg-child", json!({"metadata": {"finalizers": null}}))
        .await
        .expect("release child");
    eventually_gone("the foreground owner to go", &maps, "fg-owner").await;
    assert!(maps.get_opt("fg-child").await.expect("get").is_none());
}

#[tokio::test]
async fn namespace_and_crd_deletion_remove_their_contents() {
    let (_sim, client) = start_with_crds().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "scratch"}})).expect("ns");
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("create ns");
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "scratch");
    maps.create(&PostParams::default(), &plain_map("inside"))
        .await
        .expect("create");
    namespaces
        .delete("scratch", &DeleteParams::default())
        .await
        .expect("delete ns");
    eventually_gone("the namespace to go", &namespaces, "scratch").await;
    assert!(maps
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .is_empty());

    let processes: Api<DeviceProcess> = Api::default_namespaced(client.clone());
    create_process(&processes, "p", "tor1").await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("deviceprocesses.azure.com", &DeleteParams::default())
        .await
        .expect("delete crd");
    let gone = api_error(processes.get("p").await.expect_err("no longer served"));
    assert_eq!(gone.code, 404);
}

#[tokio::test]
async fn dry_run_persists_nothing_and_generate_name_fills_names() {
    let (_sim, client) = start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let rv_before = maps
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version;
    let preview = maps
        .create(&dry, &plain_map("dry"))
        .await
        .expect("dry create");
    assert_eq!(preview.name_any(), "dry");
    assert!(maps.get_opt("dry").await.expect("get").is_none());
    maps.create(&PostParams::default(), &plain_map("real"))
        .await
        .expect("create");
    let dry_delete = DeleteParams {
        dry_run: true,
        ..Default::default()
    };
    maps.delete("real", &dry_delete).await.expect("dry delete");
    assert!(maps.get_opt("real").await.expect("get").is_some());
    let rv_after = maps
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version;
    assert_ne!(
        rv_before, rv_after,
        "only the real create moved the resourceVersion"
    );

    let generated: ConfigMap =
        serde_json::from_value(json!({"metadata": {"generateName": "gen-"}})).expect("cm");
    let first = maps
        .create(&PostParams::default(), &generated)
        .await
        .expect("create");
    let second = maps
        .create(&PostParams::default(), &generated)
        .await
        .expect("create");
    assert!(first.name_any().starts_with("gen-") && first.name_any().len() == "gen-".len() + 5);
    assert_ne!(first.name_any(), second.name_any());
}

#[tokio::test]
async fn streaming_list_watcher_gets_initial_events_without_a_list() {
    let (_sim, client) = start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    for name in ["a", "b"] {
        maps.create(&PostParams::default(), &plain_map(name))
            .await
            .expect("create");
    }
    reset_requests(&client).await;
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(maps.clone(), watcher::Config::default().streaming_lists()),
    )
    .applied_objects()
    .boxed();
    let driver = tokio::spawn(async move { stream.for_each(|_| async {}).await });
    within(reader.wait_until_ready())
        .await
        .expect("ready after the initial-events bookmark");
    assert_eq!(reader.state().len(), 2);
    maps.create(&PostParams::default(), &plain_map("c"))
        .await
        .expect("create");
    eventually("the live event", || async {
        (reader.state().len() == 3).then_some(())
    })
    .await;
    assert_eq!(
        request_count(&client, "list", "configmaps", "").await,
        0,
        "no list with streaming lists"
    );
    driver.abort();
}

#[tokio::test]
async fn recorder_events_are_served_through_both_event_apis() {
    let (_sim, client) = start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let subject = maps
        .create(&PostParams::default(), &plain_map("subject"))
        .await
        .expect("create");
    let other = maps
        .create(&PostParams::default(), &plain_map("other"))
        .await
        .expect("create");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "apollo-controller".into(),
            instance: None,
        },
    );
    let event = Event {
        type_: EventType::Normal,
        reason: "Synced".into(),
        note: Some("synced".into()),
        action: "Sync".into(),
        secondary: None,
    };
    recorder
        .publish(&event, &subject.object_ref(&()))
        .await
        .expect("publish");
    recorder
        .publish(&event, &other.object_ref(&()))
        .await
        .expect("publish");

    let core: Api<CoreEvent> = Api::default_namespaced(client.clone());
    let selector = format!("involvedObject.kind=ConfigMap,involvedObject.name=subject,involvedObject.namespace=default,involvedObject.uid={}", subject.uid().expect("uid"));
    let listed = core
        .list(&ListParams::default().fields(&selector))
        .await
        .expect("list core events");
    assert_eq!(listed.items.len(), 1);
    let core_event = &listed.items[0];
    assert_eq!(core_event.message.as_deref(), Some("synced"));
    assert_eq!(
        core_event.reporting_component.as_deref(),
        Some("apollo-controller")
    );
    assert_eq!(core_event.involved_object.name.as_deref(), Some("subject"));

    let v1: Api<k8s_openapi::api::events::v1::Event> = Api::default_namespaced(client);
    let listed = v1
        .list(&ListParams::default().fields("regarding.name=other"))
        .await
        .expect("list events.k8s.io");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].note.as_deref(), Some("synced"));
    assert_eq!(
        listed.items[0].reporting_controller.as_deref(),
        Some("apollo-controller")
    );
}

#[tokio::test]
async fn custom_resources_are_pruned_defaulted_and_validated_against_their_schema() {
    let (_sim, client) = start_with_crds().await;
    let processes: Api<DeviceProcess> = Api::default_namespaced(client.clone());
    let raw: Api<kube::api::DynamicObject> = Api::default_namespaced_with(
        client.clone(),
        &kube::api::ApiResource::erase::<DeviceProcess>(&()),
    );
    create_process(&processes, "p", "tor1").await;
    let pruned = merge_patch_status(
        &processes,
        "p",
        json!({"status": {"phase": "Pending", "bogus": 1}}),
    )
    .await
    .expect("unknown status fields are pruned");
    let stored = raw.get("p").await.expect("get");
    assert_eq!(stored.data["status"], json!({"phase": "Pending"}));
    assert_eq!(
        pruned.status.and_then(|s| s.phase).as_deref(),
        Some("Pending")
    );

    let strict = PatchParams {
        field_validation: Some(kube::api::ValidationDirective::Strict),
        ..Default::default()
    };
    let rejected = api_error(
        processes
            .patch(
                "p",
                &strict,
                &Patch::Merge(json!({"spec": {"surprise": true}})),
            )
            .await
            .expect_err("strict rejects unknown fields"),
    );
    assert_eq!(
        (rejected.code, rejected.message.as_str()),
        (
            400,
            "strict decoding error: unknown field \"spec.surprise\""
        )
    );

    let invalid = api_error(
        merge_patch(
            &processes,
            "p",
            json!({"spec": {"execution": {"backend": "teleport"}}}),
        )
        .await
        .expect_err("enum violation"),
    );
    assert_eq!((invalid.code, invalid.reason.as_str()), (422, "Invalid"));
    assert!(
        invalid.message.starts_with(
            "DeviceProcess.azure.com \"p\" is invalid: spec.execution.backend: Unsupported value"
        ),
        "{}",
        invalid.message
    );
    let missing = api_error(
        merge_patch_status(
            &processes,
            "p",
            json!({"status": {"conditions": [{"type": "AgentConnected", "status": "True"}]}}),
        )
        .await
        .expect_err("required condition fields"),
    );
    assert_eq!(missing.code, 422);
    assert!(
        missing
            .message
            .contains("status.conditions[0].lastTransitionTime: Required value"),
        "{}",
        missing.message
    );
}

#[tokio::test]
async fn kube_controller_reconciles_owners_when_owned_children_change() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use apollo_crds::DeviceProcessDeployment;
    use kube::runtime::Controller;

    let (_sim, client) = start_with_crds().await;
    let deployments: Api<DeviceProcessDeployment> = Api::default_namespaced(client.clone());
    let processes: Api<DeviceProcess> = Api::default_namespaced(client.clone());
    let reconciles = Arc::new(AtomicUsize::new(0));

    #[derive(Debug, thiserror::Error)]
    #[error("never fails")]
    struct Never;
    let counter = reconciles.clone();
    let controller = Controller::new(deployments.clone(), watcher::Config::default())
        .owns(processes.clone(), watcher::Config::default())
        .run(
            move |_deployment: Arc<DeviceProcessDeployment>, _ctx: Arc<()>| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Never>(Action::await_change())
                }
            },
            |_, _: &Never, _| Action::await_change(),
            Arc::new(()),
        )
        .for_each(|_| async {});
    let driver = tokio::spawn(controller);

    let deployment: DeviceProcessDeployment = serde_json::from_value(json!({
        "apiVersion": "azure.com/v1alpha1", "kind": "DeviceProcessDeployment",
        "metadata": {"name": "demo"},
        "spec": {"selector": {"matchLabels": {"site": "sfo"}},
                 "template": {"spec": {"artifact": {"type": "oci", "url": "alpine"}, "execution": {"backend": "container"}}}},
    }))
    .expect("deployment");
    let deployment = deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create");
    eventually("the first reconcile", || async {
        (reconciles.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;

    let mut child = device_process("demo-tor1", "tor1");
    child.metadata.owner_references = Some(vec![deployment
        .controller_owner_ref(&())
        .expect("owner ref")]);
    processes
        .create(&PostParams::default(), &child)
        .await
        .expect("child");
    eventually("a reconcile for the new child", || async {
        (reconciles.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    let before = reconciles.load(Ordering::SeqCst);
    merge_patch_status(
        &processes,
        "demo-tor1",
        json!({"status": {"phase": "Pending"}}),
    )
    .await
    .expect("child status");
    eventually("a reconcile for the child's status", || async {
        (reconciles.load(Ordering::SeqCst) > before).then_some(())
    })
    .await;
    driver.abort();
}

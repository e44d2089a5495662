//! Conformance of kubesim's core against the kube client: CRUD, conflicts, subresources,
//! selectors, watches (resume, bookmarks, 410 relist) and the no-op write rule.

mod common;

use std::time::Duration;

use apollo_crds::DeviceProcess;
use common::*;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::ResourceExt;
use serde_json::json;

fn config_map(name: &str, labels: serde_json::Value) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}),
    )
    .expect("ConfigMap")
}

#[tokio::test]
async fn crud_round_trip_with_real_status_errors() {
    let (_sim, client) = start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let created = maps
        .create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .expect("create");
    assert!(created.metadata.uid.is_some() && created.metadata.creation_timestamp.is_some());
    let duplicate = api_error(
        maps.create(&PostParams::default(), &config_map("a", json!({})))
            .await
            .expect_err("exists"),
    );
    assert_eq!(
        (duplicate.code, duplicate.reason.as_str()),
        (409, "AlreadyExists")
    );
    assert_eq!(duplicate.message, "configmaps \"a\" already exists");

    let mut fetched = maps.get("a").await.expect("get");
    fetched.data = Some([("k".to_string(), "w".to_string())].into());
    let replaced = maps
        .replace("a", &PostParams::default(), &fetched)
        .await
        .expect("replace");
    assert_ne!(replaced.resource_version(), created.resource_version());
    let patched = merge_patch(&maps, "a", json!({"data": {"x": "y"}}))
        .await
        .expect("patch");
    assert_eq!(patched.data.expect("data").len(), 2);
    assert_eq!(
        maps.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );

    maps.delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    let missing = api_error(maps.get("a").await.expect_err("gone"));
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "configmaps \"a\" not found");
    let no_namespace: Api<ConfigMap> = Api::namespaced(client, "nope");
    let error = api_error(
        no_namespace
            .create(&PostParams::default(), &config_map("a", json!({})))
            .await
            .expect_err("no ns"),
    );
    assert_eq!(
        (error.code, error.message.as_str()),
        (404, "namespaces \"nope\" not found")
    );
}

#[tokio::test]
async fn stale_resource_versions_conflict_on_replace_and_merge_patch() {
    let (_sim, client) = start_with_crds().await;
    let processes: Api<DeviceProcess> = Api::default_namespaced(client);
    let created = create_process(&processes, "p", "tor1").await;
    merge_patch(
        &processes,
        "p",
        json!({"spec": {"deviceRef": {"name": "tor2"}}}),
    )
    .await
    .expect("patch");
    let conflict = api_error(
        processes
            .replace("p", &PostParams::default(), &created)
            .await
            .expect_err("stale"),
    );
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    assert!(
        conflict.message.contains("the object has been modified"),
        "{}",
        conflict.message
    );
    let stale_rv = created.resource_version().expect("rv");
    let precondition = Patch::Merge(
        json!({"metadata": {"resourceVersion": stale_rv}, "spec": {"deviceRef": {"name": "tor3"}}}),
    );
    let conflict = api_error(
        processes
            .patch("p", &PatchParams::default(), &precondition)
            .await
            .expect_err("stale"),
    );
    assert_eq!(conflict.code, 409);
    assert_eq!(
        processes.get("p").await.expect("get").spec.device_ref.name,
        "tor2"
    );
}

#[tokio::test]
async fn status_subresource_and_generation_rules() {
    let (_sim, client) = start_with_crds().await;
    let processes: Api<DeviceProcess> = Api::default_namespaced(client);
    let created = create_process(&processes, "p", "tor1").await;
    assert_eq!(created.metadata.generation, Some(1));
    let with_status = merge_patch_status(
        &processes,
        "p",
        json!({"status": {"phase": "Pending"}, "spec": {"deviceRef": {"name": "ignored"}}}),
    )
    .await
    .expect("status patch");
    assert_eq!(
        with_status.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending")
    );
    assert_eq!(
        with_status.spec.device_ref.name, "tor1",
        "status writes ignore spec"
    );
    assert_eq!(with_status.metadata.generation, Some(1));
    let with_spec = merge_patch(
        &processes,
        "p",
        json!({"spec": {"deviceRef": {"name": "tor2"}}, "status": {"phase": "Ignored"}}),
    )
    .await
    .expect("spec patch");
    assert_eq!(with_spec.metadata.generation, Some(2));
    assert_eq!(
        with_spec.status.and_then(|s| s.phase).as_deref(),
        Some("Pending"),
        "main writes keep status"
    );
    let labelled = merge_patch(
        &processes,
        "p",
        json!({"metadata": {"labels": {"extra": "1"}}}),
    )
    .await
    .expect("label patch");
    assert_eq!(
        labelled.metadata.generation,
        Some(2),
        "metadata changes do not bump generation"
    );
}

#[tokio::test]
async fn no_op_patch_keeps_resource_version_and_wakes_no_watcher() {
    let (_sim, client) = start_with_crds().await;
    let processes: Api<DeviceProcess> = Api::default_namespaced(client.clone());
    let created = create_process(&processes, "quiet", "tor1").await;
    merge_patch_status(&processes, "quiet", json!({"status": {"phase": "Pending"}}))
        .await
        .expect("status");
    let before = processes.get("quiet").await.expect("get");
    let rv = before.resource_version().expect("rv");
    let mut events = processes
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();

    reset_requests(&client).await;
    let same_status =
        merge_patch_status(&processes, "quiet", json!({"status": {"phase": "Pending"}}))
            .await
            .expect("no-op status patch");
    let same_spec = merge_patch(
        &processes,
        "quiet",
        json!({"spec": {"deviceRef": {"name": "tor1"}}}),
    )
    .await
    .expect("no-op spec patch");
    assert_eq!(same_status.resource_version().as_deref(), Some(rv.as_str()));
    assert_eq!(same_spec.resource_version().as_deref(), Some(rv.as_str()));
    assert_eq!(same_spec.metadata.generation, created.metadata.generation);
    assert_eq!(
        request_count(&client, "patch", "deviceprocesses", "status").await,
        1
    );

    // A real change to another object must be the first thing the watcher sees.
    create_process(&processes, "loud", "tor2").await;
    let first = next_event(&mut events).await;
    match first {
        WatchEvent::Added(object) => assert_eq!(object.name_any(), "loud"),
        other => panic!("the no-op patches woke the watcher: {other:?}"),
    }
}

#[tokio::test]
async fn reflector_relists_after_a_forced_410_and_stays_correct() {
    let (_sim, client) = start_with_crds().await;
    let processes: Api<DeviceProcess> = Api::default_namespaced(client.clone());
    create_process(&processes, "one", "tor1").await;
    reset_requests(&client).await;

    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(processes.clone(), watcher::Config::default()),
    )
    .applied_objects()
    .boxed();
    let driver = tokio::spawn(async move { stream.for_each(|_| async {}).await });
    within(reader.wait_until_ready())
        .await
        .expect("store ready");
    assert_eq!(reader.state().len(), 1);
    eventually("the first watch", || async {
        (request_count(&client, "watch", "deviceprocesses", "").await >= 1).then_some(())
    })
    .await;
    assert_eq!(
        request_count(&client, "list", "deviceprocesses", "").await,
        1
    );

    inject(
        &client,
        json!({"verb": "watch", "resource": "deviceprocesses", "code": 410, "times": 1}),
    )
    .await;
    inject(&client, json!({"dropWatches": true})).await;
    eventually("a relist after 410", || async {
        (request_count(&client, "list", "deviceprocesses", "").await == 2).then_some(())
    })
    .await;

    create_process(&processes, "two", "tor2").await;
    eventually("the store to see the new object", || async {
        (reader.state().len() == 2).then_some(())
    })
    .await;
    processes
        .delete("one", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the store to drop the deleted object", || async {
        let names: Vec<String> = reader.state().iter().map(|o| o.name_any()).collect();
        (names == vec!["two".to_string()]).then_some(())
    })
    .await;
    assert_eq!(
        request_count(&client, "list", "deviceprocesses", "").await,
        2,
        "exactly one relist"
    );
    driver.abort();
}

#[tokio::test]
async fn watch_resumes_from_resource_versions_and_expires_outside_the_window() {
    let options = kubesim::Options {
        history_window: 3,
        bookmark_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let (_sim, client) = start_with(options).await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client);
    let first = maps
        .create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .expect("create");
    let start_rv = first.resource_version().expect("rv");
    maps.create(&PostParams::default(), &config_map("b", json!({})))
        .await
        .expect("create");

    let mut resumed = maps
        .watch(&WatchParams::default(), &start_rv)
        .await
        .expect("watch")
        .boxed();
    match next_event(&mut resumed).await {
        WatchEvent::Added(object) => assert_eq!(object.name_any(), "b"),
        other => panic!("expected ADDED b, got {other:?}"),
    }
    let bookmark = next_event(&mut resumed).await;
    assert!(
        matches!(bookmark, WatchEvent::Bookmark(_)),
        "got {bookmark:?}"
    );

    for name in ["c", "d", "e"] {
        maps.create(&PostParams::default(), &config_map(name, json!({})))
            .await
            .expect("create");
    }
    let mut expired = maps
        .watch(&WatchParams::default(), &start_rv)
        .await
        .expect("200 stream")
        .boxed();
    match next_event(&mut expired).await {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected ERROR 410, got {other:?}"),
    }
}

#[tokio::test]
async fn label_selector_transitions_appear_as_added_and_deleted() {
    let (_sim, client) = start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client);
    let created = maps
        .create(
            &PostParams::default(),
            &config_map("m", json!({"tier": "back"})),
        )
        .await
        .expect("create");
    let rv = created.resource_version().expect("rv");
    let mut events = maps
        .watch(&WatchParams::default().labels("tier=front"), &rv)
        .await
        .expect("watch")
        .boxed();
    let set_tier = |tier: &str| Patch::Merge(json!({"metadata": {"labels": {"tier": tier}}}));
    maps.patch("m", &PatchParams::default(), &set_tier("front"))
        .await
        .expect("patch");
    maps.patch("m", &PatchParams::default(), &set_tier("back"))
        .await
        .expect("patch");
    let first = next_event(&mut events).await;
    let second = next_event(&mut events).await;
    assert!(matches!(first, WatchEvent::Added(_)), "{first:?}");
    assert!(matches!(second, WatchEvent::Deleted(_)), "{second:?}");
}

#[tokio::test]
async fn selectors_filter_lists_and_unsupported_fields_are_400() {
    let (_sim, client) = start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client);
    for (name, labels) in [
        ("a", json!({"app": "web", "tier": "front"})),
        ("b", json!({"app": "db"})),
        ("c", json!({})),
    ] {
        maps.create(&PostParams::default(), &config_map(name, labels))
            .await
            .expect("create");
    }
    let names = |list: kube::core::ObjectList<ConfigMap>| {
        list.items.iter().map(|o| o.name_any()).collect::<Vec<_>>()
    };
    let cases = [
        ("app=web", vec!["a"]),
        ("app!=web", vec!["b", "c"]),
        ("app in (web,db)", vec!["a", "b"]),
        ("app notin (web)", vec!["b", "c"]),
        ("tier", vec!["a"]),
        ("!app", vec!["c"]),
    ];
    for (selector, expected) in cases {
        let list = maps
            .list(&ListParams::default().labels(selector))
            .await
            .expect("list");
        assert_eq!(names(list), expected, "{selector}");
    }
    let by_name = maps
        .list(&ListParams::default().fields("metadata.name=b"))
        .await
        .expect("list");
    assert_eq!(names(by_name), vec!["b"]);
    let error = api_error(
        maps.list(&ListParams::default().fields("data.k=v"))
            .await
            .expect_err("400"),
    );
    assert_eq!(
        (error.code, error.message.as_str()),
        (400, "field label not supported: data.k")
    );
}

#[tokio::test]
async fn statefulset_scale_subresource() {
    let (_sim, client) = start().await;
    let sets: Api<StatefulSet> = Api::default_namespaced(client);
    let set: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 1, "serviceName": "web", "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}},
    }))
    .expect("StatefulSet");
    sets.create(&PostParams::default(), &set)
        .await
        .expect("create");
    let scale = sets.get_scale("web").await.expect("scale");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(1));
    assert_eq!(
        scale.status.and_then(|s| s.selector).as_deref(),
        Some("app=web")
    );
    let scaled = sets
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("patch scale");
    assert_eq!(scaled.spec.and_then(|s| s.replicas), Some(3));
    let fetched = sets.get("web").await.expect("get");
    assert_eq!(fetched.spec.and_then(|s| s.replicas), Some(3));
    assert_eq!(fetched.metadata.generation, Some(2));
}

#[tokio::test]
async fn injected_faults_and_request_counts() {
    let (_sim, client) = start().await;
    let maps: Api<ConfigMap> = Api::default_namespaced(client.clone());
    maps.create(&PostParams::default(), &config_map("a", json!({})))
        .await
        .expect("create");
    reset_requests(&client).await;
    inject(
        &client,
        json!({"verb": "get", "resource": "configmaps", "code": 500, "times": 1}),
    )
    .await;
    let failed = api_error(maps.get("a").await.expect_err("500"));
    assert_eq!(
        (failed.code, failed.reason.as_str()),
        (500, "InternalError")
    );
    // kube retries 503 itself, honouring Retry-After: one injected 503 costs one extra request.
    inject(&client, json!({"verb": "get", "resource": "configmaps", "code": 503, "retryAfterSeconds": 1, "times": 1})).await;
    let started = std::time::Instant::now();
    maps.get("a").await.expect("retried past the 503");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "Retry-After was honoured"
    );
    assert_eq!(request_count(&client, "get", "configmaps", "").await, 3);
    inject(
        &client,
        json!({"verb": "patch", "resource": "configmaps", "code": 409, "times": 2}),
    )
    .await;
    let patch = Patch::Merge(json!({"data": {"n": "1"}}));
    for _ in 0..2 {
        let conflict = api_error(
            maps.patch("a", &PatchParams::default(), &patch)
                .await
                .expect_err("409"),
        );
        assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    }
    maps.patch("a", &PatchParams::default(), &patch)
        .await
        .expect("third patch passes");
    assert_eq!(request_count(&client, "patch", "configmaps", "").await, 3);
    assert_eq!(request_count(&client, "list", "configmaps", "").await, 0);

    inject(&client, json!({"verb": "list", "latencyMs": 300})).await;
    let started = std::time::Instant::now();
    maps.list(&ListParams::default()).await.expect("slow list");
    assert!(started.elapsed() >= Duration::from_millis(300));
    clear_faults(&client).await;
    let started = std::time::Instant::now();
    maps.list(&ListParams::default()).await.expect("fast list");
    assert!(started.elapsed() < Duration::from_millis(300));
}

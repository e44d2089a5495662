//! Unit tests of the watch cache (`cache.rs`).

use super::*;
use apollo_crds::DeviceProcessSpec;
use serde_json::json;

fn dp(ns: &str, name: &str, device: &str, generation: i64, rv: u64, url: &str) -> DeviceProcess {
    let spec: DeviceProcessSpec = serde_json::from_value(json!({
        "deviceRef": {"name": device},
        "artifact": {"type": "oci", "url": url},
        "execution": {"backend": "container"}
    }))
    .expect("spec");
    let mut obj = DeviceProcess::new(name, spec);
    obj.metadata.namespace = Some(ns.into());
    obj.metadata.generation = Some(generation);
    obj.metadata.resource_version = Some(rv.to_string());
    obj.metadata.uid = Some(format!("uid-{ns}-{name}"));
    obj
}

fn cache() -> Cache {
    Cache::new(15, Metrics::unregistered())
}

fn items(cache: &Cache, device: &str) -> Vec<String> {
    let rx = cache.subscribe(device);
    let snap = rx.borrow().clone();
    let doc: serde_json::Value = serde_json::from_slice(&snap.body).expect("json");
    doc["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            format!(
                "{}/{}",
                i["namespace"].as_str().unwrap_or(""),
                i["name"].as_str().unwrap_or("")
            )
        })
        .collect()
}

#[test]
fn index_by_device_sorted_and_moves_between_devices() {
    let c = cache();
    assert!(c.apply(&dp("b", "p", "d1", 1, 1, "u")).is_some());
    assert!(c.apply(&dp("a", "q", "d1", 1, 2, "u")).is_some());
    assert!(c.apply(&dp("a", "r", "d2", 1, 3, "u")).is_some());
    assert_eq!(items(&c, "d1"), ["a/q", "b/p"]);
    assert_eq!(items(&c, "d2"), ["a/r"]);
    // deviceRef changes: the object moves.
    c.apply(&dp("a", "q", "d2", 2, 4, "u"));
    assert_eq!(items(&c, "d1"), ["b/p"]);
    assert_eq!(items(&c, "d2"), ["a/q", "a/r"]);
    c.delete(&dp("a", "r", "d2", 1, 5, "u"));
    assert_eq!(items(&c, "d2"), ["a/q"]);
    assert_eq!(c.keys_for_device("d1"), vec![ObjectKey::new("b", "p")]);
}

#[tokio::test]
async fn waiters_wake_on_spec_change_but_not_on_status_change() {
    let c = cache();
    c.apply(&dp("ns", "p", "d", 1, 1, "u1"));
    let mut rx = c.subscribe("d");
    let before = rx.borrow_and_update().etag.clone();
    let mut status_only = dp("ns", "p", "d", 1, 2, "u1");
    status_only.status = Some(Default::default());
    assert_eq!(
        c.apply(&status_only),
        None,
        "a status change is not a desired change"
    );
    assert!(!rx.has_changed().expect("sender alive"));
    assert_eq!(
        c.apply(&dp("ns", "p", "d", 2, 3, "u2")),
        Some(ObjectKey::new("ns", "p"))
    );
    assert!(rx.has_changed().expect("sender alive"));
    assert_ne!(rx.borrow_and_update().etag, before);
}

#[test]
fn older_versions_and_own_writes_do_not_go_back_in_time() {
    let c = cache();
    c.apply(&dp("ns", "p", "d", 2, 10, "new"));
    assert_eq!(c.apply(&dp("ns", "p", "d", 1, 9, "old")), None);
    assert_eq!(
        c.get(&ObjectKey::new("ns", "p")).map(|p| p.generation),
        Some(2)
    );
    let mut written = dp("ns", "p", "d", 2, 10, "new");
    written.status = Some(Default::default());
    c.observe_write(&written);
    assert!(c
        .get(&ObjectKey::new("ns", "p"))
        .and_then(|p| p.status.clone())
        .is_none());
    written.metadata.resource_version = Some("11".into());
    c.observe_write(&written);
    assert!(c
        .get(&ObjectKey::new("ns", "p"))
        .and_then(|p| p.status.clone())
        .is_some());
}

#[tokio::test]
async fn relist_replaces_contents_and_reports_changes_after_first_sync() {
    let c = cache();
    assert!(!c.is_synced());
    c.begin_relist();
    c.relist_apply(&dp("ns", "a", "d", 1, 1, "u"));
    c.relist_apply(&dp("ns", "b", "d", 1, 2, "u"));
    assert!(
        c.keys_for_device("d").is_empty(),
        "nothing visible before InitDone"
    );
    assert_eq!(c.finish_relist().await.desired.len(), 2);
    assert!(c.is_synced());
    c.begin_relist();
    c.relist_apply(&dp("ns", "a", "d", 1, 1, "u"));
    c.relist_apply(&dp("ns", "c", "d", 1, 3, "u"));
    let changes = c.finish_relist().await;
    assert_eq!(changes.desired, vec![ObjectKey::new("ns", "c")]);
    assert_eq!(
        changes.gone,
        vec![("d".to_owned(), ObjectKey::new("ns", "b"))]
    );
    assert_eq!(items(&c, "d"), ["ns/a", "ns/c"]);
}

/// Issue 13, defect 11: a re-list that collapses a delete and a create of the same name
/// serves the new object (its uid) and reports the old one gone.
#[tokio::test]
async fn a_relist_that_collapses_a_delete_and_a_create_serves_the_new_uid() {
    let c = cache();
    c.begin_relist();
    c.relist_apply(&dp("ns", "a", "d", 1, 1, "u"));
    c.finish_relist().await;
    let mut again = dp("ns", "a", "d", 1, 7, "u");
    again.metadata.uid = Some("uid-new".into());
    c.begin_relist();
    c.relist_apply(&again);
    let changes = c.finish_relist().await;
    assert_eq!(
        changes.gone,
        vec![("d".to_owned(), ObjectKey::new("ns", "a"))]
    );
    assert_eq!(changes.desired, vec![ObjectKey::new("ns", "a")]);
    let cached = c.get(&ObjectKey::new("ns", "a")).expect("cached");
    assert_eq!(cached.uid, "uid-new");
    // A watch event of a new uid says the same.
    let mut third = dp("ns", "a", "d", 1, 9, "u");
    third.metadata.uid = Some("uid-third".into());
    assert_eq!(c.apply_changes(&third).gone.len(), 1);
    assert_eq!(c.delete(&third).gone.len(), 1);
    assert_eq!(c.delete(&third), Changes::default(), "deleted once");
}

/// Issue 13, defect 6: the gauges follow every change without a pass over the devices.
#[tokio::test]
async fn gauges_count_objects_and_devices_with_objects_incrementally() {
    let metrics = Metrics::unregistered();
    let c = Cache::new(15, metrics.clone());
    c.apply(&dp("ns", "a", "d1", 1, 1, "u"));
    c.apply(&dp("ns", "b", "d1", 1, 2, "u"));
    c.apply(&dp("ns", "c", "d2", 1, 3, "u"));
    let _waiter = c.subscribe("idle");
    assert_eq!(
        (metrics.cache_objects.get(), metrics.cache_devices.get()),
        (3, 2)
    );
    // Moving c to d1 empties d2.
    c.apply(&dp("ns", "c", "d1", 2, 4, "u"));
    assert_eq!(
        (metrics.cache_objects.get(), metrics.cache_devices.get()),
        (3, 1)
    );
    c.delete(&dp("ns", "a", "d1", 1, 5, "u"));
    assert_eq!(
        (metrics.cache_objects.get(), metrics.cache_devices.get()),
        (2, 1)
    );
    c.begin_relist();
    c.relist_apply(&dp("ns", "x", "d3", 1, 6, "u"));
    c.finish_relist().await;
    assert_eq!(
        (metrics.cache_objects.get(), metrics.cache_devices.get()),
        (1, 1)
    );
    c.prune_idle_devices();
    assert_eq!(metrics.cache_devices.get(), 1);
}

#[test]
fn observations_of_another_device_are_foreign_and_missing_ones_ignored() {
    let c = cache();
    c.apply(&dp("ns", "mine", "d1", 1, 1, "u"));
    c.apply(&dp("ns", "theirs", "d2", 1, 2, "u"));
    let obs = |name: &str| Observation {
        namespace: "ns".into(),
        name: name.into(),
        observed_spec_hash: format!("sha256:{}", "0".repeat(64)),
    };
    assert_eq!(
        c.check_observations("d1", &[obs("mine"), obs("gone")]),
        ObservationCheck::Accepted {
            known: vec![0],
            ignored: vec![ObjectRef {
                namespace: "ns".into(),
                name: "gone".into()
            }]
        }
    );
    assert_eq!(
        c.check_observations("d1", &[obs("mine"), obs("theirs")]),
        ObservationCheck::Foreign { index: 1 }
    );
}

#[test]
fn idle_devices_are_pruned_only_without_waiters() {
    let c = cache();
    let rx = c.subscribe("ghost");
    c.prune_idle_devices();
    assert_eq!(c.read().devices.len(), 1);
    drop(rx);
    c.prune_idle_devices();
    assert_eq!(c.read().devices.len(), 0);
    let owned = OwnedSlots::all();
    c.apply(&dp("ns", "p", "d", 1, 1, "u"));
    assert_eq!(c.devices_owned(&owned).len(), 1);
    assert!(c.devices_owned(&OwnedSlots::none()).is_empty());
}

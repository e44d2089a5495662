//! Unit tests of the plan: desired set, names under collision, diff, adoption, merge patches.

use super::*;
use crate::fixtures::{deployment, existing, string_map, switch, NOW, NS, UID};
use crate::names::{child_name, hashed_child_name};
use apollo_crds::DeviceProcessStatus;
use serde_json::json;

#[test]
fn desired_set_selects_matching_switches_in_the_namespace() {
    let d = deployment(&["a"]);
    let switches = [
        switch("tor1-01", NS, &[("role", "tor")]),
        switch("tor1-02", NS, &[("role", "tor"), ("rack", "r2")]),
        switch("spine1", NS, &[("role", "spine")]),
        switch("tor9-01", "elsewhere", &[("role", "tor")]),
    ];
    let children = desired_children(&d, &switches, &[])
        .expect("desired")
        .children;
    assert_eq!(
        children.keys().collect::<Vec<_>>(),
        ["logger-tor1-01", "logger-tor1-02"]
    );
    let child = &children["logger-tor1-01"];
    assert_eq!(child.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(
        child.labels(),
        &string_map(&[
            ("app", "logger"),
            (LABEL_DEVICE_NAME, "tor1-01"),
            (LABEL_DEPLOYMENT, "logger"),
        ])
    );
    assert_eq!(child.annotations(), &string_map(&[("team", "netops")]));
    assert_eq!(child.spec, d.spec.template.spec.for_device("tor1-01"));
    let owner = &child.owner_references()[0];
    assert_eq!(owner.kind, "DeviceProcessDeployment");
    assert_eq!(owner.api_version, "azure.com/v1alpha1");
    assert_eq!(owner.name, "logger");
    assert_eq!(owner.uid, UID);
    assert_eq!(owner.controller, Some(true));
    assert_eq!(owner.block_owner_deletion, Some(true));
}

#[test]
fn switches_being_deleted_are_not_selected() {
    let d = deployment(&["a"]);
    let mut going = switch("tor1-01", NS, &[("role", "tor")]);
    going.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:00:00Z".parse().expect("time"),
    ));
    assert!(desired_children(&d, [&going], &[])
        .expect("desired")
        .children
        .is_empty());
}

#[test]
fn invalid_selector_is_an_error_not_an_empty_set() {
    let mut d = deployment(&["a"]);
    d.spec.selector.match_expressions = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
            key: "role".into(),
            operator: "Is".into(),
            values: Some(vec!["tor".into()]),
        },
    ]);
    let switches = [switch("tor1-01", NS, &[("role", "tor")])];
    assert!(matches!(
        desired_children(&d, &switches, &[]),
        Err(DesiredError::InvalidSelector(_))
    ));
}

#[test]
fn plan_creates_updates_deletes_and_leaves_the_rest() {
    let old = deployment(&["a"]);
    let new = deployment(&["b"]);
    let switches = [
        switch("tor1-01", NS, &[("role", "tor")]),
        switch("tor1-02", NS, &[("role", "tor")]),
        switch("tor1-03", NS, &[("role", "tor")]),
    ];
    let old_children = desired_children(&old, &switches, &[])
        .expect("old")
        .children;
    let new_children = desired_children(&new, &switches[..2], &[])
        .expect("new")
        .children;

    // tor1-01 is already on the new template, tor1-02 on the old one, tor1-03 left the
    // selection; a child of another deployment is ignored.
    let mut foreign = (*existing(&old_children["logger-tor1-03"])).clone();
    foreign.metadata.name = Some("other-tor1-03".into());
    foreign.metadata.owner_references.as_mut().expect("owners")[0].uid = "uid-other".into();
    let current = vec![
        existing(&new_children["logger-tor1-01"]),
        existing(&old_children["logger-tor1-02"]),
        existing(&old_children["logger-tor1-03"]),
        Arc::new(foreign),
    ];
    let p = plan(UID, &new_children, &current);
    assert!(p.create.is_empty());
    assert_eq!(p.unchanged.len(), 1);
    assert_eq!(p.unchanged[0].name_any(), "logger-tor1-01");
    assert_eq!(p.update.len(), 1);
    assert_eq!(p.update[0].existing.name_any(), "logger-tor1-02");
    assert_eq!(p.delete.len(), 1);
    assert_eq!(p.delete[0].name_any(), "logger-tor1-03");

    let nothing = plan(UID, &new_children, &[]);
    assert_eq!(nothing.create.len(), 2);
    assert!(nothing.update.is_empty() && nothing.delete.is_empty());
}

#[test]
fn orphans_made_for_a_deployment_of_this_name_are_adopted_and_no_other() {
    let d = deployment(&["a"]);
    let switches = [
        switch("tor1-01", NS, &[("role", "tor")]),
        switch("tor1-02", NS, &[("role", "tor")]),
        switch("tor1-03", NS, &[("role", "tor")]),
    ];
    let children = desired_children(&d, &switches, &[])
        .expect("desired")
        .children;
    let orphan = |name: &str| {
        let mut c = (*existing(&children[name])).clone();
        c.metadata.owner_references = None;
        c
    };
    // An orphan of this deployment's name: adopted, even though already on the template.
    let ours = orphan("logger-tor1-01");
    // An orphan holding the name but made for another deployment: not ours to take.
    let mut other_label = orphan("logger-tor1-02");
    other_label
        .labels_mut()
        .insert(LABEL_DEPLOYMENT.into(), "someone-else".into());
    // Controlled by another owner: never taken.
    let mut controlled = (*existing(&children["logger-tor1-03"])).clone();
    controlled
        .metadata
        .owner_references
        .as_mut()
        .expect("owners")[0]
        .uid = "uid-other".into();
    let p = plan(
        UID,
        &children,
        &[Arc::new(ours), Arc::new(other_label), Arc::new(controlled)],
    );
    assert_eq!(p.update.len(), 1);
    assert_eq!(p.update[0].existing.name_any(), "logger-tor1-01");
    assert!(p.update[0].adopts());
    let names: Vec<String> = p.create.iter().map(ResourceExt::name_any).collect();
    assert_eq!(
        names,
        ["logger-tor1-02", "logger-tor1-03"],
        "a create is refused with 409 and retried"
    );
    assert!(p.delete.is_empty(), "orphans are never deleted");

    let patch = p.update[0].merge_patch().expect("patch");
    assert_eq!(
        patch,
        json!({"metadata": {
            "ownerReferences": [{
                "apiVersion": "azure.com/v1alpha1",
                "kind": "DeviceProcessDeployment",
                "name": "logger",
                "uid": UID,
                "controller": true,
                "blockOwnerDeletion": true
            }],
            "resourceVersion": "41"
        }})
    );
    // An update of a child we control never touches its owner references.
    let owned = ChildUpdate {
        existing: existing(&children["logger-tor1-01"]),
        desired: children["logger-tor1-01"].clone(),
    };
    assert!(!owned.adopts());
    assert!(owned.merge_patch().expect("patch")["metadata"]
        .get("ownerReferences")
        .is_none());
}

#[test]
fn plan_of_a_converged_deployment_is_empty() {
    let d = deployment(&["a"]);
    let switches = [switch("tor1-01", NS, &[("role", "tor")])];
    let children = desired_children(&d, &switches, &[])
        .expect("desired")
        .children;
    let mut child = (*existing(&children["logger-tor1-01"])).clone();
    // Annotations added by other tools and a status do not make a child differ.
    child.annotations_mut().insert(
        "kubectl.kubernetes.io/last-applied-configuration".into(),
        "{}".into(),
    );
    child.status = Some(DeviceProcessStatus::default());
    let p = plan(UID, &children, &[Arc::new(child)]);
    assert!(p.is_empty());
    assert_eq!(p.unchanged.len(), 1);
}

#[test]
fn children_being_deleted_are_left_alone() {
    let d = deployment(&["a"]);
    let switches = [switch("tor1-01", NS, &[("role", "tor")])];
    let children = desired_children(&d, &switches, &[])
        .expect("desired")
        .children;
    let mut child = (*existing(&children["logger-tor1-01"])).clone();
    child.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        NOW.parse().expect("time"),
    ));
    let child = Arc::new(child);
    assert!(plan(UID, &children, std::slice::from_ref(&child)).is_empty());
    assert!(plan(UID, &BTreeMap::new(), &[child]).is_empty());
}

#[test]
fn label_changes_alone_need_an_update_and_removed_labels_become_null() {
    let d = deployment(&["a"]);
    let switches = [switch("tor1-01", NS, &[("role", "tor")])];
    let children = desired_children(&d, &switches, &[])
        .expect("desired")
        .children;
    let mut stale = (*existing(&children["logger-tor1-01"])).clone();
    stale.labels_mut().insert("old".into(), "x".into());
    let update = ChildUpdate {
        existing: Arc::new(stale),
        desired: children["logger-tor1-01"].clone(),
    };
    assert!(needs_update(&update.existing, &update.desired));
    assert_eq!(
        update.merge_patch().expect("patch"),
        json!({"metadata": {"labels": {"old": null}, "resourceVersion": "41"}})
    );
}

#[test]
fn spec_patch_nulls_removed_fields_and_replaces_lists() {
    let mut old = deployment(&["a"]);
    old.spec.template.spec.execution.working_dir = Some("/srv".into());
    let new = deployment(&["b", "c"]);
    let switches = [switch("tor1-01", NS, &[("role", "tor")])];
    let before = desired_children(&old, &switches, &[])
        .expect("old")
        .children;
    let after = desired_children(&new, &switches, &[])
        .expect("new")
        .children;
    let update = ChildUpdate {
        existing: existing(&before["logger-tor1-01"]),
        desired: after["logger-tor1-01"].clone(),
    };
    assert_eq!(
        update.merge_patch().expect("patch"),
        json!({
            "metadata": {"resourceVersion": "41"},
            "spec": {"execution": {"args": ["b", "c"], "workingDir": null}}
        })
    );
}

#[test]
fn merge_patch_diff_of_equal_values_is_empty() {
    let v = json!({"a": {"b": [1, 2]}, "c": "d"});
    assert_eq!(merge_patch_diff(&v, &v), json!({}));
    assert_eq!(
        merge_patch_diff(&json!({"a": 1}), &json!({"b": 2})),
        json!({"a": null, "b": 2})
    );
}

/// A child of the deployment `owner` (uid `uid-<owner>`, the fixture's for `logger`) on `device`,
/// named `name`.
fn child_of(owner: &str, device: &str, name: &str) -> Arc<DeviceProcess> {
    let mut d = deployment(&["a"]);
    d.metadata.name = Some(owner.into());
    if owner != "logger" {
        d.metadata.uid = Some(format!("uid-{owner}"));
    }
    let desired = desired_children(&d, &[switch(device, NS, &[("role", "tor")])], &[])
        .expect("desired")
        .children;
    let mut child = desired.into_values().next().expect("one child");
    child.metadata.name = Some(name.into());
    existing(&child)
}

#[test]
fn a_name_another_deployment_holds_is_disambiguated_with_the_hashed_name() {
    // `bgp-leaf` on `spine-1` holds `bgp-leaf-spine-1`; `bgp` on `leaf-spine-1` wants it too.
    let mut bgp = deployment(&["a"]);
    bgp.metadata.name = Some("bgp".into());
    let switches = [switch("leaf-spine-1", NS, &[("role", "tor")])];
    let holder = child_of("bgp-leaf", "spine-1", "bgp-leaf-spine-1");
    assert_eq!(child_name("bgp", "leaf-spine-1"), "bgp-leaf-spine-1");

    let desired = desired_children(&bgp, &switches, std::slice::from_ref(&holder))
        .expect("desired")
        .children;
    let hashed = hashed_child_name("bgp", "leaf-spine-1");
    assert_eq!(desired.keys().collect::<Vec<_>>(), [&hashed]);
    let p = plan(UID, &desired, std::slice::from_ref(&holder));
    assert_eq!(p.create.len(), 1, "created under the hashed name");
    assert!(
        p.update.is_empty() && p.delete.is_empty(),
        "the holder is not ours"
    );

    // Once ours exists under the hashed name it keeps it, even when the other name frees up.
    let ours = existing(&desired[&hashed]);
    for others in [vec![holder.clone(), ours.clone()], vec![ours.clone()]] {
        let again = desired_children(&bgp, &switches, &others)
            .expect("desired")
            .children;
        assert_eq!(again.keys().collect::<Vec<_>>(), [&hashed]);
        assert!(plan(UID, &again, &others).is_empty());
    }

    // The holder keeps its plain name: its own child is found under it.
    let mut bgp_leaf = deployment(&["a"]);
    bgp_leaf.metadata.name = Some("bgp-leaf".into());
    bgp_leaf.metadata.uid = Some("uid-bgp-leaf".into());
    let theirs = desired_children(
        &bgp_leaf,
        &[switch("spine-1", NS, &[("role", "tor")])],
        &[holder.clone(), ours],
    )
    .expect("desired")
    .children;
    assert_eq!(theirs.keys().collect::<Vec<_>>(), ["bgp-leaf-spine-1"]);
}

#[test]
fn of_two_children_for_one_device_the_preferred_name_stays_and_the_other_goes() {
    let d = deployment(&["a"]);
    let switches = [switch("tor1-01", NS, &[("role", "tor")])];
    let plain = child_of("logger", "tor1-01", "logger-tor1-01");
    let hashed = child_of("logger", "tor1-01", &hashed_child_name("logger", "tor1-01"));
    let both = [plain, hashed.clone()];
    let desired = desired_children(&d, &switches, &both)
        .expect("desired")
        .children;
    assert_eq!(desired.keys().collect::<Vec<_>>(), ["logger-tor1-01"]);
    let p = plan(UID, &desired, &both);
    assert_eq!(p.delete.len(), 1);
    assert_eq!(p.delete[0].name_any(), hashed.name_any());
}

#[test]
fn each_child_carries_its_switch_labels_for_the_rollout() {
    let d = deployment(&["a"]);
    let switches = [
        switch("tor1-01", NS, &[("role", "tor"), ("pair", "p1")]),
        switch("tor1-02", NS, &[("role", "tor")]),
    ];
    let desired = desired_children(&d, &switches, &[]).expect("desired");
    assert_eq!(
        desired.device_labels["logger-tor1-01"],
        string_map(&[("role", "tor"), ("pair", "p1")])
    );
    assert_eq!(desired.device_labels.len(), 2);
}

#[test]
fn an_empty_selector_selects_nothing_and_says_why() {
    let mut d = deployment(&["a"]);
    d.spec.selector = Default::default();
    let switches = [switch("tor1-01", NS, &[("role", "tor")])];
    assert_eq!(
        desired_children(&d, &switches, &[]).map(|d| d.children.len()),
        Err(DesiredError::InvalidSelector(SelectorError::Empty))
    );
}

#[test]
fn a_held_update_of_an_orphan_adopts_it_without_touching_its_spec() {
    let old = deployment(&["a"]);
    let new = deployment(&["b"]);
    let switches = [switch("tor1-01", NS, &[("role", "tor")])];
    let before = desired_children(&old, &switches, &[])
        .expect("old")
        .children;
    let after = desired_children(&new, &switches, &[])
        .expect("new")
        .children;
    let mut orphan = (*existing(&before["logger-tor1-01"])).clone();
    orphan.metadata.owner_references = None;
    let update = ChildUpdate {
        existing: Arc::new(orphan),
        desired: after["logger-tor1-01"].clone(),
    };
    assert!(update.changes_spec() && update.adopts());
    let held = update.metadata_only();
    assert!(!held.changes_spec() && held.adopts());
    let patch = held.merge_patch().expect("patch");
    assert!(patch.get("spec").is_none(), "{patch}");
    assert!(patch["metadata"]["ownerReferences"].is_array(), "{patch}");
}

//! Unit tests of the straggler classification and its table.

use super::*;
use apollo_controller::availability::SPEC_FIELD_MANAGER;
use apollo_crds::conditions::Condition;
use apollo_crds::{DeviceProcessDeploymentStatus, DeviceProcessStatus, NetworkSwitchSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, Time};
use std::sync::Arc;

fn t(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).expect("time")
}

fn deployment(args: &str) -> DeviceProcessDeployment {
    let mut d: DeviceProcessDeployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "azure.com/v1alpha1",
        "kind": "DeviceProcessDeployment",
        "metadata": {"name": "bgp", "namespace": "fabric", "uid": "uid-bgp", "generation": 2},
        "spec": {
            "selector": {"matchLabels": {"role": "tor"}},
            "progressDeadlineSeconds": 60,
            "template": {"spec": {"artifact": {"type": "oci", "url": "u"},
                                  "execution": {"backend": "container", "args": [args]}}}
        }
    }))
    .expect("deployment");
    d.status = Some(DeviceProcessDeploymentStatus {
        rollout_start_time: Some(t(0).to_string()),
        conditions: vec![Condition::new(
            PROGRESSING,
            "True",
            "RollingUpdate",
            "m",
            &t(0).to_string(),
        )
        .with_generation(Some(2))],
        ..Default::default()
    });
    d
}

fn switch(name: &str) -> NetworkSwitch {
    let mut s = NetworkSwitch::new(name, NetworkSwitchSpec::default());
    s.metadata.namespace = Some("fabric".into());
    s.metadata.labels = Some([("role".to_owned(), "tor".to_owned())].into());
    s
}

/// The child of `device` as made from `template_args`, written at `written`, with the agent
/// connected or not and the spec observed or not.
fn child(
    device: &str,
    template_args: &str,
    written: i64,
    connected: bool,
    observed: bool,
) -> DeviceProcess {
    let desired =
        desired_children(&deployment(template_args), &[switch(device)], &[]).expect("desired");
    let mut c = desired.children.into_values().next().expect("child");
    c.metadata.generation = Some(1);
    c.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
        manager: Some(SPEC_FIELD_MANAGER.into()),
        operation: Some("Update".into()),
        time: Some(Time(t(written))),
        ..Default::default()
    }]);
    let status = |b| if b { "True" } else { "False" };
    c.status = Some(DeviceProcessStatus {
        observed_spec_hash: observed.then(|| apollo_crds::spec_hash(&c.spec)),
        conditions: vec![
            Condition::new(
                "AgentConnected",
                status(connected),
                "R",
                "m",
                &t(written).to_string(),
            )
            .with_generation(Some(1)),
            Condition::new(
                "SpecObserved",
                status(observed),
                "R",
                "m",
                &t(written).to_string(),
            )
            .with_generation(Some(1)),
        ],
        ..Default::default()
    });
    c
}

#[test]
fn every_device_not_available_on_the_template_is_listed_with_why_and_since() {
    let d = deployment("v2");
    let children = [
        child("a", "v2", 0, true, true),
        child("b", "v2", 0, false, false),
        child("c", "v2", 100, true, false),
        child("d", "v1", 0, true, true),
    ]
    .map(Arc::new);
    let switches = ["a", "b", "c", "d", "e"].map(switch);
    let desired = desired_children(&d, &switches, &children).expect("desired");
    let existing: BTreeMap<String, &DeviceProcess> = children
        .iter()
        .map(|c| (c.name_any(), c.as_ref()))
        .collect();
    let list = stragglers(&d, &desired, &existing, t(120));
    let summary: Vec<(&str, Why, Option<Timestamp>)> = list
        .iter()
        .map(|s| (s.device.as_str(), s.why, s.since))
        .collect();
    assert_eq!(
        summary,
        [
            ("b", Why::Failed, Some(t(60))),
            ("c", Why::NotObserved, Some(t(100))),
            ("d", Why::HeldByStrategy, Some(t(0))),
            ("e", Why::NotCreated, None),
        ]
    );
    assert!(
        list[0].detail.contains("disconnected"),
        "{}",
        list[0].detail
    );

    let table = render("bgp", 5, &list, t(120));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("DEVICE"), "{table}");
    assert!(
        lines[1].starts_with("b ") && lines[1].contains("Failed"),
        "{table}"
    );
    assert!(lines[1].contains("1m0s"), "{table}");
    assert_eq!(
        lines.last().copied(),
        Some(r#"4 of 5 devices not available on the template of deviceprocessdeployment "bgp""#)
    );
}

#[test]
fn nothing_to_list_says_so() {
    assert!(render("bgp", 3, &[], t(0)).starts_with("No stragglers: all 3 DeviceProcesses"));
}

#[test]
fn ages_read_like_kubectl() {
    assert_eq!(age(SignedDuration::from_secs(47)), "47s");
    assert_eq!(age(SignedDuration::from_secs(192)), "3m12s");
    assert_eq!(age(SignedDuration::from_secs(7500)), "2h5m");
    assert_eq!(age(SignedDuration::from_secs(3 * 86400 + 4 * 3600)), "3d4h");
}

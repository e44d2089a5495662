//! Unit tests of the deployment status.

use super::*;
use crate::fixtures::{deployment, switch, NOW, NS};
use crate::plan::desired_children;
use crate::rollout::{step, Member, MemberState, Policy};
use apollo_crds::{spec_hash, DeviceProcessStatus};
use kube::ResourceExt;

fn never(_: &DeviceProcess) -> bool {
    false
}

#[test]
fn a_process_failure_holds_for_its_generation_and_goes_when_resolved() {
    let d = deployment(&["v1"]);
    let desired = desired_children(&d, &[switch("tor1-01", NS, &[("role", "tor")])], &[])
        .expect("desired")
        .children;
    let mut status = deployment_status(&d, None, &desired, &[], &never, None, NOW);
    assert_eq!(recorded_failure(&d, Some(&status)), None);
    let failure = ProcessFailure::new(
        REASON_FAILED_CREATE,
        "logger-tor1-01",
        "metadata.labels: Invalid value",
    );
    assert_eq!(
        failure.message,
        "DeviceProcess logger-tor1-01: metadata.labels: Invalid value"
    );
    set_process_failure(&mut status, Some(&failure), d.metadata.generation, NOW);
    let cond = conditions::find(&status.conditions, PROCESS_FAILURE).expect("condition");
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("True", "FailedCreate")
    );
    assert_eq!(recorded_failure(&d, Some(&status)), Some(failure.clone()));
    // A new generation may carry a fixed template: the failure no longer holds for it.
    let mut changed = d.clone();
    changed.metadata.generation = Some(4);
    assert_eq!(recorded_failure(&changed, Some(&status)), None);
    // Recording it again keeps the transition time; resolving removes the condition.
    let mut again = status.clone();
    set_process_failure(
        &mut again,
        Some(&failure),
        d.metadata.generation,
        "2030-01-01T00:00:00Z",
    );
    assert!(!status_changed(Some(&status), &again));
    set_process_failure(&mut again, None, d.metadata.generation, NOW);
    assert!(conditions::find(&again.conditions, PROCESS_FAILURE).is_none());
    assert!(conditions::find(&again.conditions, SELECTOR_VALID).is_some());
    // Long answers are cut (an Event's note is at most 1024 bytes).
    let long = ProcessFailure::new(REASON_FAILED_UPDATE, "c", &"é".repeat(2000));
    assert!(long.message.len() <= MAX_FAILURE_MESSAGE_LEN);
}

fn with_conditions(
    child: &DeviceProcess,
    connected: bool,
    observed_hash: Option<String>,
) -> DeviceProcess {
    let mut c = child.clone();
    let mut conds = vec![];
    if connected {
        conds.push(Condition::new(
            conditions::AGENT_CONNECTED,
            conditions::TRUE,
            conditions::REASON_AGENT_CONNECTED,
            conditions::MESSAGE_AGENT_CONNECTED,
            NOW,
        ));
    }
    if observed_hash.is_some() {
        conds.push(Condition::new(
            conditions::SPEC_OBSERVED,
            conditions::TRUE,
            conditions::REASON_SPEC_OBSERVED,
            conditions::MESSAGE_SPEC_OBSERVED,
            NOW,
        ));
    }
    c.status = Some(DeviceProcessStatus {
        observed_spec_hash: observed_hash,
        conditions: conds,
        ..DeviceProcessStatus::default()
    });
    c
}

#[test]
fn status_counts_follow_children_conditions_and_template() {
    let old = deployment(&["a"]);
    let new = deployment(&["b"]);
    let switches = [
        switch("tor1-01", NS, &[("role", "tor")]),
        switch("tor1-02", NS, &[("role", "tor")]),
        switch("tor1-03", NS, &[("role", "tor")]),
    ];
    let desired = desired_children(&new, &switches, &[])
        .expect("desired")
        .children;
    let stale = desired_children(&old, &switches, &[])
        .expect("stale")
        .children;
    let current_hash = spec_hash(&desired["logger-tor1-01"].spec);
    let old_hash = spec_hash(&stale["logger-tor1-02"].spec);
    // tor1-01: current template, connected, observed. tor1-02: old template, connected, observed
    // the old spec. tor1-03: missing.
    let one = with_conditions(&desired["logger-tor1-01"], true, Some(current_hash));
    let two = with_conditions(&stale["logger-tor1-02"], true, Some(old_hash));
    let status = deployment_status(
        &new,
        None,
        &desired,
        &[&one, &two],
        &|c| c.name_any() == "logger-tor1-01",
        None,
        NOW,
    );
    assert_eq!(status.observed_generation, Some(3));
    assert_eq!(status.desired_number_scheduled, 3);
    assert_eq!(status.current_number_scheduled, 2);
    assert_eq!(status.updated_number_scheduled, 1);
    assert_eq!(status.number_agent_connected, 2);
    assert_eq!(
        status.number_spec_observed, 1,
        "tor1-02 observed its spec, but it is old"
    );
    assert_eq!(status.number_available, 1);
    assert_eq!(
        status.number_unavailable, 2,
        "tor1-02 is not available, tor1-03 missing"
    );
    let cond = conditions::find(&status.conditions, SELECTOR_VALID).expect("condition");
    assert_eq!(cond.status, conditions::TRUE);
}

#[test]
fn status_is_unchanged_when_recomputed_later() {
    let d = deployment(&["a"]);
    let desired = BTreeMap::new();
    let first = deployment_status(&d, None, &desired, &[], &never, None, NOW);
    let mut stored = d.clone();
    stored.status = Some(first.clone());
    let again = deployment_status(
        &stored,
        stored.status.as_ref(),
        &desired,
        &[],
        &never,
        None,
        "2026-02-02T00:00:00Z",
    );
    assert!(!status_changed(Some(&first), &again));
    assert!(status_changed(None, &again));
    let broken = deployment_status(
        &stored,
        stored.status.as_ref(),
        &desired,
        &[],
        &never,
        Some("bad"),
        NOW,
    );
    assert!(status_changed(Some(&first), &broken));
}

#[test]
fn agent_count_changes_are_told_apart_from_rollout_changes() {
    let current = DeviceProcessDeploymentStatus {
        observed_generation: Some(2),
        desired_number_scheduled: 3,
        current_number_scheduled: 3,
        updated_number_scheduled: 3,
        ..Default::default()
    };
    let agents_moved = DeviceProcessDeploymentStatus {
        number_agent_connected: 2,
        number_spec_observed: 1,
        ..current.clone()
    };
    assert!(only_agent_counts_changed(&current, &agents_moved));
    let availability_moved = DeviceProcessDeploymentStatus {
        number_available: 2,
        number_unavailable: 1,
        ..agents_moved.clone()
    };
    assert!(only_agent_counts_changed(&current, &availability_moved));
    let rollout_moved = DeviceProcessDeploymentStatus {
        updated_number_scheduled: 2,
        ..agents_moved.clone()
    };
    assert!(!only_agent_counts_changed(&current, &rollout_moved));
}

#[test]
fn the_rollout_step_sets_the_counts_and_both_conditions() {
    let d = deployment(&["a"]);
    let policy = Policy::of(&d.spec, 4).expect("policy");
    let members: Vec<Member> = (0..4)
        .map(|i| Member {
            name: format!("c{i}"),
            canary: false,
            group: None,
            state: MemberState::Outdated { available: i != 0 },
        })
        .collect();
    let now: jiff::Timestamp = NOW.parse().expect("now");
    let s = step(&policy, &members, &previous_rollout(None), Some(3), now);
    assert_eq!(
        s.update,
        ["c0"],
        "budget 1 of 4 is taken by c0, which costs nothing"
    );
    let mut status = DeviceProcessDeploymentStatus {
        desired_number_scheduled: 4,
        number_available: 3,
        number_unavailable: 1,
        ..Default::default()
    };
    apply_rollout(&mut status, &s, policy.max_unavailable, Some(3), NOW);
    assert_eq!(status.number_held_by_strategy, 3);
    assert_eq!(status.number_failed, 0);
    assert_eq!(status.rollout_start_time.as_deref(), Some(NOW));
    let progressing = conditions::find(&status.conditions, PROGRESSING).expect("Progressing");
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("True", REASON_ROLLING_UPDATE)
    );
    assert_eq!(progressing.observed_generation, Some(3));
    let available = conditions::find(&status.conditions, AVAILABLE).expect("Available");
    assert_eq!(
        (available.status.as_str(), available.reason.as_str()),
        ("True", REASON_MINIMUM_DEVICES_AVAILABLE)
    );
    assert_eq!(
        available.message,
        "at most maxUnavailable (1) DeviceProcesses are unavailable"
    );

    // Read back, the stored status continues the same rollout.
    let previous = previous_rollout(Some(&status));
    assert_eq!(previous.reason.as_deref(), Some(REASON_ROLLING_UPDATE));
    assert_eq!(previous.generation, Some(3));
    assert_eq!(previous.rollout_start, Some(now));

    status.number_unavailable = 2;
    apply_rollout(&mut status, &s, policy.max_unavailable, Some(3), NOW);
    let available = conditions::find(&status.conditions, AVAILABLE).expect("Available");
    assert_eq!(available.reason, REASON_MINIMUM_DEVICES_UNAVAILABLE);
}

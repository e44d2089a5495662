//! Unit tests of the rollout step.

use super::*;
use crate::fixtures::{deployment, string_map};
use apollo_crds::{Canary, GroupBudget};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

const GEN: Option<i64> = Some(7);

fn t(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + seconds).expect("time")
}

/// 25%, 1 per pair, canaries `canary=true`, maxFailed as given, deadline 60 s.
fn policy(desired: usize, max_failed: i32, canary: bool) -> Policy {
    let mut d = deployment(&["a"]);
    let rolling = &mut d.spec.update_strategy.rolling_update;
    rolling.max_unavailable_per_group = Some(GroupBudget {
        topology_key: "pair".into(),
        max_unavailable: 1,
    });
    rolling.max_failed = max_failed;
    if canary {
        rolling.canary = Some(Canary {
            selector: LabelSelector {
                match_labels: Some(string_map(&[("canary", "true")])),
                match_expressions: None,
            },
        });
    }
    d.spec.progress_deadline_seconds = 60;
    Policy::of(&d.spec, desired).expect("policy")
}

fn outdated(available: bool) -> MemberState {
    MemberState::Outdated { available }
}

fn current(available: bool, observed: bool, updated_at: i64) -> MemberState {
    MemberState::Current {
        available,
        observed,
        updated_at: Some(t(updated_at)),
    }
}

/// `n` devices `d00..`, in pairs `p0..` (two per pair), all in `state`.
fn fleet(n: usize, state: MemberState) -> Vec<Member> {
    (0..n)
        .map(|i| Member {
            name: format!("d{i:02}"),
            canary: false,
            group: Some(format!("p{}", i / 2)),
            state,
        })
        .collect()
}

fn rolling(start: i64) -> Previous {
    Previous {
        reason: Some(REASON_ROLLING_UPDATE.into()),
        message: None,
        generation: GEN,
        rollout_start: Some(t(start)),
    }
}

#[test]
fn percentages_round_up_and_every_budget_allows_one() {
    let pct = |s: &str| IntOrString::String(s.into());
    assert_eq!(resolve_max_unavailable(&pct("25%"), 20), 5);
    assert_eq!(resolve_max_unavailable(&pct("10%"), 10_000), 1000);
    assert_eq!(resolve_max_unavailable(&pct("25%"), 2), 1);
    assert_eq!(resolve_max_unavailable(&pct("1%"), 1), 1);
    assert_eq!(resolve_max_unavailable(&pct("100%"), 7), 7);
    assert_eq!(resolve_max_unavailable(&IntOrString::Int(3), 20), 3);
    // Refused by the CRD today; stored earlier: the most careful budget.
    assert_eq!(resolve_max_unavailable(&pct("lots"), 20), 1);
    assert_eq!(resolve_max_unavailable(&IntOrString::Int(0), 20), 1);
}

#[test]
fn a_wave_takes_the_budget_with_one_device_per_pair() {
    let members = fleet(20, outdated(true));
    let s = step(&policy(20, 0, false), &members, &rolling(0), GEN, t(1));
    assert_eq!(s.update, ["d00", "d02", "d04", "d06", "d08"]);
    assert_eq!(s.held, 15);
    assert_eq!(s.reason, REASON_ROLLING_UPDATE);
    assert_eq!(s.message, "generation 7: at most 5 unavailable, 1 per pair");
    assert!(s.failed.is_empty());
}

#[test]
fn unavailable_children_count_against_the_budget_and_are_updated_for_free() {
    let mut members = fleet(20, outdated(true));
    // d01 (pair p0) and d05 (pair p2) are disconnected; d10 is updated and not yet observed.
    members[1].state = outdated(false);
    members[5].state = outdated(false);
    members[10].state = current(false, false, 0);
    let s = step(&policy(20, 0, false), &members, &rolling(0), GEN, t(1));
    // Free: d01, d05. Then 3 unavailable of 5: two more, skipping pairs p0, p2 and p5.
    assert_eq!(s.update, ["d01", "d05", "d02", "d06"]);
    assert_eq!(s.held, 19 - 4);
}

#[test]
fn an_outage_beyond_the_budget_updates_only_what_is_already_down() {
    let mut members = fleet(8, outdated(true));
    for i in [0, 2, 4] {
        members[i].state = outdated(false);
    }
    let mut p = policy(8, 0, false);
    p.max_unavailable = 2;
    let s = step(&p, &members, &rolling(0), GEN, t(1));
    assert_eq!(s.update, ["d00", "d02", "d04"]);
}

#[test]
fn canaries_go_first_and_the_rest_waits_until_every_canary_is_available() {
    let mut members = fleet(8, outdated(true));
    members[3].canary = true;
    members[6].canary = true;
    let p = policy(8, 0, true);
    let s = step(&p, &members, &rolling(0), GEN, t(1));
    assert_eq!(s.update, ["d03", "d06"]);
    assert_eq!(
        s.message,
        "generation 7: at most 2 unavailable, 1 per pair, canaries first"
    );

    // One canary available on the template, the other still settling: the rest waits.
    members[3].state = current(true, true, 1);
    members[6].state = current(false, true, 1);
    assert!(step(&p, &members, &rolling(0), GEN, t(2)).update.is_empty());

    members[6].state = current(true, true, 1);
    let s = step(&p, &members, &rolling(0), GEN, t(3));
    assert_eq!(s.update, ["d00", "d02"]);
}

#[test]
fn a_child_missing_its_deadline_halts_the_rollout_and_nothing_more_is_updated() {
    let mut members = fleet(20, outdated(true));
    members[0].state = current(false, false, 10);
    let p = policy(20, 0, false);
    // Before the deadline: the wave goes on, and the step says when to look again.
    let s = step(&p, &members, &rolling(0), GEN, t(69));
    assert_eq!(s.update.len(), 4);
    assert_eq!(s.next_deadline, Some(t(70)));

    let s = step(&p, &members, &rolling(0), GEN, t(70));
    assert_eq!(s.failed, ["d00"]);
    assert_eq!(s.reason, REASON_PROGRESS_DEADLINE_EXCEEDED);
    assert!(s.update.is_empty());
    assert_eq!(s.held, 19);
    assert!(
        s.message.contains("d00") && s.message.contains("60s"),
        "{}",
        s.message
    );

    // Sticky for this generation, even once the child recovers.
    let halted = Previous {
        reason: Some(s.reason.into()),
        message: Some(s.message.clone()),
        generation: GEN,
        rollout_start: s.rollout_start,
    };
    let still = step(&p, &members, &halted, GEN, t(75));
    assert_eq!(
        still.failed,
        ["d00"],
        "the deadline clock does not restart while halted"
    );
    assert_eq!(still.rollout_start, Some(t(0)));
    members[0].state = current(true, true, 10);
    let again = step(&p, &members, &halted, GEN, t(80));
    assert_eq!(again.reason, REASON_PROGRESS_DEADLINE_EXCEEDED);
    assert_eq!(again.message, s.message);
    assert!(again.update.is_empty());

    // A new generation (new template, or paused toggled) starts over, with fresh deadlines.
    members[0].state = current(false, false, 10);
    let resumed = step(&p, &members, &halted, Some(8), t(90));
    assert_eq!(resumed.reason, REASON_ROLLING_UPDATE);
    assert!(resumed.failed.is_empty());
    assert_eq!(resumed.rollout_start, Some(t(90)));
    assert_eq!(resumed.next_deadline, Some(t(150)));
    assert_eq!(resumed.update.len(), 4);
}

#[test]
fn a_device_that_observed_its_spec_and_then_disconnected_has_not_failed() {
    let mut members = fleet(4, current(true, true, 0));
    members[1].state = current(false, true, 0);
    let s = step(&policy(4, 0, false), &members, &rolling(0), GEN, t(1000));
    assert!(s.failed.is_empty());
    assert_eq!(s.reason, REASON_ROLLING_UPDATE);
}

#[test]
fn the_failure_budget_tolerates_max_failed() {
    let mut members = fleet(10, outdated(true));
    members[0].state = current(false, false, 0);
    let p = policy(10, 1, false);
    let s = step(&p, &members, &rolling(0), GEN, t(100));
    assert_eq!(s.reason, REASON_ROLLING_UPDATE);
    assert_eq!(s.failed, ["d00"]);
    assert!(!s.update.is_empty());
    members[2].state = current(false, false, 0);
    let s = step(&p, &members, &rolling(0), GEN, t(100));
    assert_eq!(s.reason, REASON_FAILURE_BUDGET_EXCEEDED);
    assert!(s.update.is_empty());
    assert!(
        s.message.starts_with("2 updated DeviceProcesses"),
        "{}",
        s.message
    );
}

#[test]
fn paused_holds_every_update() {
    let mut p = policy(6, 0, false);
    p.paused = true;
    let s = step(&p, &fleet(6, outdated(true)), &rolling(0), GEN, t(1));
    assert_eq!(s.reason, REASON_PAUSED);
    assert!(s.update.is_empty());
    assert_eq!(s.held, 6);
    // Resuming restarts the deadline clock.
    let paused = Previous {
        reason: Some(REASON_PAUSED.into()),
        generation: GEN,
        ..Previous::default()
    };
    p.paused = false;
    let s = step(&p, &fleet(6, outdated(true)), &paused, Some(8), t(50));
    assert_eq!(s.rollout_start, Some(t(50)));
    assert_eq!(s.update.len(), 2);
}

#[test]
fn all_at_once_updates_every_outdated_child() {
    let mut p = policy(6, 0, true);
    p.all_at_once = true;
    let s = step(
        &p,
        &fleet(6, outdated(true)),
        &Previous::default(),
        GEN,
        t(1),
    );
    assert_eq!(s.update.len(), 6);
    assert_eq!(s.held, 0);
    assert_eq!(s.message, "generation 7: every DeviceProcess at once");
}

#[test]
fn complete_once_everything_is_current_and_available_and_it_stays_complete() {
    let p = policy(4, 0, false);
    let mut members = fleet(4, current(true, true, 0));
    let s = step(&p, &members, &rolling(0), GEN, t(1));
    assert_eq!(s.reason, REASON_COMPLETE);
    assert!(s.next_deadline.is_none());
    let complete = Previous {
        reason: Some(REASON_COMPLETE.into()),
        generation: GEN,
        ..Previous::default()
    };
    // A device going down later does not undo the completed rollout...
    members[2].state = current(false, true, 0);
    assert_eq!(
        step(&p, &members, &complete, GEN, t(2)).reason,
        REASON_COMPLETE
    );
    // ... but a new generation with that device down is not complete until it is back.
    assert_eq!(
        step(&p, &members, &complete, Some(8), t(3)).reason,
        REASON_ROLLING_UPDATE
    );
}

#[test]
fn reason_changes_make_one_event_each_and_nothing_else_does() {
    let names = |prev: Option<&str>, next: &str| transition_event(prev, next).map(|e| e.reason);
    assert_eq!(names(None, REASON_ROLLING_UPDATE), Some("RolloutStarted"));
    assert_eq!(
        names(Some(REASON_COMPLETE), REASON_ROLLING_UPDATE),
        Some("RolloutStarted")
    );
    assert_eq!(
        names(Some(REASON_ROLLING_UPDATE), REASON_ROLLING_UPDATE),
        None
    );
    assert_eq!(
        names(Some(REASON_ROLLING_UPDATE), REASON_PAUSED),
        Some("RolloutPaused")
    );
    assert_eq!(
        names(Some(REASON_PAUSED), REASON_ROLLING_UPDATE),
        Some("RolloutResumed")
    );
    assert_eq!(
        names(Some(REASON_ROLLING_UPDATE), REASON_COMPLETE),
        Some("RolloutComplete")
    );
    let halt = transition_event(
        Some(REASON_ROLLING_UPDATE),
        REASON_PROGRESS_DEADLINE_EXCEEDED,
    )
    .expect("halt event");
    assert!(halt.warning);
    assert_eq!(halt.reason, "RolloutHalted");
}

/// A model of the fleet: an updated child is unavailable for `settle` steps, then available.
/// Whatever the timing, no moment has more than the budget unavailable, no pair has two down, and
/// the rollout completes with one update per child.
#[test]
fn simulated_waves_never_exceed_the_budgets_and_update_each_child_once() {
    for settle in 1..4 {
        let p = policy(20, 0, true);
        let mut members = fleet(20, outdated(true));
        members[7].canary = true;
        let mut down_until: BTreeMap<String, u32> = BTreeMap::new();
        let mut updates: BTreeMap<String, u32> = BTreeMap::new();
        let mut previous = Previous::default();
        for tick in 0..200u32 {
            for m in members.iter_mut() {
                if down_until.get(&m.name).is_some_and(|until| *until <= tick) {
                    m.state = current(true, true, 0);
                }
            }
            let s = step(&p, &members, &previous, GEN, t(i64::from(tick)));
            for name in &s.update {
                *updates.entry(name.clone()).or_default() += 1;
                down_until.insert(name.clone(), tick + settle);
                let m = members
                    .iter_mut()
                    .find(|m| &m.name == name)
                    .expect("member");
                if tick == 0 {
                    assert!(m.canary, "{name} before the canary");
                }
                m.state = current(false, false, i64::from(tick));
            }
            let down: Vec<&Member> = members.iter().filter(|m| !m.state.available()).collect();
            assert!(down.len() <= 5, "tick {tick}: {} unavailable", down.len());
            let mut pairs = BTreeMap::new();
            for m in &down {
                *pairs.entry(m.group.clone()).or_insert(0) += 1;
            }
            assert!(pairs.values().all(|n| *n <= 1), "tick {tick}: {pairs:?}");
            previous = Previous {
                reason: Some(s.reason.into()),
                message: Some(s.message),
                generation: GEN,
                rollout_start: s.rollout_start,
            };
            if s.reason == REASON_COMPLETE {
                break;
            }
        }
        assert_eq!(previous.reason.as_deref(), Some(REASON_COMPLETE));
        assert_eq!(updates.len(), 20);
        assert!(updates.values().all(|n| *n == 1), "{updates:?}");
    }
}

//! Unit tests of membership and shard ownership (`cluster/mod.rs`).

use super::*;

fn view(replicas: u32, alive: &[u32]) -> View {
    View {
        replicas,
        alive: alive.iter().map(|o| (*o, format!("g{o}"))).collect(),
        members: (0..replicas).map(|o| (o, format!("g{o}"))).collect(),
        standing_aside: Default::default(),
    }
}

#[test]
fn a_replica_holds_its_own_shard_and_ignores_live_others() {
    let p = plan(1, &view(3, &[0, 1, 2]), &[]);
    assert_eq!(p[&1], LeaseAction::Hold);
    assert_eq!(p[&0], LeaseAction::Ignore);
    assert_eq!(p[&2], LeaseAction::Ignore);
}

#[test]
fn exactly_one_live_replica_is_the_preferred_taker_of_a_dead_shard() {
    let v = view(3, &[0, 2]);
    let preferred: Vec<u32> = [0u32, 2]
        .iter()
        .filter(|o| plan(**o, &v, &[])[&1] == LeaseAction::TakeOverIfExpired { preferred: true })
        .copied()
        .collect();
    assert_eq!(preferred.len(), 1, "{preferred:?}");
}

#[test]
fn a_taken_over_shard_is_handed_back_and_shards_beyond_n_are_released() {
    let p = plan(0, &view(3, &[0, 1, 2]), &[0, 1]);
    assert_eq!(p[&1], LeaseAction::Release);
    let p = plan(0, &view(2, &[0, 1]), &[0, 3]);
    assert_eq!(p[&3], LeaseAction::Release);
    assert_eq!(p[&0], LeaseAction::Hold);
}

#[test]
fn the_shard_of_a_replica_standing_aside_is_taken_over_by_one_other_replica() {
    let mut v = view(3, &[0, 1, 2]);
    v.standing_aside.insert(1);
    let preferred: Vec<u32> = [0u32, 2]
        .iter()
        .filter(|o| plan(**o, &v, &[])[&1] == LeaseAction::TakeOverIfExpired { preferred: true })
        .copied()
        .collect();
    assert_eq!(preferred.len(), 1, "{preferred:?}");
    // The taker keeps it while the replica stands aside, and hands it back afterwards.
    assert_eq!(
        plan(preferred[0], &v, &[1])[&1],
        LeaseAction::TakeOverIfExpired { preferred: true }
    );
    v.standing_aside.clear();
    assert_eq!(plan(preferred[0], &v, &[1])[&1], LeaseAction::Release);
    // The replica standing aside keeps trying to hold its own shard.
    assert_eq!(plan(1, &v, &[])[&1], LeaseAction::Hold);
    // ... and is never the taker of another shard standing aside.
    let mut two = view(3, &[0, 1, 2]);
    two.standing_aside.extend([1, 2]);
    assert_ne!(
        plan(1, &two, &[])[&2],
        LeaseAction::TakeOverIfExpired { preferred: true }
    );
}

#[test]
fn a_replica_not_yet_in_the_view_still_holds_its_shard() {
    let p = plan(4, &view(3, &[0, 1, 2]), &[]);
    assert_eq!(p[&4], LeaseAction::Hold);
    assert_eq!(p.len(), 5);
}

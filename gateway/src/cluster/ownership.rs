//! Which slots this replica is responsible for: it runs their stale sweep and resync and writes
//! the status changes those find. Requests are served for every device regardless (all state is
//! shared), so ownership never decides correctness of an answer, only who does background work.
//!
//! Without Redis the assignment is static (every slot); in a cluster the per-shard Leases publish
//! changes through the `watch` channel (see [`crate::cluster`]).

use std::sync::Arc;

use apollo_protocol::shard::{shard, slot, SLOT_COUNT};
use tokio::sync::watch;

/// A set of slots, and the shards they make up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSlots {
    owned: Vec<bool>,
    shards: Vec<u32>,
    replicas: u32,
}

/// The current set of owned slots; changes when shard ownership changes.
pub type Ownership = watch::Receiver<Arc<OwnedSlots>>;

impl OwnedSlots {
    /// Every slot (a single replica).
    pub fn all() -> Self {
        Self::of_shards(&[0], 1)
    }

    /// No slot.
    pub fn none() -> Self {
        Self::of_shards(&[], 1)
    }

    /// The slots of `shards` when the device space is split over `replicas` replicas.
    pub fn of_shards(shards: &[u32], replicas: u32) -> Self {
        let mut shards = shards.to_vec();
        shards.sort_unstable();
        shards.dedup();
        Self {
            owned: (0..SLOT_COUNT)
                .map(|s| shards.contains(&shard(s, replicas)))
                .collect(),
            shards,
            replicas,
        }
    }

    /// The owned shards and their slots.
    pub fn by_shard(&self) -> Vec<(u32, Vec<u16>)> {
        self.shards
            .iter()
            .map(|&sh| {
                let slots = (0..SLOT_COUNT)
                    .filter(|s| shard(*s, self.replicas) == sh)
                    .collect();
                (sh, slots)
            })
            .collect()
    }

    /// Whether `slot` is owned.
    pub fn owns_slot(&self, slot: u16) -> bool {
        self.owned.get(usize::from(slot)).copied().unwrap_or(false)
    }

    /// Whether the slot of `device` is owned.
    pub fn owns_device(&self, device: &str) -> bool {
        self.owns_slot(slot(device))
    }

    /// The owned slots in ascending order.
    pub fn slots(&self) -> Vec<u16> {
        (0..SLOT_COUNT).filter(|s| self.owns_slot(*s)).collect()
    }
}

/// A fixed ownership that never changes (and the sender that keeps it alive).
pub fn fixed(slots: OwnedSlots) -> (watch::Sender<Arc<OwnedSlots>>, Ownership) {
    watch::channel(Arc::new(slots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_slots() {
        let replicas = 3;
        let parts: Vec<OwnedSlots> = (0..replicas)
            .map(|i| OwnedSlots::of_shards(&[i], replicas))
            .collect();
        for s in 0..SLOT_COUNT {
            assert_eq!(
                parts.iter().filter(|p| p.owns_slot(s)).count(),
                1,
                "slot {s}"
            );
        }
        let total: usize = parts.iter().map(|p| p.slots().len()).sum();
        assert_eq!(total, usize::from(SLOT_COUNT));
        assert_eq!(OwnedSlots::of_shards(&[0], 1), OwnedSlots::all());
        assert!(OwnedSlots::none().slots().is_empty());
        assert!(OwnedSlots::all().owns_device("anything"));
        assert!(!OwnedSlots::all().owns_slot(SLOT_COUNT));
        let two = OwnedSlots::of_shards(&[2, 0], 3);
        let by_shard = two.by_shard();
        assert_eq!(by_shard.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(
            by_shard.iter().map(|(_, v)| v.len()).sum::<usize>(),
            two.slots().len()
        );
    }
}

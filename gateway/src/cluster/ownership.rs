//! Which slots this replica is responsible for: it runs their stale sweep and resync and writes
//! the status changes those find. Requests are served for every device regardless (all state is
//! shared), so ownership never decides correctness of an answer, only who does background work.
//!
//! Today the assignment is static (shard `ordinal` of `replicas`); per-shard Leases later publish
//! changes through the same `watch` channel.

use std::sync::Arc;

use apollo_protocol::shard::{shard, slot, SLOT_COUNT};
use tokio::sync::watch;

/// A set of slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSlots {
    owned: Vec<bool>,
}

/// The current set of owned slots; changes when shard ownership changes.
pub type Ownership = watch::Receiver<Arc<OwnedSlots>>;

impl OwnedSlots {
    /// Every slot (a single replica).
    pub fn all() -> Self {
        Self {
            owned: vec![true; usize::from(SLOT_COUNT)],
        }
    }

    /// No slot.
    pub fn none() -> Self {
        Self {
            owned: vec![false; usize::from(SLOT_COUNT)],
        }
    }

    /// The slots of `shards` when the device space is split over `replicas` replicas.
    pub fn of_shards(shards: &[u32], replicas: u32) -> Self {
        Self {
            owned: (0..SLOT_COUNT)
                .map(|s| shards.contains(&shard(s, replicas)))
                .collect(),
        }
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
    }
}

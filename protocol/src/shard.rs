//! Slots and shards.
//!
//! - `slot(device)` = first 8 bytes of SHA-256(device name), read big-endian as a u64, modulo
//!   [`SLOT_COUNT`]. Fixed forever: every router, gateway and tool computes the same slot.
//! - `shard(slot, n)` = jump consistent hash (Lamping & Veach, 2014, "A Fast, Minimal Memory,
//!   Consistent Hash Algorithm") of the slot over `n` replicas. Going from n to n+1 replicas moves
//!   about 1/(n+1) of the slots, all of them to the new replica.
//! - Redis keys of a device carry the hash tag `{s<slot>}` so multi-key operations stay inside one
//!   Redis Cluster slot.

use sha2::{Digest, Sha256};

/// Number of slots devices are hashed into.
pub const SLOT_COUNT: u16 = 1024;

/// The slot of a device (0..SLOT_COUNT).
pub fn slot(device: &str) -> u16 {
    let digest = Sha256::digest(device.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % u64::from(SLOT_COUNT)) as u16
}

/// Jump consistent hash of `key` onto `buckets` buckets (0..buckets). `buckets == 0` yields 0.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = (((b + 1) as f64) * ((1u64 << 31) as f64 / (((key >> 33) + 1) as f64))) as i64;
    }
    b.max(0) as u32
}

/// The shard (replica ordinal) that owns `slot` when there are `replicas` replicas.
pub fn shard(slot: u16, replicas: u32) -> u32 {
    jump_hash(u64::from(slot), replicas)
}

/// The shard that owns `device` when there are `replicas` replicas.
pub fn shard_for_device(device: &str, replicas: u32) -> u32 {
    shard(slot(device), replicas)
}

/// Redis hash tag of a slot: `{s<slot>}`.
pub fn slot_tag(slot: u16) -> String {
    format!("{{s{slot}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_hash_matches_reference_values() {
        // Values produced by the paper's reference C++ implementation (as used by the widely
        // used Go port's test table).
        assert_eq!(jump_hash(1, 1), 0);
        assert_eq!(jump_hash(42, 57), 43);
        assert_eq!(jump_hash(0xDEAD_10CC, 1), 0);
        assert_eq!(jump_hash(0xDEAD_10CC, 666), 361);
        assert_eq!(jump_hash(256, 1024), 520);
    }

    #[test]
    fn slot_is_fixed_and_in_range() {
        // Pinned values: changing the slot function would move every device.
        assert_eq!(slot("tor1-01"), slot("tor1-01"));
        let pinned: Vec<u16> = ["tor1-01", "tor1-02", "spine-7"]
            .iter()
            .map(|d| slot(d))
            .collect();
        assert_eq!(pinned, PINNED_SLOTS);
        for i in 0..10_000 {
            assert!(slot(&format!("dev-{i}")) < SLOT_COUNT);
        }
    }

    const PINNED_SLOTS: [u16; 3] = [196, 696, 652];

    #[test]
    fn growing_moves_only_to_the_new_shard_and_about_one_in_n_plus_one() {
        for n in 1..12u32 {
            let mut moved = 0;
            for s in 0..SLOT_COUNT {
                let before = shard(s, n);
                let after = shard(s, n + 1);
                if before != after {
                    assert_eq!(after, n, "slot {s} moved to an old shard");
                    moved += 1;
                }
            }
            let expected = f64::from(SLOT_COUNT) / f64::from(n + 1);
            let ratio = f64::from(moved) / expected;
            assert!(
                (0.7..1.3).contains(&ratio),
                "n={n}: moved {moved}, expected ~{expected}"
            );
        }
    }

    #[test]
    fn devices_spread_evenly() {
        let mut counts = [0u32; 3];
        for i in 0..3000 {
            counts[shard_for_device(&format!("dev-{i:05}"), 3) as usize] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn zero_replicas_is_shard_zero_and_tag_format() {
        assert_eq!(shard(5, 0), 0);
        assert_eq!(slot_tag(17), "{s17}");
    }
}

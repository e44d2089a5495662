//! Gateway membership in Redis and how routers turn it into a route for a device.
//!
//! Layout (one Redis hash, so a router reads the whole view in one round trip):
//! - `HSET apollo:gateways <ordinal> {"addr":"host:port","heartbeatMs":<ms>}`: each gateway
//!   registers its ordinal and device-API address, and refreshes `heartbeatMs` (taken from Redis'
//!   own `TIME`, so every replica and router shares one clock) every [`HEARTBEAT_EVERY_MS`].
//! - A gateway shutting down gracefully deletes its field (`HDEL`): that is a scale-down, and the
//!   replica count shrinks at once.
//! - A gateway that dies without deregistering stays a member (its shard still counts, so devices
//!   do not reshuffle) but is not alive once its heartbeat is older than [`ALIVE_TTL_MS`]; its
//!   devices go to a deterministic fallback. After [`FORGET_AFTER_MS`] without a heartbeat it is
//!   forgotten (a crashed scale-down must not pin N forever).
//!
//! - A gateway that cannot renew its own shard Lease for a whole Lease duration (Kubernetes
//!   unreachable from it, or refusing it) registers with `"standAside": true`: it still serves
//!   the devices routed to it, but the other replicas treat its shard as orphaned and one of them
//!   takes the Lease over and sweeps it, until the replica can hold it again.
//!
//! Replica count N = highest member ordinal + 1 (StatefulSet ordinals are 0..N-1).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::shard::{jump_hash, shard};

/// Redis hash holding the membership.
pub const MEMBERS_KEY: &str = "apollo:gateways";
/// How often a gateway refreshes its heartbeat.
pub const HEARTBEAT_EVERY_MS: u64 = 1_000;
/// A member whose heartbeat is older than this is not alive.
pub const ALIVE_TTL_MS: u64 = 3_000;
/// A member whose heartbeat is older than this is no longer a member.
pub const FORGET_AFTER_MS: u64 = 5 * 60 * 1_000;

/// One gateway's registration, the value of its field in [`MEMBERS_KEY`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// Address routers connect to (`host:port` of the device API).
    pub addr: String,
    /// Redis server time (ms since the epoch) of the last heartbeat.
    pub heartbeat_ms: u64,
    /// The replica cannot hold its own shard's Lease: another replica should take it over.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stand_aside: bool,
}

/// Lua: refresh (or create) a registration stamped with Redis' clock.
/// KEYS[1] = MEMBERS_KEY; ARGV[1] = ordinal; ARGV[2] = addr; ARGV[3] (optional) = `1` when the
/// replica stands aside from its shard. Returns the stamp.
pub const REGISTER_SCRIPT: &str = r#"
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local reg = {addr = ARGV[2], heartbeatMs = ms}
if ARGV[3] == '1' then reg['standAside'] = true end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(reg))
return ms
"#;

/// Lua: the whole membership plus Redis' clock in one round trip.
/// KEYS[1] = MEMBERS_KEY. Returns `{now_ms, field1, value1, field2, value2, ...}`.
pub const READ_SCRIPT: &str = r#"
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {tostring(ms)}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all do out[#out + 1] = all[i] end
return out
"#;

/// Where a device's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Ordinal of the chosen replica.
    pub ordinal: u32,
    /// Its address.
    pub addr: String,
    /// Whether this is a fallback because the owning replica is not alive.
    pub fallback: bool,
}

/// A router's (or gateway's) view of the membership at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Replica count N (highest member ordinal + 1; 0 when there are no members).
    pub replicas: u32,
    /// Members that are alive, by ordinal.
    pub alive: BTreeMap<u32, String>,
    /// Every member (alive or not), by ordinal.
    pub members: BTreeMap<u32, String>,
    /// Alive members that stand aside from their shard (cannot hold its Lease).
    pub standing_aside: BTreeSet<u32>,
}

impl View {
    /// Builds a view from `(ordinal field, registration JSON)` pairs read at Redis time `now_ms`.
    /// Unparseable entries are skipped (a newer gateway may write fields we do not know).
    pub fn from_registrations<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
        now_ms: u64,
    ) -> Self {
        let mut view = View::default();
        for (field, value) in entries {
            let (Ok(ordinal), Ok(reg)) = (
                field.parse::<u32>(),
                serde_json::from_str::<Registration>(value),
            ) else {
                continue;
            };
            let age = now_ms.saturating_sub(reg.heartbeat_ms);
            if age > FORGET_AFTER_MS {
                continue;
            }
            if age <= ALIVE_TTL_MS {
                view.alive.insert(ordinal, reg.addr.clone());
                if reg.stand_aside {
                    view.standing_aside.insert(ordinal);
                }
            }
            view.members.insert(ordinal, reg.addr);
        }
        view.replicas = view.members.keys().next_back().map_or(0, |max| max + 1);
        view
    }

    /// The owner of `slot`: `shard(slot, N)`. It may not be alive.
    pub fn owner(&self, slot: u16) -> u32 {
        shard(slot, self.replicas)
    }

    /// Route for `slot`: its owner when alive, otherwise a deterministic fallback among the alive
    /// replicas not in `exclude` (every router with the same view picks the same one). None when
    /// no candidate is alive.
    pub fn route(&self, slot: u16, exclude: &[u32]) -> Option<Route> {
        let owner = self.owner(slot);
        if !exclude.contains(&owner) {
            if let Some(addr) = self.alive.get(&owner) {
                return Some(Route {
                    ordinal: owner,
                    addr: addr.clone(),
                    fallback: false,
                });
            }
        }
        let candidates: Vec<(&u32, &String)> = self
            .alive
            .iter()
            .filter(|(o, _)| !exclude.contains(o) && **o != owner)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        // Jump hash over the candidates keeps fallbacks spread and stable as replicas come back.
        let pick = jump_hash(u64::from(slot), candidates.len() as u32) as usize;
        let (ordinal, addr) = candidates[pick];
        Some(Route {
            ordinal: *ordinal,
            addr: addr.clone(),
            fallback: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(addr: &str, ms: u64) -> String {
        serde_json::to_string(&Registration {
            addr: addr.into(),
            heartbeat_ms: ms,
            stand_aside: false,
        })
        .expect("serialise")
    }

    #[test]
    fn replicas_is_highest_ordinal_plus_one_and_dead_members_still_count() {
        let now = 1_000_000;
        let a = reg("a:1", now);
        let b = reg("b:1", now - ALIVE_TTL_MS - 1);
        let c = reg("c:1", now);
        let view = View::from_registrations(
            [("0", a.as_str()), ("1", b.as_str()), ("2", c.as_str())],
            now,
        );
        assert_eq!(view.replicas, 3);
        assert_eq!(view.alive.keys().copied().collect::<Vec<_>>(), [0, 2]);
    }

    #[test]
    fn a_replica_standing_aside_is_alive_and_says_so_and_older_registrations_do_not() {
        let now = 1_000_000;
        let aside = serde_json::to_string(&Registration {
            addr: "a:1".into(),
            heartbeat_ms: now,
            stand_aside: true,
        })
        .expect("serialise");
        assert!(aside.contains(r#""standAside":true"#), "{aside}");
        let plain = reg("b:1", now);
        assert!(!plain.contains("standAside"), "{plain}");
        let view = View::from_registrations([("0", aside.as_str()), ("1", plain.as_str())], now);
        assert_eq!(view.alive.len(), 2);
        assert_eq!(view.standing_aside.iter().copied().collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn forgotten_and_garbage_entries_are_skipped() {
        let now = 10 * FORGET_AFTER_MS;
        let old = reg("x:1", now - FORGET_AFTER_MS - 1);
        let ok = reg("y:1", now);
        let view = View::from_registrations(
            [
                ("3", old.as_str()),
                ("0", ok.as_str()),
                ("zz", ok.as_str()),
                ("1", "{"),
            ],
            now,
        );
        assert_eq!(view.replicas, 1);
    }

    #[test]
    fn routes_to_owner_when_alive_and_falls_back_deterministically() {
        let now = 50_000;
        let regs: Vec<String> = (0..3).map(|i| reg(&format!("g{i}:1"), now)).collect();
        let view = View::from_registrations(
            regs.iter()
                .enumerate()
                .map(|(i, r)| (["0", "1", "2"][i], r.as_str())),
            now,
        );
        for slot in 0..1024u16 {
            let r = view.route(slot, &[]).expect("route");
            assert_eq!(r.ordinal, shard(slot, 3));
            assert!(!r.fallback);
        }
        // Owner 1 dead: its slots go to 0 or 2, the same choice every time; others unchanged.
        let mut dead = view.clone();
        dead.alive.remove(&1);
        for slot in 0..1024u16 {
            let r = dead.route(slot, &[]).expect("route");
            if shard(slot, 3) == 1 {
                assert!(r.fallback && r.ordinal != 1);
                assert_eq!(dead.route(slot, &[]), Some(r));
            } else {
                assert_eq!(r.ordinal, shard(slot, 3));
            }
        }
        // Excluding an unreachable replica picks another; nothing alive -> None.
        let r = view.route(7, &[view.owner(7)]).expect("fallback");
        assert_ne!(r.ordinal, view.owner(7));
        assert_eq!(View::default().route(7, &[]), None);
    }
}

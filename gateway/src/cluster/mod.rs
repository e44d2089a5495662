//! The gateway cluster: membership, shard ownership and the sweeps of owned shards.
//!
//! - this module: membership in Redis and the per-shard Leases deciding which slots this replica
//!   owns;
//! - [`ownership`]: the owned slots, published to the status writer and the sweeps;
//! - [`sweep`]: the stale sweep and the level-triggered resync over the owned slots.
//!
//! Every second the replica (1) registers itself in Redis with its ordinal and advertised address
//! (see [`apollo_protocol::membership`]; routers read the same hash) and reads the whole
//! membership, which gives the replica count N; and (2) manages one `coordination.k8s.io/v1`
//! Lease per shard (`apollo-gateway-shard-<i>`):
//! - shard `ordinal` is its own: it acquires and renews that Lease;
//! - a shard whose replica is not alive and whose Lease has expired is taken over by one live
//!   replica (the same deterministic choice every replica makes; the others step in only if that
//!   one does not), and handed back (released) as soon as its replica is alive again;
//! - a shard at or above N (after a scale-down) is released.
//!
//! The slots of the shards whose Lease this replica holds (and renewed within the Lease duration)
//! are published as its [`OwnedSlots`]: the stale sweep and the resync run on exactly those.
//! Each Lease is driven by [`LeaseLock`], client-go's protocol: writes use the resourceVersion as
//! an optimistic lock, so of two replicas racing for a Lease exactly one wins, and a Lease held by
//! another replica counts as expired only once it has been seen unchanged for a whole Lease
//! duration on this replica's own clock, never by reading its `renewTime` against our wall clock
//! (a replica whose clock runs ahead must not steal live shards). Transitions are decided
//! atomically in Redis anyway, so the brief overlaps a scale change can cause never produce a
//! duplicate Event.

pub mod ownership;
pub mod sweep;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apollo_protocol::membership::{
    View, HEARTBEAT_EVERY_MS, MEMBERS_KEY, READ_SCRIPT, REGISTER_SCRIPT,
};
use apollo_protocol::shard::jump_hash;
use apollo_runtime::lease::{Attempt, LeaseError, LeaseLock};
use apollo_runtime::redis::{Eval, RedisConnection, RedisTarget, Timeouts};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::ownership::OwnedSlots;
use crate::metrics::ShardLabels;
use crate::state::{self, SharedClock};

/// Prefix of the shard Leases' names.
pub const SHARD_LEASE_PREFIX: &str = "apollo-gateway-shard-";
/// Bound of each Redis or Kubernetes call made here.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How this replica takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This replica's ordinal (its own shard).
    pub ordinal: u32,
    /// Address routers use to reach this replica's device API.
    pub advertise_addr: String,
    /// Redis holding the membership.
    pub redis_url: String,
    /// Namespace of the shard Leases.
    pub lease_namespace: String,
    /// Lease duration; a dead replica's shard is taken over once its Lease has been seen unchanged
    /// this long.
    pub lease_duration: Duration,
}

impl ClusterConfig {
    fn identity(&self) -> String {
        format!("apollo-gateway-{}", self.ordinal)
    }
}

/// Name of the Lease of `shard`.
pub fn lease_name(shard: u32) -> String {
    format!("{SHARD_LEASE_PREFIX}{shard}")
}

/// What to do about one shard's Lease this tick (pure decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// Acquire it if free or expired, renew it if held.
    Hold,
    /// Take it over only if it has expired, or has stayed expired for long (not the preferred taker).
    TakeOverIfExpired {
        /// Whether this replica is the one every replica picks for the takeover.
        preferred: bool,
    },
    /// Give it up if held.
    Release,
    /// Leave it alone.
    Ignore,
}

/// Decides, for every shard that matters, what this replica does with its Lease.
pub fn plan(ordinal: u32, view: &View, held: &[u32]) -> BTreeMap<u32, LeaseAction> {
    let replicas = view.replicas.max(ordinal + 1);
    let mut out = BTreeMap::new();
    for shard in 0..replicas {
        let action = if shard == ordinal {
            LeaseAction::Hold
        } else if view.alive.contains_key(&shard) && !view.standing_aside.contains(&shard) {
            // Its replica is alive: hand it back if we had taken it over.
            if held.contains(&shard) {
                LeaseAction::Release
            } else {
                LeaseAction::Ignore
            }
        } else {
            // Its replica is gone, or alive but unable to hold the Lease (standing aside).
            let candidates: Vec<u32> = view
                .alive
                .keys()
                .copied()
                .filter(|o| *o != shard && !view.standing_aside.contains(o))
                .collect();
            let preferred = !candidates.is_empty()
                && candidates[jump_hash(u64::from(shard), candidates.len() as u32) as usize]
                    == ordinal;
            LeaseAction::TakeOverIfExpired { preferred }
        };
        out.insert(shard, action);
    }
    for shard in held {
        if *shard >= replicas {
            out.insert(*shard, LeaseAction::Release);
        }
    }
    out
}

struct Held {
    /// Until when we may act on it (last successful write + duration).
    valid_until: Instant,
    /// When we last wrote it.
    renewed_at: Instant,
}

/// Metrics the cluster task keeps.
#[derive(Clone)]
pub struct ClusterMetrics {
    /// Offset of this machine's clock from Redis'.
    pub clock_offset: Gauge<f64, AtomicU64>,
    /// 1 for each shard whose Lease this replica holds, 0 for the other shards of the cluster.
    pub shard_held: Family<ShardLabels, Gauge>,
    /// 1 while this replica stands aside from its own shard.
    pub standing_aside: Gauge,
}

/// Runs membership and shard leases until `shutdown`, publishing owned slots on `ownership`.
///
/// The replica joins (registers, takes Leases) only once `ready` completes — its watch cache has
/// synced: a replica that cannot serve its devices must not attract them from routers nor hold a
/// shard it cannot sweep. On shutdown the replica deregisters and releases its Leases, so a
/// scale-down hands its work over at once.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: ClusterConfig,
    client: kube::Client,
    initial_replicas: u32,
    ownership: watch::Sender<Arc<OwnedSlots>>,
    clock: SharedClock,
    metrics: ClusterMetrics,
    ready: impl std::future::Future<Output = ()>,
    shutdown: CancellationToken,
) {
    let leases: Api<Lease> = Api::namespaced(client, &config.lease_namespace);
    let redis = match RedisTarget::parse(&config.redis_url) {
        Ok(c) => c,
        Err(error) => {
            warn!(%error, "invalid Redis URL for membership");
            return;
        }
    };
    let register = Eval::new(REGISTER_SCRIPT);
    let read = Eval::new(READ_SCRIPT);
    let mut conn: Option<RedisConnection> = None;
    let mut view = View {
        replicas: initial_replicas.max(config.ordinal + 1),
        ..View::default()
    };
    let mut held: BTreeMap<u32, Held> = BTreeMap::new();
    // One lock per shard we have dealt with: each remembers what it observed of its Lease.
    let mut locks: BTreeMap<u32, LeaseLock> = BTreeMap::new();
    let mut expired_since: BTreeMap<u32, Instant> = BTreeMap::new();
    // Shards whose Lease calls Kubernetes refused (401/403), each warned about once.
    let mut refused: BTreeSet<u32> = BTreeSet::new();
    let mut published: Option<(Vec<u32>, u32)> = None;
    // Since when our own shard's Lease calls have been failing (not: held by another replica).
    let mut own_failing_since: Option<Instant> = None;
    let mut standing_aside = false;
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = ready => {}
    }
    let mut ticker = tokio::time::interval(Duration::from_millis(HEARTBEAT_EVERY_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(
        ordinal = config.ordinal,
        advertise = %config.advertise_addr,
        lease_namespace = %config.lease_namespace,
        "joining the gateway cluster"
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        // 1. Membership.
        let measured = (&clock, &metrics.clock_offset);
        let membership = refresh_membership(
            &redis,
            &mut conn,
            (&register, &read),
            &config,
            standing_aside,
            measured,
        )
        .await;
        match membership {
            Ok(new_view) => {
                if new_view.replicas != view.replicas || new_view.alive != view.alive {
                    info!(
                        replicas = new_view.replicas,
                        alive = ?new_view.alive.keys().collect::<Vec<_>>(),
                        "gateway membership changed"
                    );
                }
                view = new_view;
            }
            Err(error) => {
                conn = None;
                debug!(%error, "membership refresh failed; keeping the last view");
            }
        }
        // 2. Leases.
        let held_now: Vec<u32> = held.keys().copied().collect();
        for (shard, action) in plan(config.ordinal, &view, &held_now) {
            let lock = locks
                .entry(shard)
                .or_insert_with(|| shard_lock(&leases, &config, shard));
            let result = match action {
                LeaseAction::Hold => hold(lock, &config, shard, &mut held).await,
                LeaseAction::TakeOverIfExpired { preferred } => {
                    if held.contains_key(&shard) {
                        hold(lock, &config, shard, &mut held).await
                    } else {
                        let since = *expired_since.entry(shard).or_insert_with(Instant::now);
                        // Not the preferred taker: step in only if the shard stays orphaned.
                        let patient = preferred || since.elapsed() > 2 * config.lease_duration;
                        if patient {
                            hold(lock, &config, shard, &mut held).await
                        } else {
                            Ok(())
                        }
                    }
                }
                LeaseAction::Release => {
                    expired_since.remove(&shard);
                    release(lock, shard, &mut held).await
                }
                LeaseAction::Ignore => {
                    expired_since.remove(&shard);
                    Ok(())
                }
            };
            let succeeded = result.is_ok();
            match result {
                Err(error) if is_refused(&error) => {
                    // A configuration error, not a blip: say so once, loudly.
                    if refused.insert(shard) {
                        warn!(
                            shard,
                            lease_namespace = %config.lease_namespace,
                            %error,
                            "Kubernetes refused the shard lease call: this replica's \
                             ServiceAccount lacks the Lease RBAC in that namespace, so it sweeps \
                             nothing for this shard"
                        );
                    }
                }
                Err(error) => {
                    if shard == config.ordinal && own_failing_since.is_none() {
                        warn!(shard, %error, "could not renew this replica's own shard lease");
                    } else if shard != config.ordinal {
                        warn!(shard, %error, "shard lease call failed");
                    }
                }
                Ok(()) => {
                    refused.remove(&shard);
                }
            }
            if shard == config.ordinal {
                if succeeded {
                    own_failing_since = None;
                } else {
                    own_failing_since.get_or_insert_with(Instant::now);
                }
            }
            if held.contains_key(&shard) {
                expired_since.remove(&shard);
            }
        }
        // A Lease we could not renew in time is no longer ours to act on.
        let now = Instant::now();
        held.retain(|shard, h| {
            let valid = h.valid_until > now;
            if !valid {
                warn!(
                    shard,
                    "shard lease not renewed in time; stopping its sweeps"
                );
            }
            valid
        });
        // Unable to hold our own shard for a whole Lease duration: stand aside (announced with
        // the next registration) so another replica takes it over; rejoin once a Lease call
        // succeeds again.
        let aside = own_failing_since.is_some_and(|since| since.elapsed() >= config.lease_duration);
        if aside != standing_aside {
            if aside {
                warn!(
                    shard = config.ordinal,
                    "this replica has not been able to renew its shard lease for a lease \
                     duration; standing aside so another replica sweeps the shard"
                );
            } else {
                info!(
                    shard = config.ordinal,
                    "shard lease calls succeed again; claiming the shard back"
                );
            }
            standing_aside = aside;
            metrics.standing_aside.set(i64::from(aside));
        }
        // 3. Publish what we own.
        let replicas = view.replicas.max(config.ordinal + 1);
        let shards: Vec<u32> = held.keys().copied().filter(|s| *s < replicas).collect();
        if published.as_ref() != Some(&(shards.clone(), replicas)) {
            info!(?shards, replicas, "owned shards");
            publish_held(&metrics.shard_held, &shards, replicas);
            ownership.send_replace(Arc::new(OwnedSlots::of_shards(&shards, replicas)));
            published = Some((shards, replicas));
        }
    }
    // Graceful leave: deregister first (routers move devices at once), then free the Leases.
    if let Some(c) = conn.as_mut() {
        let removed: Result<Result<i64, _>, _> = tokio::time::timeout(
            CALL_TIMEOUT,
            redis::cmd("HDEL")
                .arg(MEMBERS_KEY)
                .arg(config.ordinal)
                .query_async(c),
        )
        .await;
        if !matches!(removed, Ok(Ok(_))) {
            warn!("could not deregister from the membership; routers notice in a few seconds");
        }
    }
    let shards: Vec<u32> = held.keys().copied().collect();
    for shard in shards {
        let lock = locks
            .entry(shard)
            .or_insert_with(|| shard_lock(&leases, &config, shard));
        if let Err(error) = release(lock, shard, &mut held).await {
            warn!(shard, %error, "could not release the shard lease; it will expire");
        }
    }
    ownership.send_replace(Arc::new(OwnedSlots::none()));
    publish_held(&metrics.shard_held, &[], 0);
    info!("left the gateway cluster");
}

/// Sets `shard_held` to 1 for `shards` and 0 for every other shard below `replicas`.
pub fn publish_held(shard_held: &Family<ShardLabels, Gauge>, shards: &[u32], replicas: u32) {
    shard_held.clear();
    for shard in 0..replicas.max(shards.iter().max().map_or(0, |m| m + 1)) {
        shard_held
            .get_or_create(&ShardLabels { shard })
            .set(i64::from(shards.contains(&shard)));
    }
}

async fn refresh_membership(
    target: &RedisTarget,
    conn: &mut Option<RedisConnection>,
    (register, read): (&Eval, &Eval),
    config: &ClusterConfig,
    standing_aside: bool,
    (clock, clock_offset): (&SharedClock, &Gauge<f64, AtomicU64>),
) -> Result<View, String> {
    if conn.is_none() {
        // Connects on first use; a single Redis or a Redis Cluster (the members hash is one key).
        let timeouts = Timeouts {
            connect: CALL_TIMEOUT,
            response: CALL_TIMEOUT,
        };
        *conn = Some(target.connect_lazy(timeouts).map_err(|e| e.to_string())?);
    }
    let Some(c) = conn.as_mut() else {
        return Err("no connection".into());
    };
    let mut registration = register.call();
    registration
        .key(MEMBERS_KEY)
        .arg(config.ordinal)
        .arg(&config.advertise_addr)
        .arg(if standing_aside { "1" } else { "0" });
    tokio::time::timeout(CALL_TIMEOUT, registration.invoke::<u64>(c))
        .await
        .map_err(|_| "register timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let sent_ms = state::wall_clock_ms();
    let mut reading = read.call();
    reading.key(MEMBERS_KEY);
    let fields: Vec<String> = tokio::time::timeout(CALL_TIMEOUT, reading.invoke(c))
        .await
        .map_err(|_| "membership read timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let received_ms = state::wall_clock_ms();
    let Some((now, rest)) = fields.split_first() else {
        return Err("empty membership reply".into());
    };
    let now_ms = now.parse::<u64>().map_err(|e| e.to_string())?;
    if let Some(offset) = follow_shared_clock(
        clock,
        sent_ms,
        i64::try_from(now_ms).unwrap_or(i64::MAX),
        received_ms,
    ) {
        clock_offset.set(offset as f64 / 1000.0);
    }
    Ok(View::from_registrations(
        rest.chunks_exact(2)
            .map(|kv| (kv[0].as_str(), kv[1].as_str())),
        now_ms,
    ))
}

/// How far this machine's clock may stray from Redis' before it is worth a warning.
const CLOCK_SKEW_WARNING_MS: i64 = 1_000;

/// Moves `clock` onto Redis' clock, from one reading of it (see [`state::offset_from_reading`]),
/// and returns the offset taken; warns when this machine's clock is off by more than a second, and
/// again when that changes by another second.
fn follow_shared_clock(
    clock: &SharedClock,
    sent_ms: i64,
    redis_ms: i64,
    received_ms: i64,
) -> Option<i64> {
    let offset = state::offset_from_reading(sent_ms, redis_ms, received_ms)?;
    let previous = clock.offset_ms();
    clock.set_offset_ms(offset);
    let noteworthy =
        offset.abs() > CLOCK_SKEW_WARNING_MS && (offset - previous).abs() > CLOCK_SKEW_WARNING_MS;
    if noteworthy {
        warn!(
            offset_ms = offset,
            "this machine's clock differs from Redis'; lastSeen and stale sweeps use Redis' clock"
        );
    }
    Some(offset)
}

/// Whether Kubernetes refused a Lease call for lack of permission (401 or 403).
fn is_refused(error: &LeaseError) -> bool {
    matches!(
        error,
        LeaseError::Api {
            source: kube::Error::Api(status),
            ..
        } if matches!(status.code, 401 | 403)
    )
}

/// The Lock of shard `shard`'s Lease, held as this replica.
fn shard_lock(leases: &Api<Lease>, config: &ClusterConfig, shard: u32) -> LeaseLock {
    LeaseLock::new(
        leases.clone(),
        lease_name(shard),
        config.identity(),
        config.lease_duration,
    )
    .with_call_timeout(CALL_TIMEOUT)
    .with_labels(
        [(
            "app.kubernetes.io/name".to_owned(),
            "apollo-gateway".to_owned(),
        )]
        .into(),
    )
}

/// Acquires (when ours, free, released or expired) or renews the Lease of `shard`. Renewal
/// happens every third of the duration, which keeps Lease writes to a trickle.
async fn hold(
    lock: &mut LeaseLock,
    config: &ClusterConfig,
    shard: u32,
    held: &mut BTreeMap<u32, Held>,
) -> Result<(), LeaseError> {
    if let Some(h) = held.get(&shard) {
        if h.renewed_at.elapsed() < config.lease_duration / 3 {
            return Ok(());
        }
    }
    let started = Instant::now();
    match lock.try_acquire_or_renew().await? {
        Attempt::Held(how) => {
            if !held.contains_key(&shard) {
                info!(shard, ?how, "acquired shard lease");
            }
            // Nobody else may conclude it expired before a whole duration after this write.
            held.insert(
                shard,
                Held {
                    valid_until: started + config.lease_duration,
                    renewed_at: started,
                },
            );
        }
        Attempt::HeldByOther => {
            if held.remove(&shard).is_some() {
                warn!(shard, "lost shard lease to another replica");
            }
        }
    }
    Ok(())
}

/// Releases the Lease of `shard` if we hold it (clears the holder so another replica can take it
/// at once).
async fn release(
    lock: &mut LeaseLock,
    shard: u32,
    held: &mut BTreeMap<u32, Held>,
) -> Result<(), LeaseError> {
    if held.remove(&shard).is_none() {
        return Ok(());
    }
    if lock.release().await? {
        info!(shard, "released shard lease");
    }
    Ok(())
}

#[cfg(test)]
mod tests;

//! One test suite for both state-store backends: the in-memory one and Redis, a single one (a
//! real redis-server on an ephemeral port, started by each test) and a Redis Cluster (three real
//! redis-servers in cluster mode, joined by `redis-cli --cluster create`, started by each test).
//! Failovers of a cluster: `state_store_cluster.rs`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use apollo_gateway::model::ObjectKey;
use apollo_gateway::state::{
    Connection, MemoryStore, Pending, PendingKind, RedisStore, ReportInput, ShownBefore,
    StaleCount, StateStore,
};
use apollo_protocol::shard::slot;
use apollo_test_support::{wait_until, RedisCluster, RedisServer};

fn hash(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

fn report<'a>(device: &'a str, now_ms: i64, observations: &[(&str, char)]) -> ReportInput<'a> {
    ReportInput {
        device,
        now_ms,
        agent_version: "1.2.3",
        observations: observations
            .iter()
            .map(|(name, h)| (ObjectKey::new("ns", *name), hash(*h)))
            .collect(),
        shown: ShownBefore::default(),
    }
}

fn all_slots() -> Vec<u16> {
    (0..apollo_protocol::shard::SLOT_COUNT).collect()
}

/// Sweeps every slot at `cutoff` (the decision time just after it) and returns the devices.
async fn sweep(store: &impl StateStore, slots: &[u16], cutoff: i64) -> Vec<String> {
    store
        .sweep(slots, cutoff, cutoff + 1)
        .await
        .expect("sweep")
        .into_iter()
        .map(|p| {
            assert_eq!(p.kind, PendingKind::Disconnected);
            p.device
        })
        .collect()
}

async fn first_report_connects_and_records_observations(store: impl StateStore) {
    let outcome = store
        .record_report(&report("tor1-01", 1_000, &[("a", 'a'), ("b", 'b')]))
        .await
        .expect("report");
    assert_eq!(outcome.prior, Connection::Unknown);
    let mut changed: Vec<(String, bool)> = outcome
        .changed
        .iter()
        .map(|c| (c.key.to_string(), c.prior_known))
        .collect();
    changed.sort();
    assert_eq!(
        changed,
        [("ns/a".to_owned(), false), ("ns/b".to_owned(), false)]
    );

    let again = store
        .record_report(&report("tor1-01", 2_000, &[("a", 'a'), ("b", 'c')]))
        .await
        .expect("report");
    assert_eq!(again.prior, Connection::Connected);
    assert_eq!(again.changed.len(), 1);
    assert_eq!(again.changed[0].key, ObjectKey::new("ns", "b"));
    assert_eq!(again.changed[0].hash, hash('c'));
    assert!(again.changed[0].prior_known);

    let heartbeat = store
        .record_report(&report("tor1-01", 3_000, &[]))
        .await
        .expect("heartbeat");
    assert_eq!(heartbeat.prior, Connection::Connected);
    assert!(heartbeat.changed.is_empty());

    let record = store.device("tor1-01").await.expect("device");
    assert_eq!(record.connection, Connection::Connected);
    assert_eq!(record.last_seen_ms, Some(3_000));
    assert_eq!(record.agent_version.as_deref(), Some("1.2.3"));
    assert_eq!(record.observed.len(), 2);
    assert_eq!(
        record.observed.get(&ObjectKey::new("ns", "b")),
        Some(&hash('c'))
    );

    let unknown = store.device("never-seen").await.expect("device");
    assert_eq!(unknown.connection, Connection::Unknown);
    assert!(unknown.observed.is_empty());
}

async fn sweep_flips_stale_devices_once_and_a_report_flips_back(store: impl StateStore) {
    store
        .record_report(&report("old", 1_000, &[]))
        .await
        .expect("report");
    store
        .record_report(&report("fresh", 5_000, &[]))
        .await
        .expect("report");
    assert!(sweep(&store, &all_slots(), 999).await.is_empty());
    assert_eq!(sweep(&store, &all_slots(), 1_000).await, ["old"]);
    assert!(
        sweep(&store, &all_slots(), 1_000).await.is_empty(),
        "a flip is returned once"
    );
    assert_eq!(
        store.device("old").await.expect("device").connection,
        Connection::Disconnected
    );
    assert_eq!(
        store.device("fresh").await.expect("device").connection,
        Connection::Connected
    );
    let back = store
        .record_report(&report("old", 9_000, &[]))
        .await
        .expect("report");
    assert_eq!(back.prior, Connection::Disconnected);
    assert_eq!(
        store.device("old").await.expect("device").connection,
        Connection::Connected
    );
}

async fn sweep_touches_only_the_given_slots(store: impl StateStore) {
    store
        .record_report(&report("tor1-01", 1_000, &[]))
        .await
        .expect("report");
    let own = slot("tor1-01");
    let others: Vec<u16> = all_slots().into_iter().filter(|s| *s != own).collect();
    assert!(sweep(&store, &others, 2_000).await.is_empty());
    assert_eq!(sweep(&store, &[own], 2_000).await, ["tor1-01"]);
}

async fn concurrent_reports_and_sweeps_decide_each_transition_once<S: StateStore>(store: Arc<S>) {
    // 20 "replicas" report the same new device at once: exactly one sees it connect.
    let reports = (0..20).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .record_report(&report("racer", 1_000 + i, &[("a", 'a')]))
                .await
                .expect("report")
        })
    });
    let outcomes = futures::future::join_all(reports).await;
    let connects = outcomes
        .iter()
        .filter(|o| o.as_ref().expect("join").prior != Connection::Connected)
        .count();
    let observed = outcomes
        .iter()
        .filter(|o| !o.as_ref().expect("join").changed.is_empty())
        .count();
    assert_eq!((connects, observed), (1, 1));

    for i in 0..50 {
        store
            .record_report(&report(&format!("dev-{i}"), 1_000, &[]))
            .await
            .expect("report");
    }
    // Three sweepers at once: every stale device is returned to exactly one of them.
    let sweeps = (0..3).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { sweep(store.as_ref(), &all_slots(), 10_000).await })
    });
    let mut seen = Vec::new();
    for flipped in futures::future::join_all(sweeps).await {
        seen.extend(flipped.expect("join"));
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), 51, "{seen:?}");
    assert_eq!(unique.len(), 51);
}

async fn adopt_tracks_only_unknown_devices(store: impl StateStore) {
    assert!(store.adopt_connected("lost", 1_000).await.expect("adopt"));
    assert_eq!(
        store.device("lost").await.expect("device").connection,
        Connection::Connected
    );
    assert!(
        !store.adopt_connected("lost", 2_000).await.expect("adopt"),
        "already known"
    );
    assert_eq!(sweep(&store, &all_slots(), 1_500).await, ["lost"]);
    assert!(
        !store.adopt_connected("lost", 3_000).await.expect("adopt"),
        "disconnected is known"
    );
    let back = store
        .record_report(&report("lost", 4_000, &[]))
        .await
        .expect("report");
    assert_eq!(back.prior, Connection::Disconnected);
}

async fn desired_etag_round_trips(store: impl StateStore) {
    assert_eq!(store.desired_etag("d").await.expect("read"), None);
    store
        .record_desired_etag("d", "\"abc\"")
        .await
        .expect("record");
    assert_eq!(
        store.desired_etag("d").await.expect("read").as_deref(),
        Some("\"abc\"")
    );
    // Recording an ETag does not make the device known.
    assert_eq!(
        store.device("d").await.expect("device").connection,
        Connection::Unknown
    );
    store.ping().await.expect("ping");
}

/// Every transition the store decides stays pending, with what it was, until cleared; each has
/// an id of its own; a heartbeat decides nothing.
async fn decided_transitions_stay_pending_until_cleared(store: impl StateStore) {
    let slots = vec![slot("p-1")];
    // What the statuses showed is kept with the transitions (a store that lost its state).
    let mut input = report("p-1", 1_000, &[("a", 'a')]);
    input.shown = ShownBefore {
        connected: true,
        observed: vec![ObjectKey::new("ns", "a")],
    };
    let first = store.record_report(&input).await.expect("report");
    assert_eq!(first.pending.len(), 2, "{first:?}");
    assert_eq!(
        first.pending[0].kind,
        PendingKind::Connected {
            prior: Connection::Unknown,
            shown: true,
        }
    );
    assert_eq!(
        first.pending[1].kind,
        PendingKind::Observed {
            key: ObjectKey::new("ns", "a"),
            hash: hash('a'),
            prior_known: false,
            shown: true,
        }
    );
    let heartbeat = store
        .record_report(&report("p-1", 1_500, &[("a", 'a')]))
        .await
        .expect("report");
    assert!(heartbeat.pending.is_empty(), "{heartbeat:?}");
    let flips = store.sweep(&slots, 2_000, 2_001).await.expect("sweep");
    assert_eq!(flips.len(), 1);
    let mut stored = store.pending(&slots).await.expect("pending");
    stored.sort_by(|a, b| (a.decided_ms, &a.id).cmp(&(b.decided_ms, &b.id)));
    let mut expected: Vec<Pending> = first.pending.clone();
    expected.extend(flips.clone());
    assert_eq!(stored, expected, "what was decided is what is kept");
    let ids: HashSet<&String> = stored.iter().map(|p| &p.id).collect();
    assert_eq!(ids.len(), 3, "each transition has an id of its own");
    // Reconnecting after the flip is a transition of its own, decided again.
    let back = store
        .record_report(&report("p-1", 3_000, &[]))
        .await
        .expect("report");
    assert_eq!(
        back.pending[0].kind,
        PendingKind::Connected {
            prior: Connection::Disconnected,
            shown: false,
        }
    );
    store.clear_pending(&first.pending).await.expect("clear");
    let left = store.pending(&slots).await.expect("pending");
    assert_eq!(left.len(), 2);
    assert!(left.contains(&flips[0]) && left.contains(&back.pending[0]));
    store.clear_pending(&left).await.expect("clear");
    assert!(store.pending(&slots).await.expect("pending").is_empty());
    // Other slots hold nothing of it.
    let others: Vec<u16> = all_slots().into_iter().filter(|s| *s != slots[0]).collect();
    assert!(store.pending(&others).await.expect("pending").is_empty());
}

async fn stale_count_counts_without_flipping(store: impl StateStore) {
    for (device, seen) in [("c-1", 1_000), ("c-2", 1_000), ("c-3", 5_000)] {
        store
            .record_report(&report(device, seen, &[]))
            .await
            .expect("report");
    }
    let count = store
        .stale_count(&all_slots(), 2_000, 4_000)
        .await
        .expect("count");
    assert_eq!(
        count,
        StaleCount {
            stale: 2,
            quiet: 2,
            connected: 3
        }
    );
    assert_eq!(
        store
            .stale_count(&all_slots(), 2_000, 6_000)
            .await
            .expect("count"),
        StaleCount {
            stale: 2,
            quiet: 3,
            connected: 3
        },
        "counting flips nothing"
    );
}

async fn a_forgotten_observation_is_decided_again(store: impl StateStore) {
    store
        .record_report(&report("f-1", 1_000, &[("a", 'a')]))
        .await
        .expect("report");
    store
        .forget_observed("f-1", &ObjectKey::new("ns", "a"))
        .await
        .expect("forget");
    assert!(store
        .device("f-1")
        .await
        .expect("device")
        .observed
        .is_empty());
    let again = store
        .record_report(&report("f-1", 2_000, &[("a", 'a')]))
        .await
        .expect("report");
    assert_eq!(
        again.changed.len(),
        1,
        "a new object of the name is observed afresh"
    );
    assert!(!again.changed[0].prior_known);
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(MemoryStore::default()).await;
                }
            )*
            #[tokio::test]
            async fn concurrent_reports_and_sweeps_decide_each_transition_once() {
                super::concurrent_reports_and_sweeps_decide_each_transition_once(Arc::new(MemoryStore::default())).await;
            }
        }
        mod redis {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let server = RedisServer::start().await;
                    super::$name(RedisStore::new(&server.url()).expect("store")).await;
                }
            )*
            #[tokio::test]
            async fn concurrent_reports_and_sweeps_decide_each_transition_once() {
                let server = RedisServer::start().await;
                let store = Arc::new(RedisStore::new(&server.url()).expect("store"));
                super::concurrent_reports_and_sweeps_decide_each_transition_once(store).await;
            }
        }
        mod cluster {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    let cluster = RedisCluster::start(3, 0).await;
                    let store = RedisStore::new(&cluster.url()).expect("store");
                    assert!(store.is_cluster());
                    super::$name(store).await;
                }
            )*
            #[tokio::test]
            async fn concurrent_reports_and_sweeps_decide_each_transition_once() {
                let cluster = RedisCluster::start(3, 0).await;
                let store = Arc::new(RedisStore::new(&cluster.url()).expect("store"));
                super::concurrent_reports_and_sweeps_decide_each_transition_once(store).await;
            }
        }
    };
}

suite!(
    first_report_connects_and_records_observations,
    sweep_flips_stale_devices_once_and_a_report_flips_back,
    sweep_touches_only_the_given_slots,
    adopt_tracks_only_unknown_devices,
    desired_etag_round_trips,
    decided_transitions_stay_pending_until_cleared,
    stale_count_counts_without_flipping,
    a_forgotten_observation_is_decided_again,
);

#[tokio::test]
async fn redis_keys_carry_the_slot_hash_tag() {
    let server = RedisServer::start().await;
    let store = RedisStore::new(&server.url()).expect("store");
    store
        .record_report(&report("tor1-01", 1_000, &[("a", 'a')]))
        .await
        .expect("report");
    let keys = server.command(&["KEYS", "*"]).expect("KEYS");
    let tag = format!("{{s{}}}", slot("tor1-01"));
    for expected in [
        format!("apollo:{tag}:device:tor1-01"),
        format!("apollo:{tag}:observed:tor1-01"),
        format!("apollo:{tag}:connected"),
        format!("apollo:{tag}:pending"),
        format!("apollo:{tag}:seq"),
    ] {
        assert!(keys.contains(&expected), "{expected} missing from {keys}");
    }
}

#[tokio::test]
async fn redis_store_survives_a_redis_restart_and_starts_before_redis() {
    let mut server = RedisServer::start().await;
    let store = RedisStore::new(&server.url()).expect("store");
    store
        .record_report(&report("d", 1_000, &[]))
        .await
        .expect("report");
    server.stop();
    assert!(store.ping().await.is_err(), "redis is down");
    server.restart().await;
    wait_until(
        Duration::from_secs(10),
        "store reconnects by itself",
        || async { store.ping().await.is_ok() },
    )
    .await;
    let after = store
        .record_report(&report("d", 2_000, &[]))
        .await
        .expect("report");
    assert_eq!(
        after.prior,
        Connection::Unknown,
        "a restarted redis lost the state"
    );

    // A store created while Redis is down works once Redis comes up.
    server.stop();
    let early = RedisStore::new(&server.url()).expect("store");
    assert!(early.ping().await.is_err());
    server.restart().await;
    wait_until(
        Duration::from_secs(10),
        "late redis becomes reachable",
        || async { early.ping().await.is_ok() },
    )
    .await;
}

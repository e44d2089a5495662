//! The Redis state store on a real Redis Cluster (redis-servers in cluster mode on ephemeral
//! ports, joined by `redis-cli --cluster create`, three masters with a replica each): one report
//! is one call on its slot's master, and failovers — planned (`CLUSTER FAILOVER`) and unplanned
//! (a master killed, its replica promoted) — lose no decided transition. The shared suite of
//! both backends runs on a cluster too (`state_store.rs`).

use std::collections::HashSet;
use std::time::Duration;

use apollo_gateway::metrics::Metrics;
use apollo_gateway::model::ObjectKey;
use apollo_gateway::state::{
    Connection, Pending, RedisStore, ReportInput, ShownBefore, StateStore, Store,
};
use apollo_protocol::shard::{slot, slot_tag, SLOT_COUNT};
use apollo_test_support::RedisCluster;

fn report(device: &str, now_ms: i64, observed: char) -> ReportInput<'_> {
    ReportInput {
        device,
        now_ms,
        agent_version: "1.2.3",
        observations: vec![(
            ObjectKey::new("ns", "p"),
            format!("sha256:{}", observed.to_string().repeat(64)),
        )],
        shown: ShownBefore::default(),
    }
}

fn all_slots() -> Vec<u16> {
    (0..SLOT_COUNT).collect()
}

/// Devices whose slots are served by every master of `cluster` (at least `per_master` each).
fn devices_on_every_master(cluster: &RedisCluster, per_master: usize) -> Vec<String> {
    let masters = cluster.masters();
    let mut out = Vec::new();
    let mut counts = vec![0usize; cluster.nodes().len()];
    for i in 0.. {
        let device = format!("tor-{i:04}");
        let key = format!("apollo:{}:connected", slot_tag(slot(&device)));
        let master = cluster.master_of(&key);
        if counts[master] < per_master {
            counts[master] += 1;
            out.push(device);
        }
        if masters.iter().all(|m| counts[*m] >= per_master) {
            return out;
        }
    }
    unreachable!()
}

fn ids(pending: &[Pending]) -> HashSet<String> {
    pending
        .iter()
        .map(|p| format!("{}/{}", p.unique_suffix(), p.encode()))
        .collect()
}

/// Reports `devices` at 1000 (each connects and observes: two transitions), then reports all but
/// the last three again at 5000 and sweeps at 2000: those three flip to disconnected. Returns every
/// transition decided.
async fn decide_transitions(store: &RedisStore, devices: &[String]) -> Vec<Pending> {
    let mut decided = Vec::new();
    for d in devices {
        let outcome = store
            .record_report(&report(d, 1_000, 'a'))
            .await
            .expect("report");
        assert_eq!(outcome.pending.len(), 2, "{outcome:?}");
        decided.extend(outcome.pending);
    }
    let (fresh, stale) = devices.split_at(devices.len() - 3);
    for d in fresh {
        let outcome = store
            .record_report(&report(d, 5_000, 'a'))
            .await
            .expect("report");
        assert!(outcome.pending.is_empty(), "a heartbeat decides nothing");
    }
    let flips = store
        .sweep(&all_slots(), 2_000, 2_001)
        .await
        .expect("sweep");
    let flipped: HashSet<&str> = flips.iter().map(|p| p.device.as_str()).collect();
    assert_eq!(flipped, stale.iter().map(String::as_str).collect());
    decided.extend(flips);
    decided
}

/// `call` until it succeeds: right after a failover a call can still meet a connection the old
/// master closed (the client reconnects and refreshes its slot map by itself), as an agent's
/// report would, and the agent retries too. Panics after 20 s.
async fn until_ok<T, E, F>(what: &str, mut call: impl FnMut() -> F) -> T
where
    E: std::fmt::Debug,
    F: std::future::Future<Output = Result<T, E>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match call().await {
            Ok(value) => return value,
            Err(error) => assert!(
                std::time::Instant::now() < deadline,
                "{what} still failing after 20 s: {error:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the store keeps across the failover: every transition still pending, the connection
/// states as decided, and no decision made twice.
async fn assert_nothing_lost(store: &RedisStore, devices: &[String], decided: &[Pending]) {
    let slots = all_slots();
    // The client finds the new masters by itself (MOVED, slot map refresh).
    let kept = until_ok("pending", || store.pending(&slots)).await;
    assert_eq!(
        ids(&kept),
        ids(decided),
        "every decided transition is still pending"
    );
    let (_, stale) = devices.split_at(devices.len() - 3);
    for d in devices {
        let record = until_ok("device", || store.device(d)).await;
        let expected = if stale.contains(d) {
            Connection::Disconnected
        } else {
            Connection::Connected
        };
        assert_eq!(record.connection, expected, "{d}");
    }
    let flips = until_ok("sweep", || store.sweep(&slots, 2_000, 2_002)).await;
    assert!(flips.is_empty(), "a flip is decided once, failover or not");
    let heartbeat = report(&devices[0], 6_000, 'a');
    let again = until_ok("report", || store.record_report(&heartbeat)).await;
    assert_eq!(again.prior, Connection::Connected);
    assert!(again.pending.is_empty(), "{again:?}");
    // The replay's work: deliver and clear.
    until_ok("clear", || store.clear_pending(&kept)).await;
    assert!(until_ok("pending", || store.pending(&slots))
        .await
        .is_empty());
}

#[tokio::test]
async fn a_report_is_one_call_on_its_slots_master() {
    let cluster = RedisCluster::start(3, 0).await;
    // The list form of the URL; the store finds the slot map itself.
    let store = RedisStore::new(&cluster.url_list()).expect("store");
    assert!(store.is_cluster());
    let devices = devices_on_every_master(&cluster, 4);
    // First calls load the script on each master (EVALSHA refused, then EVAL).
    for d in &devices {
        store
            .record_report(&report(d, 1_000, 'a'))
            .await
            .expect("report");
    }
    cluster.reset_stats();
    for d in &devices {
        store
            .record_report(&report(d, 2_000, 'b'))
            .await
            .expect("report");
    }
    let n = devices.len() as u64;
    assert_eq!(
        cluster.command_stat("evalsha", "calls"),
        n,
        "one EVALSHA per report"
    );
    assert_eq!(cluster.command_stat("eval", "calls"), 0);
    // (Commands a script runs are counted too, so its HSETs and ZADDs are not looked at.)
    for other in [
        "cluster|slots",
        "cluster|shards",
        "cluster|nodes",
        "script|load",
        "ping",
    ] {
        assert_eq!(cluster.command_stat(other, "calls"), 0, "{other}");
    }
    let redirected: u64 = cluster
        .nodes()
        .iter()
        .filter_map(|node| node.command(&["INFO", "errorstats"]))
        .map(|info| info.matches("errorstat_MOVED").count() + info.matches("errorstat_ASK").count())
        .sum::<usize>() as u64;
    assert_eq!(
        redirected, 0,
        "every call went straight to its slot's master"
    );
    // Each master ran the reports of its own slots.
    for m in cluster.masters() {
        let calls = cluster.nodes()[m]
            .command(&["INFO", "commandstats"])
            .expect("INFO");
        assert!(calls.contains("cmdstat_evalsha:calls=4,"), "{calls}");
    }
    // PING asks every master.
    store.ping().await.expect("ping");
}

#[tokio::test]
async fn a_planned_failover_of_every_master_loses_no_transition() {
    let cluster = RedisCluster::start(3, 1).await;
    let store = RedisStore::new(&cluster.url()).expect("store");
    let devices = devices_on_every_master(&cluster, 3);
    let decided = decide_transitions(&store, &devices).await;
    // CLUSTER FAILOVER on each replica: the replica catches up with its master's replication
    // offset before the roles switch, so nothing acknowledged is lost.
    for master in cluster.masters() {
        let replica = cluster.replica_of(master);
        cluster.planned_failover(replica).await;
    }
    assert_nothing_lost(&store, &devices, &decided).await;
}

#[tokio::test]
async fn an_unplanned_failover_loses_no_transition_the_replicas_acknowledged() {
    let mut cluster = RedisCluster::start(3, 1).await;
    // Every deciding script is followed by WAIT 1 in the same pipeline.
    // A generous timeout: WAIT returns as soon as the replica acknowledges, and on a loaded
    // machine (CI) an acknowledgement once took longer than 500 ms.
    let url = format!("{}?wait-replicas=1&wait-timeout=5s", cluster.url());
    let store = RedisStore::new(&url).expect("store");
    let devices = devices_on_every_master(&cluster, 3);
    cluster.reset_stats();
    let decided = decide_transitions(&store, &devices).await;
    let n = devices.len() as u64;
    let sweep_calls = u64::from(SLOT_COUNT);
    assert_eq!(
        cluster.command_stat("wait", "calls"),
        cluster.command_stat("evalsha", "calls") + cluster.command_stat("eval", "calls"),
        "one WAIT with every deciding script"
    );
    assert!(cluster.command_stat("wait", "calls") >= 2 * n - 3 + sweep_calls);
    assert_eq!(
        store.unreplicated_writes(),
        0,
        "the replica acknowledged every decision"
    );
    // Kill the master holding the last stale device's slot at once (SIGKILL: no goodbye), and
    // wait until the others promote its replica.
    let victim = devices.last().expect("devices");
    let master = cluster.master_of(&format!("apollo:{}:pending", slot_tag(slot(victim))));
    let replica = cluster.replica_of(master);
    cluster.kill_and_fail_over(master, replica).await;
    // Read from the promoted replica, once the client has found it.
    let slots = all_slots();
    let kept = until_ok("pending", || store.pending(&slots)).await;
    assert_eq!(
        ids(&kept),
        ids(&decided),
        "every decided transition survived"
    );
    // The dead master comes back (empty) as the new master's replica, so WAIT 1 can be met again.
    cluster.restart_as_replica(master).await;
    assert_nothing_lost(&store, &devices, &decided).await;
    assert_eq!(store.unreplicated_writes(), 0);
}

#[tokio::test]
async fn without_wait_replicas_a_dead_replica_costs_nothing_and_with_it_is_counted() {
    // A replica that is gone: WAIT times out and the decision is served anyway, counted.
    let mut cluster = RedisCluster::start(3, 1).await;
    let device = "tor-solo";
    let master = cluster.master_of(&format!("apollo:{}:pending", slot_tag(slot(device))));
    let replica = cluster.replica_of(master);
    cluster.kill(replica);
    let url = format!("{}?wait-replicas=1&wait-timeout=50ms", cluster.url());
    // Through the gateway's Store, as the report handler calls it: the short acknowledgement is
    // counted in the gateway's metric.
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let waiting = Store::redis(RedisStore::new(&url).expect("store"), metrics);
    let outcome = waiting
        .record_report(&report(device, 1_000, 'a'))
        .await
        .expect("the report is served");
    assert_eq!(outcome.prior, Connection::Unknown);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains("apollo_gateway_state_store_unreplicated_writes_total 1\n"),
        "{text}"
    );
    let plain = RedisStore::new(&cluster.url()).expect("store");
    plain
        .record_report(&report(device, 2_000, 'a'))
        .await
        .expect("report");
    assert_eq!(plain.unreplicated_writes(), 0);
}

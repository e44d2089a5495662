//! The whole stack on a real Redis Cluster (three masters with a replica each, redis-servers in
//! cluster mode started with the stack): the gateways keep their state, membership and pending
//! transitions there, the router reads the membership there. A master killed under a reporting
//! fleet is failed over without a false disconnect, and a stopped agent is still marked stale
//! exactly once afterwards.

use std::collections::HashMap;
use std::time::Duration;

use apollo_dev::fleet::{self, Agents};
use apollo_dev::{RedisChoice, Stack, StackConfig};
use apollo_protocol::shard::{slot, slot_tag};
use apollo_test_support::{binary, wait_until};

fn disconnects(events: &HashMap<(String, String), u64>) -> u64 {
    events
        .iter()
        .filter(|((reason, _), _)| reason == "AgentDisconnected")
        .map(|(_, n)| n)
        .sum()
}

#[tokio::test]
async fn a_fleet_on_a_redis_cluster_rides_out_the_failover_of_a_master() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = binary("apollo-gateway")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let mut cfg = StackConfig::test(dir.path().to_path_buf(), bin_dir);
    cfg.gateways = 2;
    cfg.heartbeat_interval_seconds = 2;
    cfg.stale_multiplier = 3;
    cfg.sweep_interval_seconds = 1;
    cfg.gateway_extra_args = vec!["--shard-lease=3s".into()];
    cfg.redis = RedisChoice::Cluster {
        masters: 3,
        replicas: 1,
    };
    let mut stack = Stack::start(cfg).await.expect("start the stack");
    assert!(stack.redis_url().starts_with("redis+cluster://"));
    let client = stack.client();
    let name = "rc";
    let n = 20;
    let devices = fleet::devices(name, n);
    fleet::install(&client, stack.namespace(), name, &devices)
        .await
        .expect("install fleet");
    let mut agents = Agents::new(&stack).expect("agents");
    for d in &devices {
        agents.start(&stack, d).expect("start agent");
    }
    wait_until(
        Duration::from_secs(60),
        "every DeviceProcess healthy",
        || async {
            fleet::processes(&client, stack.namespace(), name)
                .await
                .is_ok_and(|dps| dps.len() == n && dps.values().all(fleet::healthy))
        },
    )
    .await;
    let events_before = fleet::event_counts(&client, stack.namespace())
        .await
        .expect("events");

    // SIGKILL the master holding the first device's slot; its replica is promoted.
    let quiet = devices[0].clone();
    let cluster = stack.redis_cluster().expect("the stack's cluster");
    let master = cluster.master_of(&format!("apollo:{}:pending", slot_tag(slot(&quiet))));
    let replica = cluster.replica_of(master);
    cluster.kill_and_fail_over(master, replica).await;

    // Agents keep reporting (their devices' slots on every master, the promoted one included)...
    let ok_before = agents.metrics().snapshot().report.ok;
    wait_until(
        Duration::from_secs(30),
        "reports succeed after the failover",
        || async { agents.metrics().snapshot().report.ok >= ok_before + 3 * n as u64 },
    )
    .await;
    // ...and a whole stale window later nobody was marked disconnected.
    tokio::time::sleep(Duration::from_secs(
        3 * stack.config().heartbeat_interval_seconds + 2,
    ))
    .await;
    let dps = fleet::processes(&client, stack.namespace(), name)
        .await
        .expect("dps");
    assert!(dps.values().all(fleet::healthy), "a device went unhealthy");
    let events = fleet::event_counts(&client, stack.namespace())
        .await
        .expect("events");
    assert_eq!(disconnects(&events), disconnects(&events_before));

    // The sweep works on the promoted master: a stopped agent there goes stale, once.
    agents.stop(&quiet).await;
    // After the failover the sweeps wait until agents in back-off (30 s at most) had their
    // chance to report again: up to 30 s + a heartbeat before the stale window starts to count.
    wait_until(Duration::from_secs(90), "marked disconnected", || async {
        fleet::processes(&client, stack.namespace(), name)
            .await
            .is_ok_and(|dps| dps.get(&quiet).is_some_and(fleet::disconnected))
    })
    .await;
    let events = fleet::event_counts(&client, stack.namespace())
        .await
        .expect("events");
    assert_eq!(disconnects(&events), disconnects(&events_before) + 1);
    stack.shutdown().await;
}

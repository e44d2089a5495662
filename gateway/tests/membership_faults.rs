//! Correct under faults (issue 13, defects 3 and 4): who may join the gateway cluster and who
//! sweeps a shard. A replica that cannot serve (its watch cache has not synced) neither registers
//! nor takes its shard Lease; a replica that cannot renew its shard Lease stands aside, another
//! replica takes the shard over and sweeps it, and it claims the shard back once it can.
//! Against the real control plane and Redis, through the fault proxy for one replica.

mod common;

use std::time::Duration;

use apollo_crds::conditions::{AGENT_CONNECTED, FALSE, REASON_AGENT_DISCONNECTED, TRUE};
use apollo_protocol::membership::MEMBERS_KEY;
use apollo_protocol::shard::shard_for_device;
use apollo_test_support::{wait_until, Fault};
use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

/// Long enough for a Lease of 3 s to be seen expired, taken over, and a stale window to pass.
const TAKEOVER_DEADLINE: Duration = Duration::from_secs(45);

fn members(stack: &Stack) -> String {
    stack
        .redis
        .command(&["HGETALL", MEMBERS_KEY])
        .unwrap_or_default()
}

async fn lease_exists(stack: &Stack, shard: u32) -> bool {
    let leases: Api<Lease> = Api::namespaced(stack.client.clone(), stack.namespace());
    leases
        .get_opt(&format!("apollo-gateway-shard-{shard}"))
        .await
        .expect("read Lease")
        .is_some()
}

/// Defect 3: until its watch cache has synced, a replica does not register in the membership
/// (routers would send it devices it can only answer 503) nor take its shard Lease (it would hold
/// a shard it cannot sweep); once synced, it does both.
#[tokio::test]
async fn a_replica_whose_cache_has_not_synced_neither_joins_nor_takes_its_shard() {
    let stack = Stack::spawn_with(Options {
        faults: vec![Fault::status("list", "deviceprocesses", 500)],
        ..Options::default()
    })
    .await;
    wait_until(
        DEADLINE,
        "the admin endpoint answers (not ready)",
        || async { stack.readyz().await == 503 },
    )
    .await;
    // The process has tried to list DeviceProcesses three times (the watcher backs off between
    // attempts: seconds); a replica that joins does so within a second of starting.
    wait_until(Duration::from_secs(30), "three refused lists", || async {
        stack.proxy().hits() >= 3
    })
    .await;
    assert_eq!(stack.readyz().await, 503);
    assert!(
        !members(&stack).contains("heartbeatMs"),
        "registered before ready: {}",
        members(&stack)
    );
    assert!(
        !lease_exists(&stack, 0).await,
        "took its shard Lease before ready"
    );

    stack.proxy().clear_faults();
    stack.wait_ready().await;
    wait_until(DEADLINE, "registered and holding its shard", || async {
        members(&stack).contains("heartbeatMs")
            && lease_exists(&stack, 0).await
            && stack
                .metric("apollo_gateway_shard_held", &["shard=\"0\""])
                .await
                == 1.0
    })
    .await;
}

/// Defect 4: replica 1 stays alive in Redis but Kubernetes refuses every Lease call it makes. It
/// stands aside after a Lease duration; replica 0 takes shard 1 over and marks the device that
/// stopped reporting disconnected, exactly once; when replica 1's Lease calls succeed again it
/// claims its shard back. `apollo_gateway_shard_held` shows who holds what throughout.
#[tokio::test]
async fn a_replica_that_cannot_renew_its_shard_lease_stands_aside_and_another_sweeps_its_shard() {
    let stack = Stack::start_with(Options {
        proxy: true,
        shard_lease_seconds: "3",
        extra: vec!["--ordinal".into(), "1".into()],
        ..Options::default()
    })
    .await;
    let peer = stack.start_peer(0).await;
    wait_until(DEADLINE, "each replica holds its own shard", || async {
        holder(&stack, 0).await.as_deref() == Some("apollo-gateway-0")
            && holder(&stack, 1).await.as_deref() == Some("apollo-gateway-1")
    })
    .await;
    let device = (0..)
        .map(|i| format!("dev-aside-{i}"))
        .find(|d| shard_for_device(d, 2) == 1)
        .expect("a device of shard 1");
    let dp = stack.create("dp-aside", &device, "alpine:1").await;
    stack.wait_for_items(&device, 1).await;
    let reported = stack.report(&device, &[("dp-aside", &hash_of(&dp))]).await;
    assert_eq!(reported.status(), 200);
    stack
        .wait_status("dp-aside", "connected", |dp| {
            is_condition(dp, AGENT_CONNECTED, TRUE)
        })
        .await;

    // From now on the device is silent, and replica 1 cannot reach its Lease.
    stack.proxy().set_faults(vec![
        Fault::status("get", "leases", 500),
        Fault::status("update", "leases", 500),
    ]);
    wait_until(
        TAKEOVER_DEADLINE,
        "replica 0 takes shard 1 over",
        || async { holder(&stack, 1).await.as_deref() == Some("apollo-gateway-0") },
    )
    .await;
    wait_until(
        TAKEOVER_DEADLINE,
        "the silent device is marked disconnected",
        || async { is_condition(&stack.get("dp-aside").await, AGENT_CONNECTED, FALSE) },
    )
    .await;
    wait_until(DEADLINE, "its AgentDisconnected Event", || async {
        !stack
            .events("dp-aside", REASON_AGENT_DISCONNECTED)
            .await
            .is_empty()
    })
    .await;
    // Each replica says which shards it holds, and replica 1 that it stands aside.
    let shard = |s: &'static str| [s];
    assert_eq!(peer.metric(HELD, &shard("shard=\"1\"")).await, 1.0);
    assert_eq!(peer.metric(HELD, &shard("shard=\"0\"")).await, 1.0);
    assert_eq!(stack.metric(HELD, &shard("shard=\"1\"")).await, 0.0);
    assert_eq!(stack.metric(ASIDE, &[]).await, 1.0);

    stack.proxy().clear_faults();
    wait_until(
        TAKEOVER_DEADLINE,
        "replica 1 claims its shard back",
        || async {
            holder(&stack, 1).await.as_deref() == Some("apollo-gateway-1")
                && stack.metric(HELD, &shard("shard=\"1\"")).await == 1.0
                && peer.metric(HELD, &shard("shard=\"1\"")).await == 0.0
        },
    )
    .await;
    assert_eq!(stack.metric(ASIDE, &[]).await, 0.0);
    // Both replicas swept the silent device while holding shard 1: still one Event.
    stack.wait_sweeps(10.0).await;
    let events = stack.events("dp-aside", REASON_AGENT_DISCONNECTED).await;
    assert_eq!(events.len(), 1, "{events:#?}");
}

const HELD: &str = "apollo_gateway_shard_held";
const ASIDE: &str = "apollo_gateway_shard_standing_aside";

/// Holder of shard `shard`'s Lease, if any.
async fn holder(stack: &Stack, shard: u32) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(stack.client.clone(), stack.namespace());
    leases
        .get_opt(&format!("apollo-gateway-shard-{shard}"))
        .await
        .expect("read Lease")
        .and_then(|l| l.spec?.holder_identity)
}

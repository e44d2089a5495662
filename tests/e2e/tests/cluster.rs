//! The sharded gateway cluster end to end on the real control plane: redis-server, the
//! controller, gateway processes run as the StatefulSet's pods, the router, and in-process agents
//! (issue 7). Kubernetes writes are counted from the apiserver's audit log.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use apollo_dev::fleet::{self, Agents};
use apollo_dev::{Stack, StackConfig};
use apollo_protocol::shard::shard_for_device;
use apollo_test_support::{binary, wait_for, wait_until, Component};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

/// Shard leases expire quickly in tests so takeovers happen within seconds.
const LEASE_SECONDS: u64 = 3;

fn config(dir: &tempfile::TempDir, gateways: u32) -> StackConfig {
    let bin_dir = binary("apollo-gateway")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let mut cfg = StackConfig::test(dir.path().to_path_buf(), bin_dir);
    cfg.gateways = gateways;
    cfg.heartbeat_interval_seconds = 2;
    cfg.stale_multiplier = 3;
    cfg.sweep_interval_seconds = 1;
    cfg.gateway_extra_args = vec![format!("--shard-lease={LEASE_SECONDS}s")];
    cfg
}

async fn start(gateways: u32) -> (tempfile::TempDir, Stack) {
    let dir = tempfile::tempdir().expect("tempdir");
    let stack = Stack::start(config(&dir, gateways))
        .await
        .expect("start the stack");
    (dir, stack)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// Starts agents for a fleet and waits until every DeviceProcess is healthy.
async fn healthy_fleet(stack: &Stack, name: &str, n: usize) -> (Vec<String>, Agents) {
    let client = stack.client();
    let devices = fleet::devices(name, n);
    fleet::install(&client, stack.namespace(), name, &devices)
        .await
        .expect("install fleet");
    let mut agents = Agents::new(stack).expect("agents");
    for d in &devices {
        agents.start(stack, d).expect("start agent");
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
    (devices, agents)
}

async fn placement(stack: &Stack, devices: &[String]) -> BTreeMap<String, u32> {
    let http = http();
    let mut out = BTreeMap::new();
    for d in devices {
        let o = fleet::served_by(&http, stack, d).await.expect("served");
        out.insert(d.clone(), o);
    }
    out
}

/// (DeviceProcess writes, Event writes) by Apollo's components since the last reset, as the
/// apiserver's audit log records them.
/// Writes of DeviceProcesses and Events by the gateways (the controller's own Events about the
/// deployment, e.g. a late RolloutComplete, are not the gateways' doing).
async fn api_writes(stack: &Stack) -> (u64, u64) {
    let by_gateways = stack.system().requests_by(Component::Gateway).await;
    let writes = |resource: &str| {
        by_gateways
            .iter()
            .filter(|r| r.is_write() && r.resource == resource)
            .count() as u64
    };
    (writes("deviceprocesses"), writes("events"))
}

async fn kubectl_scale(stack: &Stack, replicas: u32) {
    let out = stack
        .kubectl([
            "-n",
            stack.system().name(),
            "scale",
            "statefulset",
            "apollo-gateway",
            &format!("--replicas={replicas}"),
        ])
        .await;
    assert!(
        out.status.success(),
        "kubectl scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the router sends every device to `shard(slot, n)`.
async fn wait_routing(stack: &Stack, devices: &[String], n: u32) {
    let http = http();
    wait_until(
        Duration::from_secs(20),
        "router follows the new membership",
        || async {
            for d in devices {
                if fleet::served_by(&http, stack, d).await != Some(shard_for_device(d, n)) {
                    return false;
                }
            }
            true
        },
    )
    .await;
}

/// `apollo_gateway_stale_sweeps_total` of every running gateway, by ordinal.
async fn sweeps(stack: &Stack) -> BTreeMap<u32, f64> {
    let http = http();
    let mut counts = BTreeMap::new();
    for ordinal in stack.gateways().ordinals() {
        if let Some(admin) = stack.gateways().admin_addr(ordinal) {
            let url = format!("http://{admin}/metrics");
            if let Ok(text) = apollo_test_support::metrics::fetch(&http, &url).await {
                if let Some(v) = apollo_test_support::metrics::value(
                    &text,
                    "apollo_gateway_stale_sweeps_total",
                    &[],
                ) {
                    counts.insert(ordinal, v);
                }
            }
        }
    }
    counts
}

/// Waits until every gateway running now has swept `n` more times (rather than sleeping for what
/// should be `n` sweep periods: under load a sleep can pass with fewer sweeps, or none).
async fn wait_sweeps(stack: &Stack, n: f64) {
    wait_sweeps_within(stack, n, Duration::from_secs(30)).await;
}

/// [`wait_sweeps`] with another deadline.
async fn wait_sweeps_within(stack: &Stack, n: f64, deadline: Duration) {
    let before = sweeps(stack).await;
    assert!(!before.is_empty(), "no gateway exports its sweep count");
    wait_until(deadline, "every gateway sweeps again", || async {
        let now = sweeps(stack).await;
        before
            .iter()
            .all(|(o, v)| now.get(o).is_some_and(|w| *w >= v + n))
    })
    .await;
}

/// Waits until every replica has swept for a whole stale window (plus one sweep) and asserts every
/// DeviceProcess of `fleet` is still healthy and no AgentDisconnected Event was written since
/// `events_before`. Sweeps, not a sleep: a sweep skipped (start-up grace, a store that could not
/// hear reports) judges nobody, so only sweeps that ran make the silence mean something.
async fn assert_quiet_for_a_stale_window(
    stack: &Stack,
    fleet_name: &str,
    events_before: &HashMap<(String, String), u64>,
) {
    let client = stack.client();
    let cfg = stack.config();
    let window = cfg.stale_multiplier as u64 * cfg.heartbeat_interval_seconds;
    let sweeps_per_window = window.div_ceil(cfg.sweep_interval_seconds) + 1;
    wait_sweeps_within(stack, sweeps_per_window as f64, Duration::from_secs(60)).await;
    let dps = fleet::processes(&client, stack.namespace(), fleet_name)
        .await
        .expect("dps");
    assert!(dps.values().all(fleet::healthy));
    let events = fleet::event_counts(&client, stack.namespace())
        .await
        .expect("events");
    let disconnects = |m: &HashMap<(String, String), u64>| {
        m.iter()
            .filter(|((r, _), _)| r == "AgentDisconnected")
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    assert_eq!(disconnects(&events), disconnects(events_before));
}

#[tokio::test]
async fn three_hundred_devices_spread_evenly_and_stick_to_their_replica() {
    let (_dir, stack) = start(3).await;
    let devices = fleet::devices("spread", 300);
    let first = placement(&stack, &devices).await;
    let mut per = [0u32; 3];
    for o in first.values() {
        per[*o as usize] += 1;
    }
    assert!(
        per.iter().all(|n| (75..=125).contains(n)),
        "per replica: {per:?}"
    );
    for (d, o) in &first {
        assert_eq!(*o, shard_for_device(d, 3), "{d}");
    }
    assert_eq!(
        placement(&stack, &devices).await,
        first,
        "placement changed while N held"
    );
    stack.shutdown().await;
}

#[tokio::test]
async fn scaling_moves_a_fair_share_and_costs_no_writes_for_reporting_devices() {
    let (_dir, stack) = start(3).await;
    let client = stack.client();
    let (devices, _agents) = healthy_fleet(&stack, "scale", 150).await;
    let before = placement(&stack, &devices).await;
    let events_before = fleet::event_counts(&client, stack.namespace())
        .await
        .expect("events");
    stack.system().reset_requests().await;

    kubectl_scale(&stack, 4).await;
    stack
        .wait_gateways_ready(4, Duration::from_secs(30))
        .await
        .expect("4 ready");
    wait_routing(&stack, &devices, 4).await;
    let after4 = placement(&stack, &devices).await;
    let moved: Vec<&String> = devices
        .iter()
        .filter(|d| before[*d] != after4[*d])
        .collect();
    let share = moved.len() as f64 / devices.len() as f64;
    assert!((0.15..=0.35).contains(&share), "moved {share:.2}");
    assert!(
        moved.iter().all(|d| after4[*d] == 3),
        "devices only move to the new replica"
    );

    kubectl_scale(&stack, 2).await;
    stack
        .wait_gateways_ready(2, Duration::from_secs(30))
        .await
        .expect("2 ready");
    wait_routing(&stack, &devices, 2).await;
    let after2 = placement(&stack, &devices).await;
    for d in &devices {
        if after4[d] < 2 {
            assert_eq!(after2[d], after4[d], "{d} moved though its replica stayed");
        }
    }
    // Two stale windows of sweeps by every replica, agents reporting through the changes: still
    // nothing written.
    let window = 3 * stack.config().heartbeat_interval_seconds;
    let sweeps = 2 * window.div_ceil(stack.config().sweep_interval_seconds);
    wait_sweeps_within(&stack, sweeps as f64, Duration::from_secs(60)).await;
    let dps = fleet::processes(&client, stack.namespace(), "scale")
        .await
        .expect("dps");
    assert!(
        dps.values().all(fleet::healthy),
        "a device lost its health during scaling"
    );
    assert_eq!(
        api_writes(&stack).await,
        (0, 0),
        "(DeviceProcess writes, Event writes)"
    );
    assert_eq!(
        fleet::event_counts(&client, stack.namespace())
            .await
            .expect("events"),
        events_before
    );
    stack.shutdown().await;
}

#[tokio::test]
async fn a_killed_replica_s_devices_fail_over_and_its_sweep_is_taken_over() {
    let (_dir, stack) = start(3).await;
    kill_replica_1_and_check_the_take_over(&stack, "kill").await;
    stack.shutdown().await;
}

/// The replica that takes over a dead replica's shard sweeps lastSeen values other replicas
/// wrote: with each replica on its own wall clock, one running 30 s ahead would find every device
/// another replica recorded older than the stale window and mark them all disconnected. Replica
/// 0 runs 30 s ahead here, and it is the one that takes over shard 1.
#[tokio::test]
async fn a_replica_whose_clock_runs_ahead_takes_over_a_shard_without_false_disconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(&dir, 3);
    cfg.gateway_ordinal_env
        .insert(0, apollo_test_support::skewed_clock_env("+30s"));
    let stack = Stack::start(cfg).await.expect("start the stack");
    kill_replica_1_and_check_the_take_over(&stack, "skew").await;
    let lease: Api<Lease> = Api::namespaced(stack.client(), stack.system().name());
    let holder = lease
        .get("apollo-gateway-shard-1")
        .await
        .expect("shard lease")
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(
        holder.as_deref(),
        Some("apollo-gateway-0"),
        "the skewed replica is the one that swept shard 1"
    );
    // And it knows how far off it is.
    let admin = stack.gateways().admin_addr(0).expect("gateway 0 runs");
    let offset = apollo_test_support::metrics::scrape(
        &http(),
        &format!("http://{admin}/metrics"),
        "apollo_gateway_clock_offset_seconds",
        &[],
    )
    .await;
    assert!((-31.0..=-29.0).contains(&offset), "clock offset {offset} s");
    stack.shutdown().await;
}

/// Kills replica 1 of 3 while agents report: its devices are served by fallbacks within 3 s; an
/// agent of its shard that stops meanwhile is marked stale exactly once by whoever takes the
/// shard over, and no other device gets a Warning.
async fn kill_replica_1_and_check_the_take_over(stack: &Stack, fleet_name: &str) {
    let client = stack.client();
    let (devices, mut agents) = healthy_fleet(stack, fleet_name, 60).await;
    let victims: Vec<&String> = devices
        .iter()
        .filter(|d| shard_for_device(d, 3) == 1)
        .collect();
    let quiet = victims[0].clone();
    let events_before = fleet::event_counts(&client, stack.namespace())
        .await
        .expect("events");

    stack.gateways().kill(1);
    let killed_at = Instant::now();
    let http = http();
    for d in &victims {
        let o = wait_for(Duration::from_secs(3), "served by a fallback", || async {
            fleet::served_by(&http, stack, d).await
        })
        .await;
        assert_ne!(o, 1);
    }
    assert!(killed_at.elapsed() < Duration::from_secs(3) + Duration::from_millis(500));

    // An agent of the dead replica's shard stops during the outage: someone else must notice.
    agents.stop(&quiet).await;
    let dp_name = format!("{fleet_name}-{quiet}");
    wait_until(
        Duration::from_secs(30),
        "the quiet device is marked disconnected",
        || async {
            fleet::processes(&client, stack.namespace(), fleet_name)
                .await
                .is_ok_and(|dps| dps.get(&quiet).is_some_and(fleet::disconnected))
        },
    )
    .await;
    // Two more sweeps of every replica: still exactly one Warning for it, none for anyone else.
    wait_sweeps(stack, 2.0).await;
    let events = fleet::event_counts(&client, stack.namespace())
        .await
        .expect("events");
    let warnings = |name: &str| {
        events
            .get(&("AgentDisconnected".to_owned(), name.to_owned()))
            .copied()
            .unwrap_or(0)
            - events_before
                .get(&("AgentDisconnected".to_owned(), name.to_owned()))
                .copied()
                .unwrap_or(0)
    };
    assert_eq!(warnings(&dp_name), 1);
    let dps = fleet::processes(&client, stack.namespace(), fleet_name)
        .await
        .expect("dps");
    for (d, dp) in &dps {
        if *d != quiet {
            assert!(fleet::healthy(dp), "{d} is not healthy");
            assert_eq!(
                warnings(&format!("{fleet_name}-{d}")),
                0,
                "{d} got a Warning"
            );
        }
    }
}

#[tokio::test]
async fn a_stopped_agent_is_marked_stale_exactly_once_while_three_replicas_sweep() {
    let (_dir, stack) = start(3).await;
    let client = stack.client();
    let (devices, mut agents) = healthy_fleet(&stack, "stale", 30).await;
    let quiet = devices[7].clone();
    let events_before = fleet::event_counts(&client, stack.namespace())
        .await
        .expect("events");
    stack.system().reset_requests().await;
    agents.stop(&quiet).await;
    wait_until(Duration::from_secs(30), "marked disconnected", || async {
        fleet::processes(&client, stack.namespace(), "stale")
            .await
            .is_ok_and(|dps| dps.get(&quiet).is_some_and(fleet::disconnected))
    })
    .await;
    // Three more sweeps of every replica: still exactly one Warning.
    wait_sweeps(&stack, 3.0).await;
    let events = fleet::event_counts(&client, stack.namespace())
        .await
        .expect("events");
    let key = ("AgentDisconnected".to_owned(), format!("stale-{quiet}"));
    assert_eq!(
        events.get(&key).copied().unwrap_or(0) - events_before.get(&key).copied().unwrap_or(0),
        1
    );
    assert_eq!(
        api_writes(&stack).await,
        (1, 1),
        "one status patch and one Event"
    );
    stack.shutdown().await;
}

#[tokio::test]
async fn a_redis_restart_loses_state_but_marks_no_device_disconnected() {
    let (_dir, mut stack) = start(3).await;
    let client = stack.client();
    let (_devices, agents) = healthy_fleet(&stack, "redis", 30).await;
    let events_before = fleet::event_counts(&client, stack.namespace())
        .await
        .expect("events");
    stack.redis().restart().await;
    let ok_before = agents.metrics().snapshot().report.ok;
    // Agents keep reporting successfully through the new, empty Redis.
    wait_until(Duration::from_secs(30), "reports succeed again", || async {
        agents.metrics().snapshot().report.ok >= ok_before + 60
    })
    .await;
    // A full stale window later nobody was marked disconnected.
    assert_quiet_for_a_stale_window(&stack, "redis", &events_before).await;
    stack.shutdown().await;
}

#[tokio::test]
async fn agents_recover_by_themselves_after_a_router_restart() {
    let (_dir, mut stack) = start(2).await;
    let client = stack.client();
    let (_devices, agents) = healthy_fleet(&stack, "router", 20).await;
    stack.restart_router().await.expect("restart router");
    let ok_before = agents.metrics().snapshot().report.ok;
    wait_until(Duration::from_secs(30), "reports flow again", || async {
        agents.metrics().snapshot().report.ok >= ok_before + 40
    })
    .await;
    let dps = fleet::processes(&client, stack.namespace(), "router")
        .await
        .expect("dps");
    assert!(dps.values().all(fleet::healthy));
    stack.shutdown().await;
}

#[tokio::test]
async fn an_outage_of_every_replica_marks_nobody_disconnected_once_they_return() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(&dir, 2);
    // Long enough for agents backing off through the outage to report again: their waits have
    // ceilings of 0.5 s, 1 s, 2 s, ... 30 s with full jitter, and the outage plus the replicas'
    // start-up takes them to the 16 s step or further (with 20 s, one agent came back after the
    // grace in CI and was marked disconnected). Their longest wait plus a heartbeat.
    cfg.gateway_extra_args.push("--sweep-grace=35s".into());
    let stack = Stack::start(cfg).await.expect("start the stack");
    let client = stack.client();
    let (_devices, _agents) = healthy_fleet(&stack, "outage", 20).await;
    let events_before = fleet::event_counts(&client, stack.namespace())
        .await
        .expect("events");

    // Every replica dies and stays down past the stale window (6 s).
    stack.gateways().kill(0);
    stack.gateways().kill(1);
    tokio::time::sleep(Duration::from_secs(
        3 * stack.config().heartbeat_interval_seconds + 2,
    ))
    .await;
    stack.gateways().revive(0);
    stack.gateways().revive(1);
    stack
        .wait_gateways_ready(2, Duration::from_secs(30))
        .await
        .expect("replicas back");

    // The agents come back by themselves; a stale window after that nobody was marked stale.
    wait_until(
        Duration::from_secs(40),
        "every device reports again",
        || async {
            fleet::processes(&client, stack.namespace(), "outage")
                .await
                .is_ok_and(|dps| dps.values().all(fleet::healthy))
        },
    )
    .await;
    assert_quiet_for_a_stale_window(&stack, "outage", &events_before).await;
    stack.shutdown().await;
}

//! Operational behaviour beyond issue 5's list: readiness, shutdown, load shedding, the resync,
//! Redis restarts and the in-memory backend.

mod common;

use std::time::{Duration, Instant};

use apollo_crds::conditions::{
    Condition, AGENT_CONNECTED, FALSE, REASON_AGENT_CONNECTED, REASON_AGENT_DISCONNECTED,
    REASON_SPEC_OBSERVED, SPEC_OBSERVED, TRUE,
};
use apollo_test_support::{wait_until, Component, Fault, FaultProxy, TestNamespace};
use common::*;
use kube::api::{Patch, PatchParams};
use nix::sys::signal::Signal;
use serde_json::json;

const RESYNCS: &str = "apollo_gateway_resyncs_total";

/// Creates DeviceProcess `name` (`alpine:1`) for `device`, which the gateway then serves;
/// reports `device` observing it and waits until the status is connected and observed and the
/// connect Events are published.
async fn create_connected(stack: &Stack, name: &str, device: &str) {
    stack.create(name, device, "alpine:1").await;
    stack.wait_for_items(device, 1).await;
    stack.connect_and_converge(device, &[name]).await;
    // The Events follow the status patch; tests that count writes start after them.
    wait_until(DEADLINE, "connect Events published", || async {
        !stack.events(name, REASON_AGENT_CONNECTED).await.is_empty()
            && !stack.events(name, REASON_SPEC_OBSERVED).await.is_empty()
    })
    .await;
}

#[tokio::test]
async fn readyz_follows_redis_and_the_kubernetes_watch() {
    let mut stack = Stack::start().await;
    let health = stack
        .http
        .get(format!("{}/healthz", stack.admin_url))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    stack.redis.stop();
    wait_until(DEADLINE, "not ready without Redis", || async {
        stack.readyz().await == 503
    })
    .await;
    let body: serde_json::Value = stack
        .http
        .get(format!("{}/readyz", stack.admin_url))
        .send()
        .await
        .expect("readyz")
        .json()
        .await
        .expect("json");
    assert_eq!(body["stateStore"], false);
    assert_eq!(body["cacheSynced"], true);
    assert!(stack.gateway.is_running());
    stack.redis.restart().await;
    wait_until(DEADLINE, "ready again once Redis is back", || async {
        stack.readyz().await == 200
    })
    .await;
}

#[tokio::test]
async fn kubernetes_unreachable_at_start_keeps_retrying_and_readyz_stays_false() {
    // Every list of DeviceProcesses fails until the faults are cleared (500, not 503: kube's
    // client retries 503s by itself, so the watch would not see them).
    let mut stack = Stack::spawn_with(Options {
        faults: vec![Fault::status("list", "deviceprocesses", 500)],
        ..Options::default()
    })
    .await;
    wait_until(DEADLINE, "admin endpoint up", || async {
        stack.readyz().await != 0
    })
    .await;
    // Each failed list is logged once by the watch, which then retries it with backoff.
    wait_until(DEADLINE, "the watch retried its list", || async {
        stack
            .gateway
            .logs()
            .matches("DeviceProcess watch failed")
            .count()
            >= 2
    })
    .await;
    assert_eq!(stack.readyz().await, 503);
    assert!(stack.gateway.is_running());
    assert_eq!(
        stack.ns.count("list", "deviceprocesses", None).await,
        0,
        "no list reached the apiserver: {:?}",
        stack.ns.requests().await
    );
    let early = stack.desired("early", None, None).await;
    assert_eq!(early.status(), 503, "no document before the cache synced");
    assert_eq!(header(&early, "retry-after"), "1");
    stack.proxy().clear_faults();
    wait_until(
        Duration::from_secs(30),
        "ready once Kubernetes answers",
        || async { stack.readyz().await == 200 },
    )
    .await;
}

#[tokio::test]
async fn shutdown_ends_long_polls_early_with_304_and_exits_cleanly() {
    let mut stack = Stack::start().await;
    let etag = stack.etag_of("sleepy").await;
    let poll = stack.spawn_long_poll("sleepy", &etag, 60);
    wait_until(DEADLINE, "the long poll is held", || async {
        stack.metric("apollo_gateway_long_poll_waiters", &[]).await >= 1.0
    })
    .await;
    let signalled = Instant::now();
    stack.gateway.signal(Signal::SIGTERM);
    let (_, response) = poll.await.expect("join");
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "{:?}",
        signalled.elapsed()
    );
    assert_eq!(response.status(), 304);
    assert_eq!(header(&response, "etag"), etag);
    let status = stack
        .gateway
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn long_polls_above_their_budget_are_shed_with_503_and_retry_after() {
    let stack = Stack::start_with(Options {
        extra: vec!["--max-long-polls".into(), "2".into()],
        ..Options::default()
    })
    .await;
    let etag = stack.etag_of("busy").await;
    let mut polls = Vec::new();
    for _ in 0..2 {
        polls.push(stack.spawn_long_poll("busy", &etag, 5));
    }
    wait_until(DEADLINE, "two long polls held", || async {
        stack.metric("apollo_gateway_long_poll_waiters", &[]).await >= 2.0
    })
    .await;
    // A third long poll (another device) is over the budget.
    let other = stack.etag_of("other").await;
    let shed = stack.desired("other", Some(&other), Some(5)).await;
    assert_eq!(shed.status(), 503);
    assert_eq!(header(&shed, "retry-after"), "1");
    assert_eq!(header(&shed, "x-apollo-gateway"), "0");
    let body: serde_json::Value = shed.json().await.expect("json");
    assert_eq!(body["error"]["code"], "overloaded");
    // Requests answered at once have a budget of their own.
    assert_eq!(stack.desired("other", None, None).await.status(), 200);
    for poll in polls {
        let (_, response) = poll.await.expect("join");
        assert_eq!(response.status(), 304);
    }
}

#[tokio::test]
async fn resync_repairs_a_wrong_status_and_writes_nothing_when_it_is_right() {
    let stack = Stack::start_with(Options {
        heartbeat_seconds: 30,
        resync_seconds: "0.3",
        ..Options::default()
    })
    .await;
    create_connected(&stack, "drifty", "drift").await;
    stack.ns.reset_requests().await;
    stack
        .wait_metric_growth(RESYNCS, 3.0, DEADLINE, "three resync passes")
        .await;
    assert_eq!(
        stack.ns.writes(None).await,
        0,
        "resync wrote a correct status"
    );

    // Someone else overwrites the status: the resync puts it back, without an Event.
    let wrong = Condition::new(
        AGENT_CONNECTED,
        FALSE,
        REASON_AGENT_DISCONNECTED,
        "edited by hand",
        "2026-01-01T00:00:00Z",
    );
    stack
        .processes()
        .patch_status(
            "drifty",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [wrong]}})),
        )
        .await
        .expect("overwrite status");
    stack
        .wait_status("drifty", "repaired by the resync", |dp| {
            is_condition(dp, AGENT_CONNECTED, TRUE) && is_condition(dp, SPEC_OBSERVED, TRUE)
        })
        .await;
    assert_eq!(
        stack.events("drifty", REASON_AGENT_CONNECTED).await.len(),
        1
    );
}

#[tokio::test]
async fn a_redis_restart_alone_disconnects_nobody_and_emits_nothing() {
    let mut stack = Stack::start_with(Options {
        heartbeat_seconds: 1,
        stale_multiplier: 3,
        resync_seconds: "0.3",
        ..Options::default()
    })
    .await;
    create_connected(&stack, "steady", "steady-dev").await;
    wait_until(DEADLINE, "connect Event", || async {
        stack.events("steady", REASON_AGENT_CONNECTED).await.len() == 1
    })
    .await;
    let agent = {
        let http = stack.http.clone();
        let url = format!("{}/v1/devices/steady-dev/report", stack.device_url);
        let token = stack.token("steady-dev");
        tokio::spawn(async move {
            loop {
                let _ = http
                    .post(&url)
                    .header("x-device-token", &token)
                    .json(&json!({"agentVersion": "t", "timestamp": jiff::Timestamp::now().to_string()}))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    stack.ns.reset_requests().await;
    stack.redis.restart().await;
    wait_until(
        DEADLINE,
        "the agent's reports are recorded again",
        || async { stack.recorded("steady-dev") },
    )
    .await;
    // Well past the 3 s stale window, with sweeps and resyncs running.
    let restart_window = Duration::from_secs(15);
    stack
        .wait_metric_growth(RESYNCS, 12.0, restart_window, "resyncs after the restart")
        .await;
    agent.abort();
    assert!(is_condition(
        &stack.get("steady").await,
        AGENT_CONNECTED,
        TRUE
    ));
    assert!(stack
        .events("steady", REASON_AGENT_DISCONNECTED)
        .await
        .is_empty());
    assert_eq!(
        stack.events("steady", REASON_AGENT_CONNECTED).await.len(),
        1
    );
    assert_eq!(
        stack.ns.writes(None).await,
        0,
        "{:?}",
        stack.ns.requests().await
    );
}

#[tokio::test]
async fn a_device_forgotten_by_a_restarted_redis_is_still_marked_stale_once() {
    let mut stack = Stack::start_with(Options {
        resync_seconds: "0.3",
        ..Options::default()
    })
    .await;
    create_connected(&stack, "ghost", "ghost-dev").await;
    // The agent goes silent at the same moment Redis loses everything.
    stack.redis.restart().await;
    marked_stale_once(&stack, "ghost", "marked stale after re-tracking").await;
}

/// Waits until `name` shows AgentConnected=False and has one AgentDisconnected Event, then until
/// the sweeps have had several more chances to repeat it, and checks there is still one.
async fn marked_stale_once(stack: &Stack, name: &str, what: &str) {
    stack
        .wait_status(name, what, |dp| is_condition(dp, AGENT_CONNECTED, FALSE))
        .await;
    wait_until(DEADLINE, "one Warning", || async {
        stack.events(name, REASON_AGENT_DISCONNECTED).await.len() == 1
    })
    .await;
    stack.wait_sweeps(10.0).await;
    assert_eq!(stack.events(name, REASON_AGENT_DISCONNECTED).await.len(), 1);
}

/// Issue 13's fault suite under load (docs/faults.md, pause-redis): after redis-server came back
/// empty, agents that had stopped meanwhile were marked only by the next periodic resync (234 s
/// there). The store's recovery now starts a resync at once: with an hourly resync the forgotten,
/// silent device is still marked stale (once) within seconds.
#[tokio::test]
async fn a_store_that_comes_back_empty_is_resynced_at_once() {
    let mut stack = Stack::start_with(Options {
        resync_seconds: "3600",
        ..Options::default()
    })
    .await;
    create_connected(&stack, "lost", "lost-dev").await;
    let resyncs = stack.metric(RESYNCS, &[]).await;
    stack.redis.restart().await;
    marked_stale_once(&stack, "lost", "marked stale after the store's recovery").await;
    assert!(stack.metric(RESYNCS, &[]).await > resyncs);
}

/// The other side of the resync at recovery: calls also fail when the store is only slow or
/// paused (timeouts, as under overload), its state intact. Reading every owned device then would
/// add load where there is too much already: only lost connections (a restarted server) start
/// the resync.
#[tokio::test]
async fn a_store_that_failed_but_kept_its_state_is_not_resynced() {
    let stack = Stack::start_with(Options {
        resync_seconds: "3600",
        ..Options::default()
    })
    .await;
    create_connected(&stack, "kept", "kept-dev").await;
    let resyncs = stack.metric(RESYNCS, &[]).await;
    let errors = || async {
        stack
            .metric("apollo_gateway_state_store_errors_total", &["op=\"ping\""])
            .await
    };
    let failed_before = errors().await;
    stack.redis.pause();
    // Paused past the calls' 2 s timeout: the prober's pings fail.
    wait_until(DEADLINE, "a failed ping", || async {
        errors().await > failed_before
    })
    .await;
    stack.redis.resume();
    // The recovery's check has run once the sweeper is back at work.
    stack.wait_sweeps(20.0).await;
    assert_eq!(stack.metric(RESYNCS, &[]).await, resyncs);
    assert!(stack.recorded("kept-dev"));
}

#[tokio::test]
async fn the_in_memory_backend_serves_one_replica_and_refuses_several() {
    let stack = Stack::start_with(Options {
        use_redis: false,
        ..Options::default()
    })
    .await;
    create_connected(&stack, "solo", "solo-dev").await;
    assert!(!stack.recorded("solo-dev"), "nothing went to Redis");

    let mut refused = apollo_test_support::Proc::builder(gateway_binary())
        .args(["--insecure-no-auth", "--replicas", "3", "--ordinal", "1"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("APOLLO_REDIS_URL")
        .spawn();
    let status = refused
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits");
    assert!(!status.success());
    assert!(refused.logs().contains("--redis-url"), "{}", refused.logs());
}

#[tokio::test]
async fn a_spec_change_observed_within_the_debounce_window_costs_one_status_patch() {
    let stack = Stack::start_with(Options {
        heartbeat_seconds: 30,
        debounce_seconds: "1",
        ..Options::default()
    })
    .await;
    create_connected(&stack, "wave", "wave-dev").await;
    stack.ns.reset_requests().await;

    let etag = stack.etag_of("wave-dev").await;
    let changed = stack.change_spec("wave", "alpine:2").await;
    // The agent learns the new spec through its long poll and reports it at once.
    let response = stack.desired("wave-dev", Some(&etag), Some(10)).await;
    assert_eq!(response.status(), 200);
    let new_hash = hash_of(&changed);
    assert_eq!(
        stack
            .report("wave-dev", &[("wave", &new_hash)])
            .await
            .status(),
        200
    );
    stack
        .wait_status("wave", "the new spec observed", |dp| {
            dp.status
                .as_ref()
                .and_then(|s| s.observed_spec_hash.as_deref())
                == Some(new_hash.as_str())
                && is_condition(dp, SPEC_OBSERVED, TRUE)
        })
        .await;
    // Past the debounce window: the spec-change write found nothing left to do.
    stack.wait_sweeps(15.0).await;
    assert_eq!(
        stack.status_patches().await,
        1,
        "{:?}",
        stack.ns.requests().await
    );
}

#[tokio::test]
async fn a_gateway_whose_cache_is_not_warm_answers_304_from_the_etag_in_redis() {
    let stack = Stack::start().await;
    create_connected(&stack, "warm", "warm-dev").await;
    let etag = stack.etag_of("warm-dev").await;
    let tag = apollo_protocol::shard::slot_tag(apollo_protocol::shard::slot("warm-dev"));
    let key = format!("apollo:{tag}:device:warm-dev");
    wait_until(DEADLINE, "the served ETag is recorded", || async {
        stack
            .redis
            .command(&["HGET", &key, "etag"])
            .is_some_and(|reply| reply.contains(&etag))
    })
    .await;

    // A second replica whose DeviceProcess list keeps failing.
    let control_plane = apollo_test_support::ControlPlane::shared().await;
    let proxy = FaultProxy::start(control_plane).await;
    proxy.set_faults(vec![Fault::status("list", "deviceprocesses", 500)]);
    let kubeconfig = stack.ns.kubeconfig_via(Component::Gateway, &proxy).await;
    let device = apollo_test_support::free_addr();
    let admin = apollo_test_support::free_addr();
    let secret = tempfile::NamedTempFile::new().expect("secret");
    std::fs::write(secret.path(), SECRET).expect("write secret");
    let _second = apollo_test_support::Proc::builder(gateway_binary())
        .args([
            "--listen",
            &device.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .args([
            "--redis-url",
            &stack.redis.url(),
            "--ordinal",
            "1",
            "--replicas",
            "2",
        ])
        .args(["--namespace", stack.namespace()])
        .args(["--lease-namespace", stack.namespace()])
        .arg("--auth-secret-file")
        .arg(secret.path())
        .env("KUBECONFIG", &kubeconfig)
        .spawn();
    let url = format!("http://{device}/v1/devices/warm-dev/desired");
    let token = stack.token("warm-dev");
    let response = apollo_test_support::wait_for(DEADLINE, "second replica answers", || async {
        stack
            .http
            .get(&url)
            .header("x-device-token", &token)
            .header("if-none-match", &etag)
            .send()
            .await
            .ok()
    })
    .await;
    assert_eq!(response.status(), 304);
    assert_eq!(header(&response, "etag"), etag);
    assert_eq!(header(&response, "x-apollo-gateway"), "1");
    let other = stack
        .http
        .get(&url)
        .header("x-device-token", &token)
        .header("if-none-match", "\"something-else\"")
        .send()
        .await
        .expect("get");
    assert_eq!(other.status(), 503);
}

#[tokio::test]
async fn the_device_api_speaks_http2_with_prior_knowledge() {
    let stack = Stack::start().await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("h2 client");
    let response = h2
        .get(stack.desired_url("h2-dev"))
        .header("x-device-token", stack.token("h2-dev"))
        .send()
        .await
        .expect("h2 request");
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn namespace_scope_limits_what_the_gateway_serves() {
    let control_plane = apollo_test_support::ControlPlane::shared().await;
    let elsewhere = TestNamespace::create(control_plane, "elsewhere").await;
    let stack = Stack::start_with(Options {
        watch_namespace: Some(elsewhere.name().to_owned()),
        ..Options::default()
    })
    .await;
    stack.create("outside", "scoped-dev", "alpine:1").await;
    // Another device's change in the watched scope would be visible; this one never is.
    stack.wait_sweeps(5.0).await;
    let body: serde_json::Value = stack
        .desired("scoped-dev", None, None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(body["items"], json!([]));
    let requests = stack.ns.requests().await;
    let lists: Vec<_> = requests
        .iter()
        .filter(|r| r.verb == "list" && r.resource == "deviceprocesses")
        .collect();
    assert_eq!(lists.len(), 1, "{requests:#?}");
    assert_eq!(lists[0].namespace, elsewhere.name(), "{requests:#?}");
    assert!(
        requests
            .iter()
            .filter(|r| r.resource == "deviceprocesses")
            .all(|r| r.namespace == elsewhere.name()),
        "{requests:#?}"
    );
}

#[tokio::test]
async fn kubectl_shows_the_projected_status_and_the_events() {
    let stack = Stack::start_with(Options {
        heartbeat_seconds: 30,
        ..Options::default()
    })
    .await;
    create_connected(&stack, "visible", "tor9-01").await;
    let get = stack.ns.kubectl(["get", "deviceprocesses"]).await;
    let table = String::from_utf8_lossy(&get.stdout);
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("visible"))
        .unwrap_or_else(|| panic!("no row in:\n{table}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &columns[1..5],
        ["tor9-01", "Pending", "True", "True"],
        "{table}"
    );

    let describe = stack
        .ns
        .kubectl(["describe", "deviceprocess", "visible"])
        .await;
    let text = String::from_utf8_lossy(&describe.stdout);
    assert!(
        describe.status.success(),
        "{}",
        String::from_utf8_lossy(&describe.stderr)
    );
    for needle in [
        "AgentConnected",
        "SpecObserved",
        "the agent of device tor9-01 connected",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[tokio::test]
async fn a_status_patch_on_a_stale_resource_version_gets_a_real_conflict_and_is_retried() {
    let stack = Stack::start_with(Options {
        heartbeat_seconds: 30,
        proxy: true,
        ..Options::default()
    })
    .await;
    let dp = stack.create("contended", "contended-dev", "alpine:1").await;
    stack.wait_for_items("contended-dev", 1).await;
    stack
        .wait_status("contended", "initial status", |dp| dp.status.is_some())
        .await;
    // Blind the gateway's cache: end its watch and hold the next watch (and any relist) longer
    // than this test waits, so it keeps the resourceVersion it has.
    let held = Duration::from_secs(30);
    stack.proxy().set_faults(vec![
        Fault {
            delay: Some(held),
            times: Some(1),
            verb: Some("watch".into()),
            resource: Some("deviceprocesses".into()),
            ..Fault::default()
        },
        Fault {
            delay: Some(held),
            times: Some(1),
            verb: Some("list".into()),
            resource: Some("deviceprocesses".into()),
            ..Fault::default()
        },
    ]);
    stack.proxy().cut_streams();
    // Someone else writes the object: its resourceVersion moves on, its spec does not.
    stack
        .processes()
        .patch(
            "contended",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .expect("label");
    stack.ns.reset_requests().await;

    assert_eq!(
        stack
            .report("contended-dev", &[("contended", &hash_of(&dp))])
            .await
            .status(),
        200
    );
    let started = Instant::now();
    stack
        .wait_status("contended", "connected and observed", |dp| {
            is_condition(dp, AGENT_CONNECTED, TRUE) && is_condition(dp, SPEC_OBSERVED, TRUE)
        })
        .await;
    assert!(started.elapsed() < held, "converged through the watch");
    // The apiserver itself refused the patch carrying the old resourceVersion; the gateway read
    // the object again and patched once more.
    let requests = stack.ns.requests().await;
    let patches: Vec<u16> = requests
        .iter()
        .filter(|r| r.verb == "patch" && r.subresource == "status")
        .map(|r| r.code)
        .collect();
    assert_eq!(patches, [409, 200], "{requests:#?}");
    assert_eq!(
        stack.ns.count("get", "deviceprocesses", Some("")).await,
        1,
        "{requests:#?}"
    );
    let dp = stack.get("contended").await;
    assert_eq!(
        dp.metadata.labels.unwrap_or_default().get("touched"),
        Some(&"yes".to_owned()),
        "the other writer's change survives"
    );
}

#[tokio::test]
async fn the_gateway_is_refused_what_its_rbac_does_not_grant_and_then_acts_on_no_shard() {
    // The gateway's Role for Leases is bound in its own namespace only: pointed at another
    // namespace for its shard Leases, it is refused there and owns no shard.
    let control_plane = apollo_test_support::ControlPlane::shared().await;
    let foreign = TestNamespace::create(control_plane, "foreign").await;
    let stack = Stack::start_with(Options {
        lease_namespace: Some(foreign.name().to_owned()),
        ..Options::default()
    })
    .await;
    // The replica retries every second; three refusals later it still owns nothing.
    wait_until(DEADLINE, "three Lease requests refused", || async {
        stack
            .ns
            .requests()
            .await
            .iter()
            .filter(|r| r.resource == "leases" && r.code == 403)
            .count()
            >= 3
    })
    .await;
    let requests = stack.ns.requests().await;
    let leases: Vec<_> = requests.iter().filter(|r| r.resource == "leases").collect();
    assert!(
        leases
            .iter()
            .all(|r| r.code == 403 && r.namespace == foreign.name()),
        "{requests:#?}"
    );
    let listed = foreign.kubectl(["get", "leases", "-o", "name"]).await;
    assert!(listed.status.success());
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout).trim(),
        "",
        "no Lease created"
    );
    // Without its Lease the replica sweeps nothing, so it never marks a device stale.
    assert_eq!(
        stack.metric("apollo_gateway_stale_sweeps_total", &[]).await,
        0.0
    );
    // Operators are told, once per shard, rather than the refusal hiding in debug logs.
    let logs = stack.gateway.logs();
    assert_eq!(
        logs.matches("Kubernetes refused the shard lease call")
            .count(),
        1,
        "{logs}"
    );
}

#[tokio::test]
async fn an_apiserver_restart_costs_no_status_write_and_the_watch_resumes() {
    let control_plane = apollo_test_support::ControlPlane::start().await;
    let stack = Stack::start_on(
        &control_plane,
        Options {
            heartbeat_seconds: 30,
            ..Options::default()
        },
    )
    .await;
    create_connected(&stack, "survivor", "survivor-dev").await;
    let etag = stack.etag_of("survivor-dev").await;
    stack.ns.reset_requests().await;

    // kube-apiserver goes away (SIGKILL: every connection and watch drops) and stays away.
    control_plane.hold(apollo_test_support::kube::KUBE_APISERVER);
    control_plane.kill(apollo_test_support::kube::KUBE_APISERVER);
    wait_until(DEADLINE, "the apiserver is down", || async {
        !control_plane.is_ready().await
    })
    .await;
    // Devices notice nothing: documents come from memory, reports go to Redis.
    let not_modified = stack.desired("survivor-dev", Some(&etag), None).await;
    assert_eq!(not_modified.status(), 304);
    assert_eq!(stack.report("survivor-dev", &[]).await.status(), 200);
    assert_eq!(stack.readyz().await, 200, "a synced cache stays ready");

    control_plane.release(apollo_test_support::kube::KUBE_APISERVER);
    control_plane.wait_ready().await;
    // The watch resumes: a spec change made after the restart reaches the device.
    let poll = stack.spawn_long_poll("survivor-dev", &etag, 30);
    let changed = stack.change_spec("survivor", "alpine:2").await;
    let (_, response) = poll.await.expect("join");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["items"][0]["specHash"], hash_of(&changed));
    // The restart itself wrote nothing; the spec change and its prompt observation cost one patch.
    assert_eq!(
        stack.ns.writes(None).await,
        0,
        "{:?}",
        stack.ns.requests().await
    );
    let new_hash = hash_of(&changed);
    assert_eq!(
        stack
            .report("survivor-dev", &[("survivor", &new_hash)])
            .await
            .status(),
        200
    );
    stack
        .wait_status("survivor", "the new spec observed", |dp| {
            is_condition(dp, SPEC_OBSERVED, TRUE)
                && dp
                    .status
                    .as_ref()
                    .and_then(|s| s.observed_spec_hash.as_deref())
                    == Some(new_hash.as_str())
        })
        .await;
    stack.wait_sweeps(5.0).await;
    assert_eq!(
        stack.status_patches().await,
        1,
        "{:?}",
        stack.ns.requests().await
    );
    assert_eq!(
        stack.events("survivor", REASON_AGENT_CONNECTED).await.len(),
        1
    );
    assert!(stack
        .events("survivor", REASON_AGENT_DISCONNECTED)
        .await
        .is_empty());
}

#[tokio::test]
async fn status_writes_that_time_out_while_etcd_is_paused_converge_with_one_event_each() {
    let control_plane = apollo_test_support::ControlPlane::start().await;
    let stack = Stack::start_on(
        &control_plane,
        Options {
            heartbeat_seconds: 30,
            resync_seconds: "1",
            extra: vec!["--kube-write-timeout-seconds".into(), "1".into()],
            ..Options::default()
        },
    )
    .await;
    let dp = stack.create("paused", "paused-dev", "alpine:1").await;
    stack.wait_for_items("paused-dev", 1).await;
    stack
        .wait_status("paused", "initial status", |dp| dp.status.is_some())
        .await;

    // etcd stops answering: the apiserver holds every write.
    control_plane.signal(apollo_test_support::kube::ETCD, Signal::SIGSTOP);
    let resume = resume_etcd_on_drop(&control_plane);
    assert_eq!(
        stack
            .report("paused-dev", &[("paused", &hash_of(&dp))])
            .await
            .status(),
        200,
        "reports do not wait for Kubernetes"
    );
    // The writer publishes a transition's Event before its status patch: the Event times out.
    let timeouts = [r#"kind="event""#, r#"outcome="timeout""#];
    wait_until(DEADLINE, "an Event creation timed out", || async {
        stack
            .metric("apollo_gateway_kube_writes_total", &timeouts)
            .await
            >= 1.0
    })
    .await;
    drop(resume);

    stack
        .wait_status("paused", "connected and observed once etcd is back", |dp| {
            is_condition(dp, AGENT_CONNECTED, TRUE) && is_condition(dp, SPEC_OBSERVED, TRUE)
        })
        .await;
    wait_until(DEADLINE, "both Events published", || async {
        stack.events("paused", REASON_AGENT_CONNECTED).await.len() == 1
            && stack.events("paused", REASON_SPEC_OBSERVED).await.len() == 1
    })
    .await;
    // A write the apiserver finished after the gateway gave up on it is not repeated as a
    // second Event, however many resyncs run.
    stack
        .wait_metric_growth(RESYNCS, 3.0, DEADLINE, "three resync passes")
        .await;
    assert_eq!(
        stack.events("paused", REASON_AGENT_CONNECTED).await.len(),
        1
    );
    assert_eq!(stack.events("paused", REASON_SPEC_OBSERVED).await.len(), 1);
}

/// Sends etcd SIGCONT when dropped (also when the test fails while etcd is paused).
fn resume_etcd_on_drop(control_plane: &apollo_test_support::ControlPlane) -> impl Drop + '_ {
    struct Resume<'a>(&'a apollo_test_support::ControlPlane);
    impl Drop for Resume<'_> {
        fn drop(&mut self) {
            self.0
                .signal(apollo_test_support::kube::ETCD, Signal::SIGCONT);
        }
    }
    Resume(control_plane)
}

#[tokio::test]
async fn without_a_namespace_the_gateway_serves_and_writes_every_namespace() {
    // Every namespace of a control plane of its own: on the shared one this gateway would act on
    // other tests' objects.
    let control_plane = apollo_test_support::ControlPlane::start().await;
    let stack = Stack::start_on(
        &control_plane,
        Options {
            heartbeat_seconds: 30,
            all_namespaces: true,
            ..Options::default()
        },
    )
    .await;
    let other = TestNamespace::create(&control_plane, "other").await;
    let here = stack.create("here", "roaming", "alpine:1").await;
    let spec: apollo_crds::DeviceProcessSpec = serde_json::from_value(json!({
        "deviceRef": {"name": "roaming"},
        "artifact": {"type": "oci", "url": "alpine:2"},
        "execution": {"backend": "container", "args": ["run"]}
    }))
    .expect("spec");
    let there = other
        .api::<apollo_crds::DeviceProcess>()
        .create(
            &kube::api::PostParams::default(),
            &apollo_crds::DeviceProcess::new("there", spec),
        )
        .await
        .expect("create in the other namespace");
    stack.wait_for_items("roaming", 2).await;

    let body = json!({
        "agentVersion": "test/1.0",
        "timestamp": jiff::Timestamp::now().to_string(),
        "observations": [
            {"namespace": stack.namespace(), "name": "here", "observedSpecHash": hash_of(&here)},
            {"namespace": other.name(), "name": "there", "observedSpecHash": hash_of(&there)},
        ],
    });
    let token = stack.token("roaming");
    let response = stack
        .post("roaming", "report", &body.to_string(), Some(&token))
        .await;
    assert_eq!(response.status(), 200);
    let ack: serde_json::Value = response.json().await.expect("json");
    assert_eq!(ack["ignored"], json!([]));
    stack
        .wait_status("here", "connected and observed", |dp| {
            is_condition(dp, AGENT_CONNECTED, TRUE) && is_condition(dp, SPEC_OBSERVED, TRUE)
        })
        .await;
    let theirs: kube::Api<apollo_crds::DeviceProcess> = other.api();
    wait_until(DEADLINE, "the other namespace's status too", || async {
        theirs.get("there").await.is_ok_and(|dp| {
            is_condition(&dp, AGENT_CONNECTED, TRUE) && is_condition(&dp, SPEC_OBSERVED, TRUE)
        })
    })
    .await;
    wait_until(DEADLINE, "an Event in each namespace", || async {
        stack.events("here", REASON_AGENT_CONNECTED).await.len() == 1
            && apollo_test_support::events_about(
                &other.api(),
                "there",
                None,
                REASON_AGENT_CONNECTED,
            )
            .await
            .len()
                == 1
    })
    .await;
    // One cluster-wide list and watch, under the gateway's own identity (its ClusterRole).
    let requests = stack.ns.requests().await;
    let lists: Vec<_> = requests
        .iter()
        .filter(|r| r.resource == "deviceprocesses" && r.verb == "list")
        .collect();
    assert_eq!(lists.len(), 1, "{requests:#?}");
    assert_eq!(lists[0].namespace, "", "{requests:#?}");
    let elsewhere: Vec<_> = requests
        .iter()
        .filter(|r| r.namespace == other.name())
        .map(|r| {
            (
                r.verb.as_str(),
                r.resource.as_str(),
                r.subresource.as_str(),
                r.code,
            )
        })
        .collect();
    assert!(
        elsewhere.contains(&("patch", "deviceprocesses", "status", 200))
            && elsewhere.contains(&("create", "events", "", 201)),
        "{requests:#?}"
    );
}

//! Issue 5's "Done when" rules, one named test each, against the real `apollo-gateway` binary
//! (running as its own ServiceAccount), the real Kubernetes control plane and a real
//! redis-server. Kubernetes request counts come from the apiserver's audit log. Cases of the
//! device API's HTTP behaviour that need none of these (tokens bound to their device, malformed
//! and oversized bodies, spoofed observations) run in process in `http_in_process.rs`.

mod common;

use std::time::{Duration, Instant};

use apollo_crds::conditions::{
    AGENT_CONNECTED, FALSE, REASON_AGENT_CONNECTED, REASON_AGENT_DISCONNECTED,
    REASON_SPEC_OBSERVED, SPEC_OBSERVED, TRUE,
};
use apollo_crds::PHASE_PENDING;
use apollo_test_support::{wait_for, wait_until, Fault};
use common::*;
use kube::api::{Patch, PatchParams};
use serde_json::json;

#[tokio::test]
async fn not_modified_carries_the_etag_which_changes_exactly_with_generation_or_spec_hash() {
    let stack = Stack::start().await;
    let dp = stack.create("agent-tor1", "tor1", "alpine:1").await;
    stack.create("agent-tor2", "tor2", "alpine:1").await;
    let first = stack.wait_for_items("tor1", 1).await;

    let response = stack.desired("tor1", None, None).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "etag"), first);
    assert_eq!(header(&response, "x-apollo-gateway"), "0");
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["deviceName"], "tor1");
    assert_eq!(body["heartbeatIntervalSeconds"], 1);
    assert_eq!(body["items"][0]["specHash"], hash_of(&dp));
    assert_eq!(body["items"][0]["generation"], 1);

    let not_modified = stack.desired("tor1", Some(&first), None).await;
    assert_eq!(not_modified.status(), 304);
    assert_eq!(header(&not_modified, "etag"), first, "304 carries the ETag");
    assert_eq!(header(&not_modified, "x-apollo-gateway"), "0");
    assert!(not_modified.bytes().await.expect("body").is_empty());

    // Labels and status change neither generation nor spec: same ETag. A later spec change on
    // another device, once visible, proves the gateway has processed the earlier events.
    stack
        .processes()
        .patch(
            "agent-tor1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .expect("label");
    stack
        .processes()
        .patch_status(
            "agent-tor1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Somewhere"}})),
        )
        .await
        .expect("status");
    let tor2_before = stack.etag_of("tor2").await;
    stack.change_spec("agent-tor2", "alpine:2").await;
    wait_until(DEADLINE, "tor2's document changes", || async {
        stack.etag_of("tor2").await != tor2_before
    })
    .await;
    assert_eq!(
        stack.desired("tor1", Some(&first), None).await.status(),
        304
    );

    // A spec change bumps the generation and the spec hash: new ETag, 200 for the old tag.
    let changed = stack.change_spec("agent-tor1", "alpine:2").await;
    assert_eq!(changed.metadata.generation, Some(2));
    wait_until(DEADLINE, "tor1's document changes", || async {
        stack.desired("tor1", Some(&first), None).await.status() == 200
    })
    .await;
    let response = stack.desired("tor1", Some(&first), None).await;
    let second = header(&response, "etag");
    assert_ne!(second, first);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["items"][0]["generation"], 2);
    assert_eq!(body["items"][0]["specHash"], hash_of(&changed));
    let not_modified = stack.desired("tor1", Some(&second), None).await;
    assert_eq!(
        (
            not_modified.status().as_u16(),
            header(&not_modified, "etag")
        ),
        (304, second)
    );
}

#[tokio::test]
async fn long_poll_returns_200_within_a_second_of_a_spec_change_and_304_at_the_end() {
    let stack = Stack::start().await;
    stack.create("agent-lp", "lp", "alpine:1").await;
    let etag = stack.wait_for_items("lp", 1).await;

    let start = Instant::now();
    let ended = stack.desired("lp", Some(&etag), Some(1)).await;
    let held = start.elapsed();
    assert_eq!(ended.status(), 304);
    assert_eq!(header(&ended, "etag"), etag);
    assert!(held >= Duration::from_millis(950), "held only {held:?}");

    let poll = stack.spawn_long_poll("lp", &etag, 30);
    wait_until(DEADLINE, "the long poll is held", || async {
        stack.metric("apollo_gateway_long_poll_waiters", &[]).await >= 1.0
    })
    .await;
    let changed = stack.change_spec("agent-lp", "alpine:2").await;
    let changed_at = Instant::now();
    let (answered_at, response) = poll.await.expect("join");
    assert_eq!(response.status(), 200);
    let latency = answered_at.duration_since(changed_at);
    assert!(
        latency < Duration::from_secs(1),
        "answered {latency:?} after the change"
    );
    assert_ne!(header(&response, "etag"), etag);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["items"][0]["specHash"], hash_of(&changed));
    assert_eq!(
        stack.metric("apollo_gateway_long_poll_waiters", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn report_flips_status_within_a_second_with_connected_and_observed_events() {
    let stack = Stack::start().await;
    let dp = stack.create("agent-r", "r1", "alpine:1").await;
    stack.wait_for_items("r1", 1).await;
    let hash = hash_of(&dp);

    let sent = Instant::now();
    let response = stack.report("r1", &[("agent-r", &hash)]).await;
    assert_eq!(response.status(), 200);
    let ack: serde_json::Value = response.json().await.expect("json");
    assert_eq!(
        ack,
        json!({"ack": true, "heartbeatIntervalSeconds": 1, "ignored": []})
    );

    let dp = stack
        .wait_status("agent-r", "Pending, connected, observed", |dp| {
            let s = dp.status.as_ref();
            s.and_then(|s| s.phase.as_deref()) == Some(PHASE_PENDING)
                && s.and_then(|s| s.observed_spec_hash.as_deref()) == Some(hash.as_str())
                && is_condition(dp, AGENT_CONNECTED, TRUE)
                && is_condition(dp, SPEC_OBSERVED, TRUE)
        })
        .await;
    let took = sent.elapsed();
    assert!(took < Duration::from_secs(1), "status took {took:?}");
    assert_eq!(
        condition(&dp, AGENT_CONNECTED),
        Some((TRUE.into(), REASON_AGENT_CONNECTED.into()))
    );
    assert_eq!(
        dp.status.as_ref().and_then(|s| s.observed_generation),
        Some(1)
    );

    wait_until(DEADLINE, "both Events are published", || async {
        !stack
            .events("agent-r", REASON_AGENT_CONNECTED)
            .await
            .is_empty()
            && !stack
                .events("agent-r", REASON_SPEC_OBSERVED)
                .await
                .is_empty()
    })
    .await;
    // The same observation again is a heartbeat: no more Events.
    assert_eq!(
        stack.report("r1", &[("agent-r", &hash)]).await.status(),
        200
    );
    stack.wait_sweeps(3.0).await;
    for reason in [REASON_AGENT_CONNECTED, REASON_SPEC_OBSERVED] {
        let events = stack.events("agent-r", reason).await;
        assert_eq!(events.len(), 1, "{reason}: {events:?}");
        assert_eq!(events[0].type_.as_deref(), Some("Normal"));
        assert_eq!(
            events[0].reporting_controller.as_deref(),
            Some("apollo.azure.com/gateway")
        );
    }
}

/// Waits for `n` more sweeps that judged devices. A gateway sweeps nobody until reports have been
/// heard for a whole stale window (at start-up the cache syncing counts as not hearing them), so
/// with a long `stale_window` the first sweeps come that long after the start.
async fn wait_judging_sweeps(stack: &Stack, n: f64, stale_window: Duration) {
    stack
        .wait_metric_growth(
            "apollo_gateway_stale_sweeps_total",
            n,
            stale_window + DEADLINE,
            "more stale sweeps",
        )
        .await;
}

#[tokio::test]
async fn a_thousand_heartbeats_from_ten_devices_cause_no_kubernetes_writes_or_lists() {
    // A long stale window: nobody goes stale while the test runs.
    let stack = Stack::start_with(Options {
        heartbeat_seconds: 10,
        stale_multiplier: 3,
        ..Options::default()
    })
    .await;
    let devices: Vec<String> = (0..10).map(|i| format!("hb-{i}")).collect();
    for device in &devices {
        stack
            .create(&format!("agent-{device}"), device, "alpine:1")
            .await;
    }
    for device in &devices {
        stack.wait_for_items(device, 1).await;
        stack
            .connect_and_converge(device, &[&format!("agent-{device}")])
            .await;
    }
    for device in &devices {
        let name = format!("agent-{device}");
        wait_until(DEADLINE, "connect Events published", || async {
            stack.events(&name, REASON_SPEC_OBSERVED).await.len() == 1
        })
        .await;
    }
    stack.ns.reset_requests().await;

    let mut tasks = Vec::new();
    for device in devices.clone() {
        let http = stack.http.clone();
        let url = format!("{}/v1/devices/{device}/report", stack.device_url);
        let token = stack.token(&device);
        let desired = stack.desired_url(&device);
        let etag = stack.etag_of(&device).await;
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            for i in 0..100 {
                let response = http
                    .post(&url)
                    .header("x-device-token", &token)
                    .json(&json!({"agentVersion": "t", "timestamp": jiff::Timestamp::now().to_string(), "heartbeat": true}))
                    .send()
                    .await
                    .expect("heartbeat");
                codes.push(response.status().as_u16());
                if i % 10 == 0 {
                    let polled = http
                        .get(&desired)
                        .header("x-device-token", &token)
                        .header("if-none-match", &etag)
                        .send()
                        .await
                        .expect("poll");
                    codes.push(polled.status().as_u16());
                }
            }
            codes
        }));
    }
    let mut heartbeats = 0;
    for task in tasks {
        for code in task.await.expect("join") {
            assert!(code == 200 || code == 304, "unexpected {code}");
            heartbeats += usize::from(code == 200);
        }
    }
    assert_eq!(heartbeats, 1000);
    // Let sweeps run over the reporting devices too.
    wait_judging_sweeps(&stack, 3.0, Duration::from_secs(30)).await;
    assert_eq!(
        stack.ns.writes(None).await,
        0,
        "{:?}",
        stack.ns.requests().await
    );
    assert_eq!(stack.ns.count("list", "deviceprocesses", None).await, 0);
    assert_eq!(stack.ns.count("get", "deviceprocesses", None).await, 0);
    let desired_304 = [r#"route="/v1/devices/{device}/desired""#, r#"code="304""#];
    assert_eq!(
        stack
            .metric("apollo_gateway_http_requests_total", &desired_304)
            .await,
        100.0
    );
}

#[tokio::test]
async fn silent_agent_is_marked_stale_once_and_a_heartbeat_only_report_flips_it_back() {
    let stack = Stack::start().await;
    stack.create("quiet-a", "quiet", "alpine:1").await;
    stack.create("quiet-b", "quiet", "alpine:1").await;
    stack.wait_for_items("quiet", 2).await;
    stack
        .connect_and_converge("quiet", &["quiet-a", "quiet-b"])
        .await;
    stack.ns.reset_requests().await;

    // Silent for longer than 2 x 1 s.
    for name in ["quiet-a", "quiet-b"] {
        let dp = stack
            .wait_status(name, "AgentConnected=False", |dp| {
                is_condition(dp, AGENT_CONNECTED, FALSE)
            })
            .await;
        assert_eq!(
            condition(&dp, AGENT_CONNECTED),
            Some((FALSE.into(), REASON_AGENT_DISCONNECTED.into()))
        );
        assert!(
            is_condition(&dp, SPEC_OBSERVED, TRUE),
            "observation untouched"
        );
    }
    for name in ["quiet-a", "quiet-b"] {
        wait_until(DEADLINE, "Warning published", || async {
            !stack
                .events(name, REASON_AGENT_DISCONNECTED)
                .await
                .is_empty()
        })
        .await;
    }
    // Staying silent through many more sweeps changes nothing.
    stack.wait_sweeps(20.0).await;
    assert_eq!(
        stack.status_patches().await,
        2,
        "one patch per DeviceProcess"
    );
    for name in ["quiet-a", "quiet-b"] {
        let warnings = stack.events(name, REASON_AGENT_DISCONNECTED).await;
        assert_eq!(warnings.len(), 1, "{name}: {warnings:?}");
        assert_eq!(warnings[0].type_.as_deref(), Some("Warning"));
    }

    // A heartbeat without observations (and no desired change) reconnects.
    assert_eq!(stack.report("quiet", &[]).await.status(), 200);
    for name in ["quiet-a", "quiet-b"] {
        stack
            .wait_status(name, "AgentConnected=True again", |dp| {
                is_condition(dp, AGENT_CONNECTED, TRUE)
            })
            .await;
        wait_until(DEADLINE, "second AgentConnected Event", || async {
            stack.events(name, REASON_AGENT_CONNECTED).await.len() == 2
        })
        .await;
    }
    assert_eq!(stack.status_patches().await, 4);
}

#[tokio::test]
async fn gateway_without_auth_refuses_to_start() {
    let mut gateway = apollo_test_support::Proc::builder(gateway_binary())
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env_remove("APOLLO_INSECURE_NO_AUTH")
        .env_remove("APOLLO_AUTH_SECRET_FILE")
        .env_remove("APOLLO_DEV_SHARED_TOKEN_FILE")
        .spawn();
    let status = gateway
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits by itself");
    // A configuration error: status 2, one `program: invalid configuration: ...` line.
    assert_eq!(status.code(), Some(2), "{}", gateway.logs());
    assert!(
        gateway
            .logs()
            .contains("apollo-gateway: invalid configuration: "),
        "{}",
        gateway.logs()
    );
    assert!(
        gateway.logs().contains("--insecure-no-auth"),
        "{}",
        gateway.logs()
    );
}

#[tokio::test]
async fn an_unknown_log_format_is_a_usage_error_naming_the_accepted_ones() {
    let mut gateway = apollo_test_support::Proc::builder(gateway_binary())
        .args(["--insecure-no-auth", "--log-format", "bogus"])
        .env_remove("APOLLO_LOG_FORMAT")
        .spawn();
    let status = gateway
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits on a bad flag");
    assert_eq!(status.code(), Some(2), "{}", gateway.logs());
    let logs = gateway.logs();
    assert!(logs.contains("'bogus'"), "{logs}");
    assert!(logs.contains("[possible values: text, json]"), "{logs}");
}

/// The heartbeat interval a gateway tells agents, read from a desired document.
async fn told_heartbeat(http: &reqwest::Client, device_url: &str) -> u64 {
    let document: serde_json::Value = http
        .get(format!("{device_url}/v1/devices/any/desired"))
        .send()
        .await
        .expect("GET desired")
        .json()
        .await
        .expect("json");
    document["heartbeatIntervalSeconds"]
        .as_u64()
        .unwrap_or_else(|| panic!("no heartbeatIntervalSeconds in {document}"))
}

#[tokio::test]
async fn old_and_new_duration_spellings_both_configure_the_binary() {
    // The harness starts its gateway with the old spelling: --heartbeat-interval-seconds 1.
    let stack = Stack::start_with(Options {
        auth_secret: false,
        extra: vec!["--insecure-no-auth".into()],
        ..Options::default()
    })
    .await;
    assert_eq!(told_heartbeat(&stack.http, &stack.device_url).await, 1);

    // Another gateway (in-memory store) with the new spellings only.
    let device = apollo_test_support::free_addr();
    let admin = apollo_test_support::free_addr();
    let kubeconfig = stack
        .ns
        .kubeconfig_for(apollo_test_support::Component::Gateway)
        .await;
    let mut gateway = apollo_test_support::Proc::builder(gateway_binary())
        .name("gateway-new-spellings")
        .args(["--listen", &device.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--namespace", stack.ns.name()])
        .args(["--lease-namespace", stack.ns.name()])
        .args(["--heartbeat-interval", "7s"])
        .args(["--sweep-interval", "100ms"])
        .args(["--pending-replay-grace", "1m"])
        .arg("--insecure-no-auth")
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("POD_NAMESPACE")
        .spawn();
    wait_until(
        DEADLINE,
        "the second gateway answers /readyz 200",
        || async {
            stack
                .http
                .get(format!("http://{admin}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
    assert_eq!(
        told_heartbeat(&stack.http, &format!("http://{device}")).await,
        7
    );
    gateway.terminate(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn insecure_no_auth_serves_and_warns() {
    let mut stack = Stack::start_with(Options {
        auth_secret: false,
        extra: vec!["--insecure-no-auth".into()],
        ..Options::default()
    })
    .await;
    stack
        .gateway
        .wait_for_log("NOT authenticated", DEADLINE)
        .await;
    let response = stack
        .http
        .get(stack.desired_url("any"))
        .send()
        .await
        .expect("get");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn injected_conflicts_and_server_errors_still_converge_without_losing_observations() {
    // Retries take seconds; keep the device from going stale meanwhile.
    let stack = Stack::start_with(Options {
        heartbeat_seconds: 10,
        proxy: true,
        ..Options::default()
    })
    .await;
    let dp = stack.create("flaky", "flaky-dev", "alpine:1").await;
    stack.wait_for_items("flaky-dev", 1).await;
    stack
        .wait_status("flaky", "initial status", |dp| dp.status.is_some())
        .await;
    stack.ns.reset_requests().await;
    let status_patch = |code, times| Fault {
        subresource: Some("status".into()),
        times: Some(times),
        ..Fault::status("patch", "deviceprocesses", code)
    };
    // The proxy serves the first matching fault first: 409 x3, then 500 x2, then 503 x1 (which
    // kube's client retries by itself), and only then lets a status patch through.
    stack.proxy().set_faults(vec![
        status_patch(409, 3),
        status_patch(500, 2),
        status_patch(503, 1),
        Fault {
            times: Some(2),
            ..Fault::status("create", "events", 500)
        },
    ]);
    assert_eq!(
        stack
            .report("flaky-dev", &[("flaky", &hash_of(&dp))])
            .await
            .status(),
        200
    );
    // A new spec and its observation while the faults are still being served.
    let changed = stack.change_spec("flaky", "alpine:2").await;
    let new_hash = hash_of(&changed);
    assert_eq!(
        stack
            .report("flaky-dev", &[("flaky", &new_hash)])
            .await
            .status(),
        200
    );

    // Two failed patches back the object off twice (2.5-5 s, then 5-10 s, jittered): longer than
    // the usual deadline.
    let converged = wait_for(
        Duration::from_secs(40),
        "status converges on the latest observation",
        || async {
            let dp = stack.get("flaky").await;
            let s = dp.status.as_ref();
            let done = s.and_then(|s| s.observed_spec_hash.as_deref()) == Some(new_hash.as_str())
                && s.and_then(|s| s.observed_generation) == Some(2)
                && is_condition(&dp, AGENT_CONNECTED, TRUE)
                && is_condition(&dp, SPEC_OBSERVED, TRUE);
            done.then_some(dp)
        },
    )
    .await;
    assert_eq!(converged.metadata.generation, Some(2));
    wait_until(DEADLINE, "Events published despite 500s", || async {
        stack.events("flaky", REASON_AGENT_CONNECTED).await.len() == 1
            && stack.events("flaky", REASON_SPEC_OBSERVED).await.len() == 2
    })
    .await;
    // Every injected failure was met: the gateway saw the 3 conflicts and the 2 server errors
    // (the 503 was retried inside kube's client), and a status patch reached the apiserver, which
    // the proxy allows only once all 6 status faults were served (likewise the Events, created
    // only after both injected 500s).
    let status_patches = |outcome: &'static str| {
        let label = format!("outcome=\"{outcome}\"");
        let stack = &stack;
        async move {
            stack
                .metric(
                    "apollo_gateway_kube_writes_total",
                    &[r#"kind="status_patch""#, &label],
                )
                .await
        }
    };
    assert!(status_patches("conflict").await >= 3.0);
    assert!(status_patches("error").await >= 2.0);
    assert!(status_patches("ok").await >= 1.0);
    let requests = stack.ns.requests().await;
    let patched = requests
        .iter()
        .filter(|r| r.verb == "patch" && r.subresource == "status" && r.code == 200)
        .count();
    assert!(patched >= 1, "{requests:#?}");
    wait_judging_sweeps(&stack, 3.0, Duration::from_secs(30)).await;
    assert_eq!(stack.events("flaky", REASON_AGENT_CONNECTED).await.len(), 1);
}

#[tokio::test]
async fn port_already_in_use_exits_non_zero_within_two_seconds_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let admin = apollo_test_support::free_addr();
    let started = Instant::now();
    let mut gateway = apollo_test_support::Proc::builder(gateway_binary())
        .args([
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .arg("--insecure-no-auth")
        .env("KUBECONFIG", "/nonexistent")
        .spawn();
    let status = gateway
        .wait_exit(Duration::from_secs(2))
        .await
        .expect("exits within 2 s");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!status.success());
    let logs = gateway.logs();
    assert!(logs.contains(&addr.to_string()), "{logs}");
    assert!(logs.contains("cannot listen"), "{logs}");
}

#[tokio::test]
async fn events_about_a_device_process_with_the_longest_allowed_name_are_published() {
    let stack = Stack::start().await;
    // 253 characters: the longest name Kubernetes allows; an Event about it must still get a
    // valid name of its own (a DNS subdomain of at most 253 characters).
    let name = format!("{}.{}", "a".repeat(126), "b".repeat(126));
    assert_eq!(name.len(), 253);
    stack.create(&name, "long-dev", "alpine:1").await;
    stack.wait_for_items("long-dev", 1).await;
    stack.connect_and_converge("long-dev", &[&name]).await;
    wait_until(DEADLINE, "both Events are published", || async {
        stack.events(&name, REASON_AGENT_CONNECTED).await.len() == 1
            && stack.events(&name, REASON_SPEC_OBSERVED).await.len() == 1
    })
    .await;
    let requests = stack.ns.requests().await;
    assert!(
        requests
            .iter()
            .filter(|r| r.resource == "events")
            .all(|r| r.code == 201),
        "{requests:#?}"
    );
}

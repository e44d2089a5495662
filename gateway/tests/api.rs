//! Issue 5's "Done when" rules, one named test each, against the real `apollo-gateway` binary,
//! kubesim over HTTP and a real redis-server.

mod common;

use std::time::{Duration, Instant};

use apollo_crds::conditions::{
    AGENT_CONNECTED, FALSE, REASON_AGENT_CONNECTED, REASON_AGENT_DISCONNECTED,
    REASON_SPEC_OBSERVED, SPEC_OBSERVED, TRUE,
};
use apollo_crds::PHASE_PENDING;
use apollo_test_support::wait_until;
use common::*;
use kube::api::{Patch, PatchParams};
use serde_json::json;

#[tokio::test]
async fn not_modified_carries_the_etag_which_changes_exactly_with_generation_or_spec_hash() {
    let stack = Stack::start().await;
    let dp = stack.create("agent-tor1", "tor1", "alpine:1").await;
    stack.create("agent-tor2", "tor2", "alpine:1").await;
    let first = wait_for_items(&stack, "tor1", 1).await;

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
    assert_eq!(stack.desired("tor1", Some(&first), None).await.status(), 304);

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
    assert_eq!((not_modified.status().as_u16(), header(&not_modified, "etag")), (304, second));
}

/// Waits until `device`'s document lists `n` items; returns its ETag.
async fn wait_for_items(stack: &Stack, device: &str, n: usize) -> String {
    apollo_test_support::wait_for(DEADLINE, "desired document has the items", || async {
        let response = stack.desired(device, None, None).await;
        let etag = header(&response, "etag");
        let body: serde_json::Value = response.json().await.ok()?;
        (body["items"].as_array()?.len() == n).then_some(etag)
    })
    .await
}

#[tokio::test]
async fn long_poll_returns_200_within_a_second_of_a_spec_change_and_304_at_the_end() {
    let stack = Stack::start().await;
    stack.create("agent-lp", "lp", "alpine:1").await;
    let etag = wait_for_items(&stack, "lp", 1).await;

    let start = Instant::now();
    let ended = stack.desired("lp", Some(&etag), Some(1)).await;
    let held = start.elapsed();
    assert_eq!(ended.status(), 304);
    assert_eq!(header(&ended, "etag"), etag);
    assert!(held >= Duration::from_millis(950), "held only {held:?}");

    let poll = {
        let http = stack.http.clone();
        let url = format!("{}?waitSeconds=30", stack.desired_url("lp"));
        let token = stack.token("lp");
        let etag = etag.clone();
        tokio::spawn(async move {
            let response = http
                .get(url)
                .header("x-device-token", token)
                .header("if-none-match", etag)
                .send()
                .await
                .expect("long poll");
            (Instant::now(), response)
        })
    };
    wait_until(DEADLINE, "the long poll is held", || async {
        stack.metric("apollo_gateway_long_poll_waiters").await >= 1.0
    })
    .await;
    let changed = stack.change_spec("agent-lp", "alpine:2").await;
    let changed_at = Instant::now();
    let (answered_at, response) = poll.await.expect("join");
    assert_eq!(response.status(), 200);
    let latency = answered_at.duration_since(changed_at);
    assert!(latency < Duration::from_secs(1), "answered {latency:?} after the change");
    assert_ne!(header(&response, "etag"), etag);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["items"][0]["specHash"], hash_of(&changed));
    assert_eq!(stack.metric("apollo_gateway_long_poll_waiters").await, 0.0);
}

#[tokio::test]
async fn report_flips_status_within_a_second_with_connected_and_observed_events() {
    let stack = Stack::start().await;
    let dp = stack.create("agent-r", "r1", "alpine:1").await;
    wait_for_items(&stack, "r1", 1).await;
    let hash = hash_of(&dp);

    let sent = Instant::now();
    let response = stack.report("r1", &[("agent-r", &hash)]).await;
    assert_eq!(response.status(), 200);
    let ack: serde_json::Value = response.json().await.expect("json");
    assert_eq!(ack, json!({"ack": true, "heartbeatIntervalSeconds": 1, "ignored": []}));

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
    assert_eq!(dp.status.as_ref().and_then(|s| s.observed_generation), Some(1));

    wait_until(DEADLINE, "both Events are published", || async {
        !stack.events("agent-r", REASON_AGENT_CONNECTED).await.is_empty()
            && !stack.events("agent-r", REASON_SPEC_OBSERVED).await.is_empty()
    })
    .await;
    // The same observation again is a heartbeat: no more Events.
    assert_eq!(stack.report("r1", &[("agent-r", &hash)]).await.status(), 200);
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

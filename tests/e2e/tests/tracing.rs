//! One report is one trace in a real Jaeger: the agent's `traceparent` is continued by the
//! router and the gateway, whose spans (request, Redis, the off-path status write and its
//! Kubernetes calls) are exported over OTLP; the test reads the trace back from Jaeger's HTTP query
//! API and checks each span's parent chain.

use std::collections::HashMap;
use std::time::Duration;

use apollo_dev::{fleet, Stack, StackConfig};
use apollo_test_support::{binary, wait_for, wait_until};
use serde_json::Value;

/// A span as Jaeger's query API returns it.
#[derive(Debug, Clone)]
struct Span {
    id: String,
    parent: Option<String>,
    operation: String,
    service: String,
}

fn spans_of(trace: &Value) -> Vec<Span> {
    let processes = &trace["processes"];
    trace["spans"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|s| Span {
            id: s["spanID"].as_str().unwrap_or_default().to_owned(),
            parent: s["references"].as_array().and_then(|refs| {
                refs.iter()
                    .find(|r| r["refType"] == "CHILD_OF")
                    .and_then(|r| r["spanID"].as_str())
                    .map(str::to_owned)
            }),
            operation: s["operationName"].as_str().unwrap_or_default().to_owned(),
            service: processes[s["processID"].as_str().unwrap_or_default()]["serviceName"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        })
        .collect()
}

/// Whether `ancestor` is on the parent chain of `span`.
fn descends_from(spans: &HashMap<String, Span>, span: &Span, ancestor: &str) -> bool {
    let mut parent = span.parent.clone();
    for _ in 0..64 {
        match parent {
            Some(p) if p == ancestor => return true,
            Some(p) => parent = spans.get(&p).and_then(|s| s.parent.clone()),
            None => return false,
        }
    }
    false
}

#[tokio::test]
async fn a_report_is_one_trace_in_jaeger_through_router_gateway_redis_and_kubernetes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = binary("apollo-gateway")
        .parent()
        .expect("dir")
        .to_path_buf();
    let mut cfg = StackConfig::test(dir.path().to_path_buf(), bin_dir);
    cfg.gateways = 2;
    cfg.devices = vec!["trace-dev".into()];
    cfg.install_samples = true;
    cfg.jaeger = true;
    // Export promptly so the test does not wait for the default 5 s batch.
    cfg.server_env = vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into())];
    let stack = Stack::start(cfg).await.expect("stack");
    let client = stack.client();
    let ns = stack.namespace().to_owned();
    let dp = wait_for(
        Duration::from_secs(20),
        "the DeviceProcess exists",
        || async {
            fleet::processes(&client, &ns, apollo_dev::samples::SAMPLE_DEPLOYMENT)
                .await
                .ok()?
                .remove("trace-dev")
        },
    )
    .await;
    let name = dp.metadata.name.clone().expect("name");

    // The first report of a device is a transition: status patch and Events in the same trace.
    // The test plays the agent: its span id is the root every other span must descend from.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let agent_span = "00f067aa0ba902b7";
    let report = serde_json::json!({
        "agentVersion": "test",
        "timestamp": "2026-11-22T00:00:00Z",
        "heartbeat": true,
        "observations": [{"namespace": ns, "name": name,
                          "observedSpecHash": apollo_crds::spec_hash(&dp.spec)}]
    });
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/devices/trace-dev/report",
            stack.router_url()
        ))
        .header(
            apollo_protocol::DEVICE_TOKEN_HEADER,
            stack.token("trace-dev"),
        )
        .header("traceparent", format!("00-{trace_id}-{agent_span}-01"))
        .json(&report)
        .send()
        .await
        .expect("report");
    assert_eq!(resp.status(), 200);

    let jaeger = stack.jaeger().expect("the stack runs Jaeger").ui_url();
    let http = reqwest::Client::new();
    let wanted = [
        ("apollo-router", "router.request"),
        ("apollo-gateway", "gateway.request"),
        ("apollo-gateway", "state_store"),
        ("apollo-gateway", "status.write"),
        ("apollo-gateway", "kube.request"),
    ];
    let spans = wait_for(
        Duration::from_secs(30),
        "Jaeger holds the report's trace with every span",
        || async {
            let trace: Value = http
                .get(format!("{jaeger}/api/traces/{trace_id}"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let spans = spans_of(trace["data"].get(0)?);
            wanted
                .iter()
                .all(|(service, op)| {
                    spans
                        .iter()
                        .any(|s| s.service == *service && s.operation == *op)
                })
                .then_some(spans)
        },
    )
    .await;
    let by_id: HashMap<String, Span> = spans.iter().map(|s| (s.id.clone(), s.clone())).collect();
    let find = |op: &str| {
        spans
            .iter()
            .find(|s| s.operation == op)
            .unwrap_or_else(|| panic!("no {op} span in {spans:#?}"))
    };
    let router = find("router.request");
    assert_eq!(
        router.parent.as_deref(),
        Some(agent_span),
        "the router continues the agent's span"
    );
    let gateway = find("gateway.request");
    assert!(
        descends_from(&by_id, gateway, &router.id),
        "gateway.request descends from router.request: {spans:#?}"
    );
    let store = find("state_store");
    assert!(
        descends_from(&by_id, store, &gateway.id),
        "the Redis round trip descends from gateway.request: {spans:#?}"
    );
    let write = find("status.write");
    assert!(
        descends_from(&by_id, write, &gateway.id),
        "the off-path status write belongs to the report: {spans:#?}"
    );
    for kube in spans.iter().filter(|s| s.operation == "kube.request") {
        assert!(
            descends_from(&by_id, kube, &write.id),
            "every Kubernetes call descends from status.write: {spans:#?}"
        );
    }

    // What the README tells an operator to run lists report traces of the gateway.
    wait_until(
        Duration::from_secs(10),
        "/api/traces?service=apollo-gateway lists traces",
        || async {
            let listed: Value = match http
                .get(format!(
                    "{jaeger}/api/traces?service=apollo-gateway&limit=20"
                ))
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => return false,
            };
            listed["data"]
                .as_array()
                .is_some_and(|d| d.iter().any(|t| t["traceID"] == trace_id))
        },
    )
    .await;
    stack.shutdown().await;
}

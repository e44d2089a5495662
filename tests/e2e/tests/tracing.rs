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

/// Spans of the trace `trace`, or nothing.
async fn trace_spans(http: &reqwest::Client, jaeger: &str, trace: &str) -> Vec<Span> {
    let Ok(response) = http
        .get(format!("{jaeger}/api/traces/{trace}"))
        .send()
        .await
    else {
        return Vec::new();
    };
    let body: Value = response.json().await.unwrap_or_default();
    body["data"].get(0).map(spans_of).unwrap_or_default()
}

#[tokio::test]
async fn an_agent_report_is_one_trace_in_jaeger_through_router_gateway_redis_and_kubernetes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = binary("apollo-agent").parent().expect("dir").to_path_buf();
    let mut cfg = StackConfig::test(dir.path().to_path_buf(), bin_dir);
    cfg.gateways = 2;
    cfg.devices = vec!["trace-dev".into()];
    cfg.install_samples = true;
    cfg.run_agents = true;
    cfg.jaeger = true;
    // Export promptly so the test does not wait for the default 5 s batch.
    cfg.server_env = vec![("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into())];
    let stack = Stack::start(cfg).await.expect("stack");
    let client = stack.client();
    let ns = stack.namespace().to_owned();
    wait_until(
        Duration::from_secs(30),
        "the agent's device is healthy",
        || async {
            fleet::processes(&client, &ns, apollo_dev::samples::SAMPLE_DEPLOYMENT)
                .await
                .is_ok_and(|dps| dps.get("trace-dev").is_some_and(fleet::healthy))
        },
    )
    .await;

    // The agent's report that observed the spec was a transition: its trace holds the status
    // patch and the Events, written off the request path.
    let jaeger = stack.jaeger().expect("the stack runs Jaeger").ui_url();
    let http = reqwest::Client::new();
    let spans = wait_for(
        Duration::from_secs(30),
        "an apollo-agent trace with the status write and its Kubernetes calls",
        || async {
            let listed: Value = http
                .get(format!(
                    "{jaeger}/api/traces?service=apollo-agent&limit=100"
                ))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            for trace in listed["data"].as_array()? {
                let id = trace["traceID"].as_str()?;
                // The listing may hold a partial trace: read the whole one.
                let spans = trace_spans(&http, &jaeger, id).await;
                let has = |service: &str, op: &str| {
                    spans
                        .iter()
                        .any(|s| s.service == service && s.operation == op)
                };
                if has("apollo-agent", "agent.report")
                    && has("apollo-router", "router.request")
                    && has("apollo-gateway", "gateway.request")
                    && has("apollo-gateway", "state_store")
                    && has("apollo-gateway", "status.write")
                    && has("apollo-gateway", "kube.request")
                {
                    return Some(spans);
                }
            }
            None
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
    let agent = find("agent.report");
    assert_eq!(
        agent.parent, None,
        "the agent's span is the root: {spans:#?}"
    );
    let router = find("router.request");
    assert_eq!(
        router.parent.as_deref(),
        Some(agent.id.as_str()),
        "the router continues the agent's span: {spans:#?}"
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
    let listed: Value = http
        .get(format!(
            "{jaeger}/api/traces?service=apollo-gateway&limit=20"
        ))
        .send()
        .await
        .expect("query Jaeger")
        .json()
        .await
        .expect("JSON");
    assert!(
        listed["data"].as_array().is_some_and(|d| !d.is_empty()),
        "{listed}"
    );
    stack.shutdown().await;
}

//! One report is one trace: the agent's traceparent is continued by the router and the gateway,
//! whose spans (request, Redis, status write, Kubernetes calls) reach an OTLP/HTTP collector.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apollo_e2e::{fleet, Ports, Stack, StackConfig};
use apollo_test_support::{binary, wait_until};
use axum::body::Bytes;
use axum::routing::post;

/// Bodies POSTed to /v1/traces (OTLP protobuf, kept raw).
type Received = Arc<Mutex<Vec<Vec<u8>>>>;

async fn otlp_sink() -> (String, Received) {
    let received: Received = Arc::default();
    let app = axum::Router::new().route(
        "/v1/traces",
        post({
            let received = received.clone();
            move |body: Bytes| {
                let received = received.clone();
                async move {
                    received.lock().expect("lock").push(body.to_vec());
                    ""
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, received)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn a_report_is_one_trace_through_router_gateway_redis_and_kubernetes() {
    let (endpoint, received) = otlp_sink().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = binary("apollo-gateway")
        .parent()
        .expect("dir")
        .to_path_buf();
    let mut cfg = StackConfig::demo(dir.path().to_path_buf(), bin_dir);
    cfg.ports = Ports::ephemeral();
    cfg.gateways = 2;
    cfg.devices = vec!["trace-dev".into()];
    cfg.run_agents = false;
    cfg.server_env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
        // Export promptly so the test does not wait for the default 5 s batch.
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
    ];
    let stack = Stack::start(cfg).await.expect("stack");
    let client = stack.client();
    wait_until(
        Duration::from_secs(10),
        "the DeviceProcess exists",
        || async {
            fleet::processes(&client, "default", apollo_e2e::samples::SAMPLE_DEPLOYMENT)
                .await
                .is_ok_and(|dps| dps.len() == 1)
        },
    )
    .await;
    let dp = fleet::processes(&client, "default", apollo_e2e::samples::SAMPLE_DEPLOYMENT)
        .await
        .expect("dps")
        .remove("trace-dev")
        .expect("dp");
    let name = dp.metadata.name.clone().expect("name");

    // The first report of a device is a transition: status patch and Events in the same trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let report = serde_json::json!({
        "agentVersion": "test",
        "timestamp": "2026-11-22T00:00:00Z",
        "heartbeat": true,
        "observations": [{"namespace": "default", "name": name,
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
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&report)
        .send()
        .await
        .expect("report");
    assert_eq!(resp.status(), 200);

    let id = hex::decode(trace_id).expect("hex");
    for name in [
        "router.request",
        "gateway.request",
        "state_store",
        "status.write",
        "kube.request",
    ] {
        wait_until(
            Duration::from_secs(20),
            &format!("a {name} span in the report's trace"),
            || async {
                received
                    .lock()
                    .expect("lock")
                    .iter()
                    .any(|body| contains(body, &id) && contains(body, name.as_bytes()))
            },
        )
        .await;
    }
    stack.shutdown().await;
}

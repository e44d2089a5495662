//! The device API's HTTP behaviour in process: the gateway's own router (every layer: auth,
//! parsing, budgets, the error envelope, `X-Apollo-Gateway`) driven with
//! `tower::ServiceExt::oneshot`, over the in-memory state store and a watch cache filled the way
//! the watch fills it, with a sink recording the transitions each report hands to the status
//! writer. No socket, Redis or Kubernetes: what these cases check does not involve them. The
//! end-to-end path (real binary, real Redis, the real control plane and its audit log) keeps its
//! own tests in `api.rs`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use apollo_crds::{DeviceProcess, DeviceProcessSpec};
use apollo_gateway::api::auth::Auth;
use apollo_gateway::api::budget::{Budgets, Limits};
use apollo_gateway::api::{device_router, DeviceApi, ReportSink};
use apollo_gateway::cache::Cache;
use apollo_gateway::metrics::Metrics;
use apollo_gateway::model::ObjectKey;
use apollo_gateway::state::{PendingKind, ReportOutcome, StateStore, Store};
use apollo_gateway::status::projection::Shown;
use apollo_protocol::token::device_token;
use axum::body::Body;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const KEY: &[u8] = b"in-process-secret";
const NAMESPACE: &str = "ns";

/// The transitions reports handed to the status writer, per device.
#[derive(Default)]
struct RecordingSink {
    outcomes: Mutex<Vec<(String, ReportOutcome)>>,
}

impl ReportSink for RecordingSink {
    fn on_report(&self, device: &str, outcome: &ReportOutcome, _: &HashMap<ObjectKey, Shown>) {
        self.outcomes
            .lock()
            .expect("lock")
            .push((device.to_owned(), outcome.clone()));
    }
}

impl RecordingSink {
    fn outcomes(&self) -> Vec<(String, ReportOutcome)> {
        self.outcomes.lock().expect("lock").clone()
    }
}

struct Gateway {
    router: Router,
    store: Store,
    sink: Arc<RecordingSink>,
    _etag_records: mpsc::Receiver<(String, String)>,
}

fn device_process(name: &str, device: &str, url: &str) -> DeviceProcess {
    let spec: DeviceProcessSpec = serde_json::from_value(json!({
        "deviceRef": {"name": device},
        "artifact": {"type": "oci", "url": url},
        "execution": {"backend": "container", "args": ["run"]}
    }))
    .expect("spec");
    let mut dp = DeviceProcess::new(name, spec);
    dp.metadata.namespace = Some(NAMESPACE.into());
    dp.metadata.generation = Some(1);
    dp.metadata.resource_version = Some("1".into());
    dp.metadata.uid = Some(format!("uid-{name}"));
    dp
}

/// A gateway whose cache holds `objects` and has synced (as after the watch's first list).
async fn gateway(objects: &[DeviceProcess]) -> Gateway {
    let cache = Arc::new(Cache::new(15, Metrics::unregistered()));
    cache.begin_relist();
    for dp in objects {
        cache.relist_apply(dp);
    }
    cache.finish_relist().await;
    gateway_over(cache)
}

/// A gateway over `cache` as it is (synced or not).
fn gateway_over(cache: Arc<Cache>) -> Gateway {
    let metrics = Metrics::unregistered();
    let store = Store::memory(metrics.clone());
    let sink = Arc::new(RecordingSink::default());
    let (etag_records, etag_queue) = mpsc::channel(64);
    let api = Arc::new(DeviceApi {
        cache,
        store: store.clone(),
        sink: sink.clone(),
        auth: Auth::hmac(KEY),
        heartbeat_interval_seconds: 15,
        metrics: metrics.clone(),
        shutdown: CancellationToken::new(),
        etag_records,
        ordinal: 0,
        budgets: Budgets::new(
            Limits {
                requests: 64,
                long_polls: 64,
                long_polls_per_device: 2,
            },
            metrics,
        ),
        max_report_clock_skew: std::time::Duration::from_secs(86_400),
        access_log: false,
    });
    Gateway {
        router: device_router(api),
        store,
        sink,
        _etag_records: etag_queue,
    }
}

fn token(device: &str) -> String {
    device_token(KEY, device)
}

struct Answer {
    status: StatusCode,
    gateway: Option<String>,
    body: Value,
}

impl Gateway {
    async fn send(&self, request: Request<Body>) -> Answer {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("the router never fails");
        let status = response.status();
        let gateway = response
            .headers()
            .get("x-apollo-gateway")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Answer {
            status,
            gateway,
            body,
        }
    }

    async fn get_desired(&self, device: &str, auth: Option<(&str, String)>) -> Answer {
        let mut request = Request::get(format!("/v1/devices/{device}/desired"));
        if let Some((header, value)) = auth {
            request = request.header(header, value);
        }
        self.send(request.body(Body::empty()).expect("request"))
            .await
    }

    async fn post(&self, device: &str, what: &str, body: &str, token: Option<&str>) -> Answer {
        let mut request = Request::post(format!("/v1/devices/{device}/{what}"))
            .header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("x-device-token", token);
        }
        self.send(request.body(Body::from(body.to_owned())).expect("request"))
            .await
    }

    /// Whether the state store holds a report of `device` (a last-seen time or observations).
    async fn recorded(&self, device: &str) -> bool {
        let record = self.store.device(device).await.expect("read the store");
        record.last_seen_ms.is_some() || !record.observed.is_empty()
    }
}

fn report_body(observations: &[(&str, &str)]) -> String {
    let observations: Vec<Value> = observations
        .iter()
        .map(|(name, hash)| json!({"namespace": NAMESPACE, "name": name, "observedSpecHash": hash}))
        .collect();
    json!({
        "agentVersion": "1",
        "timestamp": jiff::Timestamp::now().to_string(),
        "observations": observations,
    })
    .to_string()
}

#[tokio::test]
async fn tokens_are_bound_to_their_device() {
    let gw = gateway(&[]).await;
    let ok = gw
        .get_desired("dev-b", Some(("x-device-token", token("dev-b"))))
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    let wrong = gw
        .get_desired("dev-b", Some(("x-device-token", token("dev-a"))))
        .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    assert_eq!(wrong.gateway.as_deref(), Some("0"));
    assert_eq!(wrong.body["error"]["code"], "forbidden");
    let missing = gw.get_desired("dev-b", None).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.body["error"]["code"], "unauthenticated");
    let garbage = gw
        .get_desired("dev-b", Some(("x-device-token", "garbage".into())))
        .await;
    assert_eq!(garbage.status, StatusCode::UNAUTHORIZED);
    let bearer = gw
        .get_desired(
            "dev-b",
            Some(("authorization", format!("Bearer {}", token("dev-b")))),
        )
        .await;
    assert_eq!(bearer.status, StatusCode::OK);

    // The report and connect endpoints too, before anything is recorded.
    let body = report_body(&[]);
    let token_a = token("dev-a");
    assert_eq!(
        gw.post("dev-b", "report", &body, Some(&token_a))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        gw.post("dev-b", "report", &body, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    let connect = json!({"agentVersion": "1"}).to_string();
    assert_eq!(
        gw.post("dev-b", "connect", &connect, Some(&token_a))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert!(!gw.recorded("dev-b").await);
    assert!(gw.sink.outcomes().is_empty());

    // ... while the device's own token is recorded.
    let token_b = token("dev-b");
    let answer = gw.post("dev-b", "report", &body, Some(&token_b)).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert!(gw.recorded("dev-b").await);
}

#[tokio::test]
async fn oversized_and_malformed_bodies_are_rejected_naming_the_field() {
    let gw = gateway(&[]).await;
    let token = token("bodies");
    let huge = json!({
        "agentVersion": "1",
        "timestamp": jiff::Timestamp::now().to_string(),
        "padding": "x".repeat(70 * 1024),
    })
    .to_string();
    let answer = gw.post("bodies", "report", &huge, Some(&token)).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.body["error"]["code"], "payload_too_large");

    let good_hash = format!("sha256:{}", "a".repeat(64));
    for (body, field) in [
        ("{\"agentVersion\": ".to_owned(), "body"),
        (
            json!({"agentVersion": "1", "timestamp": "last tuesday"}).to_string(),
            "timestamp",
        ),
        (json!({"agentVersion": "1"}).to_string(), "timestamp"),
        (
            json!({"agentVersion": "1", "timestamp": jiff::Timestamp::now().to_string(),
                   "observations": [{"namespace": "default", "name": "x", "observedSpecHash": good_hash},
                                    {"namespace": "default", "name": "y", "observedSpecHash": "md5:abc"}]})
            .to_string(),
            "observations[1].observedSpecHash",
        ),
    ] {
        let answer = gw.post("bodies", "report", &body, Some(&token)).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(answer.gateway.as_deref(), Some("0"));
        assert_eq!(answer.body["error"]["field"], field, "{}", answer.body);
        assert_eq!(answer.body["error"]["code"], "invalid_field");
    }
    let answer = gw.post("bodies", "connect", "{}", Some(&token)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.body["error"]["field"], "agentVersion");
    assert!(!gw.recorded("bodies").await);
    assert!(gw.sink.outcomes().is_empty());
}

#[tokio::test]
async fn spoofed_observation_is_forbidden_and_nothing_is_recorded_or_handed_to_the_writer() {
    let mine = device_process("mine", "honest", "alpine:1");
    let theirs = device_process("theirs", "victim", "alpine:1");
    let gw = gateway(&[mine.clone(), theirs.clone()]).await;
    let body = report_body(&[
        ("mine", &apollo_crds::spec_hash(&mine.spec)),
        ("theirs", &apollo_crds::spec_hash(&theirs.spec)),
    ]);
    let answer = gw
        .post("honest", "report", &body, Some(&token("honest")))
        .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(answer.body["error"]["code"], "forbidden");
    assert_eq!(answer.body["error"]["field"], "observations[1]");
    // Nothing recorded, and nothing reached the status writer (the only path to a Kubernetes
    // write besides the sweep and resync).
    assert!(!gw.recorded("honest").await);
    assert!(!gw.recorded("victim").await);
    assert!(gw.sink.outcomes().is_empty());
}

#[tokio::test]
async fn a_report_connects_once_and_hands_its_transitions_to_the_writer() {
    let dp = device_process("p", "tor1", "alpine:1");
    let gw = gateway(std::slice::from_ref(&dp)).await;
    let hash = apollo_crds::spec_hash(&dp.spec);
    let token = token("tor1");
    let answer = gw
        .post(
            "tor1",
            "report",
            &report_body(&[("p", &hash)]),
            Some(&token),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        answer.body["heartbeatIntervalSeconds"], 15,
        "{}",
        answer.body
    );
    let outcomes = gw.sink.outcomes();
    assert_eq!(outcomes.len(), 1);
    let (device, outcome) = &outcomes[0];
    assert_eq!(device, "tor1");
    let kinds: Vec<&PendingKind> = outcome.pending.iter().map(|p| &p.kind).collect();
    assert!(
        kinds
            .iter()
            .any(|k| matches!(k, PendingKind::Connected { .. })),
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .any(|k| matches!(k, PendingKind::Observed { key, .. } if key.name == "p")),
        "{kinds:?}"
    );

    // A heartbeat with the same observation decides nothing new.
    let answer = gw
        .post(
            "tor1",
            "report",
            &report_body(&[("p", &hash)]),
            Some(&token),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let outcomes = gw.sink.outcomes();
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes[1].1.pending.is_empty(), "{:?}", outcomes[1].1);
}

#[tokio::test]
async fn desired_serves_the_device_documents_with_an_etag_and_304_when_it_matches() {
    let dp = device_process("p", "tor1", "alpine:1");
    let gw = gateway(std::slice::from_ref(&dp)).await;
    let token = token("tor1");
    let response = gw
        .router
        .clone()
        .oneshot(
            Request::get("/v1/devices/tor1/desired")
                .header("x-device-token", &token)
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let etag = response
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .expect("an ETag")
        .to_owned();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let document: Value = serde_json::from_slice(&body).expect("json");
    let items = document["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{document}");
    assert_eq!(items[0]["name"], "p", "{document}");

    let again = gw
        .router
        .clone()
        .oneshot(
            Request::get("/v1/devices/tor1/desired")
                .header("x-device-token", &token)
                .header("if-none-match", &etag)
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(
        again.headers().get("etag").and_then(|v| v.to_str().ok()),
        Some(etag.as_str())
    );
}

#[tokio::test]
async fn unknown_routes_get_the_error_envelope_and_the_replica_header() {
    let gw = gateway(&[]).await;
    let answer = gw
        .send(
            Request::get("/v1/nothing/here")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.gateway.as_deref(), Some("0"));
    assert!(answer.body["error"]["code"].is_string(), "{}", answer.body);
}

#[tokio::test]
async fn before_the_cache_has_synced_desired_answers_304_only_for_the_etag_last_served() {
    // A replica whose DeviceProcess list has not completed: its cache is empty and not synced.
    let gw = gateway_over(Arc::new(Cache::new(15, Metrics::unregistered())));
    let served = "\"served-by-another-replica\"";
    gw.store
        .record_desired_etag("warm-dev", served)
        .await
        .expect("record the ETag last served");
    let token = token("warm-dev");
    let desired = |etag: &'static str| {
        Request::get("/v1/devices/warm-dev/desired")
            .header("x-device-token", &token)
            .header("if-none-match", etag)
            .body(Body::empty())
            .expect("request")
    };
    let response = gw
        .router
        .clone()
        .oneshot(desired(served))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(
        response.headers().get("etag").and_then(|v| v.to_str().ok()),
        Some(served)
    );
    assert_eq!(
        response
            .headers()
            .get("x-apollo-gateway")
            .and_then(|v| v.to_str().ok()),
        Some("0")
    );
    let other = gw.send(desired("\"something-else\"")).await;
    assert_eq!(
        other.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        other.body
    );
    let plain = gw
        .get_desired("warm-dev", Some(("x-device-token", token.clone())))
        .await;
    assert_eq!(plain.status, StatusCode::SERVICE_UNAVAILABLE);
    // Reports cannot be checked against an empty cache: 503 too, and nothing recorded.
    let report = gw
        .post("warm-dev", "report", &report_body(&[]), Some(&token))
        .await;
    assert_eq!(report.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!gw.recorded("warm-dev").await);
    assert!(gw.sink.outcomes().is_empty());
}

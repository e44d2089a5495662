//! A scriptable fake gateway on a real 127.0.0.1 socket, recording every request it receives.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use apollo_protocol::wire::{DesiredDocument, DesiredItem, ReportAck};
use apollo_protocol::DEVICE_TOKEN_HEADER;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;

pub const DEVICE: &str = "tor1-01";
pub const TOKEN: &str = "0123abcd";
/// Status recorded for a desired request the long poll is still holding.
pub const HELD: u16 = 0;

/// What the fake gateway does; tests change it while the agent runs.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub heartbeat_interval_seconds: u64,
    /// Hold a matching conditional GET until the document changes or the wait ends.
    pub long_poll: bool,
    /// Whether a 304 carries the ETag header (real gateways do; a broken proxy may not).
    pub etag_on_304: bool,
    /// Answer every request with 503 until then.
    pub fail_until: Option<Instant>,
    /// Answer this many further requests with 503 (after `fail_until`).
    pub fail_next: usize,
    /// `Retry-After` value sent with failures.
    pub retry_after: Option<String>,
    /// Names of DeviceProcesses whose observations a report ack lists as `ignored` (what a real
    /// gateway does for an object its cache does not hold).
    pub ignore: Vec<String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            heartbeat_interval_seconds: 60,
            long_poll: true,
            etag_on_304: true,
            fail_until: None,
            fail_next: 0,
            retry_after: None,
            ignore: Vec::new(),
        }
    }
}

/// One request as the fake gateway saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub kind: &'static str,
    pub if_none_match: Option<String>,
    pub wait_seconds: Option<u64>,
    pub token: Option<String>,
    pub traceparent: Option<String>,
    pub body: Option<serde_json::Value>,
    pub status: u16,
}

impl Seen {
    pub fn observed(&self) -> Vec<(String, String)> {
        self.body
            .as_ref()
            .and_then(|b| b["observations"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|o| {
                (
                    o["name"].as_str().unwrap_or_default().to_owned(),
                    o["observedSpecHash"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    }

    pub fn heartbeat(&self) -> bool {
        self.body
            .as_ref()
            .and_then(|b| b["heartbeat"].as_bool())
            .unwrap_or(false)
    }
}

struct Inner {
    behaviour: Behaviour,
    items: Vec<(String, String)>,
    generation: i64,
    seen: Vec<Seen>,
}

#[derive(Clone)]
pub struct FakeGateway {
    inner: Arc<Mutex<Inner>>,
    version: Arc<watch::Sender<u64>>,
    pub url: String,
}

pub fn hash(c: char) -> String {
    format!("sha256:{}", c.to_string().repeat(64))
}

/// Document items `(name, hash(c))` from `(name, c)` pairs.
fn items_of(items: &[(&str, char)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(n, h)| ((*n).to_owned(), hash(*h)))
        .collect()
}

/// Value of request header `name`, if present and readable as text.
fn header_of(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Sets the `ETag` header of `response` to `etag`.
fn set_etag(response: &mut Response, etag: &str) {
    if let Ok(v) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(header::ETAG, v);
    }
}

impl FakeGateway {
    /// Starts serving on an ephemeral 127.0.0.1 port.
    pub async fn start(behaviour: Behaviour, items: &[(&str, char)]) -> Self {
        let gateway = Self {
            inner: Arc::new(Mutex::new(Inner {
                behaviour,
                items: items_of(items),
                generation: 1,
                seen: Vec::new(),
            })),
            version: Arc::new(watch::channel(0).0),
            url: String::new(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let app = Router::new()
            .route("/v1/devices/{device}/desired", get(desired))
            .route("/v1/devices/{device}/report", post(report))
            .route("/v1/devices/{device}/connect", post(connect))
            .with_state(gateway.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, ..gateway }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn update(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.lock().behaviour);
    }

    /// Replaces the document's items and wakes held long polls.
    pub fn set_items(&self, items: &[(&str, char)]) {
        {
            let mut inner = self.lock();
            inner.items = items_of(items);
            inner.generation += 1;
        }
        self.version.send_modify(|v| *v += 1);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    pub fn seen_kind(&self, kind: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.kind == kind).collect()
    }

    /// Desired requests currently held open by the long poll.
    pub fn held_polls(&self) -> usize {
        self.seen_kind("desired")
            .iter()
            .filter(|s| s.status == HELD)
            .count()
    }

    fn document(&self) -> (DesiredDocument, String) {
        let inner = self.lock();
        let doc = DesiredDocument {
            device_name: DEVICE.into(),
            heartbeat_interval_seconds: inner.behaviour.heartbeat_interval_seconds,
            items: inner
                .items
                .iter()
                .map(|(name, h)| DesiredItem {
                    uid: format!("uid-{name}"),
                    namespace: "default".into(),
                    name: name.clone(),
                    generation: inner.generation,
                    spec: serde_json::json!({"name": name}),
                    spec_hash: h.clone(),
                })
                .collect(),
        };
        let etag = apollo_protocol::hash::desired_etag(
            doc.heartbeat_interval_seconds,
            doc.items.iter().map(|i| apollo_protocol::hash::EtagItem {
                namespace: &i.namespace,
                name: &i.name,
                generation: i.generation,
                spec_hash: &i.spec_hash,
            }),
        );
        (doc, etag)
    }

    /// Records the request; returns a failure response when the behaviour says so.
    fn record(
        &self,
        kind: &'static str,
        headers: &HeaderMap,
        wait_seconds: Option<u64>,
        body: Option<serde_json::Value>,
    ) -> (usize, Option<Response>) {
        let header = |name: &str| header_of(headers, name).map(str::to_owned);
        let mut inner = self.lock();
        let now = Instant::now();
        let failing = inner.behaviour.fail_until.is_some_and(|until| now < until)
            || inner.behaviour.fail_next > 0;
        if failing && inner.behaviour.fail_until.is_none_or(|until| now >= until) {
            inner.behaviour.fail_next -= 1;
        }
        inner.seen.push(Seen {
            at: now,
            kind,
            if_none_match: header("if-none-match"),
            wait_seconds,
            token: header(DEVICE_TOKEN_HEADER),
            traceparent: header("traceparent"),
            body,
            status: if failing { 503 } else { 200 },
        });
        let index = inner.seen.len() - 1;
        if !failing {
            return (index, None);
        }
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"error":{"code":"unavailable","message":"scripted failure"}}"#,
        )
            .into_response();
        if let Some(retry_after) = &inner.behaviour.retry_after {
            if let Ok(v) = HeaderValue::from_str(retry_after) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        (index, Some(response))
    }

    fn set_status(&self, index: usize, status: u16) {
        self.lock().seen[index].status = status;
    }

    /// Records a `kind` request (report or connect) and acknowledges it, unless the behaviour
    /// says to fail it.
    fn record_and_ack(
        &self,
        kind: &'static str,
        headers: &HeaderMap,
        body: serde_json::Value,
    ) -> Response {
        let ignored: Vec<apollo_protocol::wire::ObjectRef> = {
            let ignore = self.lock().behaviour.ignore.clone();
            body["observations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|o| ignore.iter().any(|name| o["name"] == name.as_str()))
                .map(|o| apollo_protocol::wire::ObjectRef {
                    namespace: o["namespace"].as_str().unwrap_or_default().to_owned(),
                    name: o["name"].as_str().unwrap_or_default().to_owned(),
                })
                .collect()
        };
        if let (_, Some(failure)) = self.record(kind, headers, None, Some(body)) {
            return failure;
        }
        let interval = self.lock().behaviour.heartbeat_interval_seconds;
        axum::Json(ReportAck {
            ack: true,
            heartbeat_interval_seconds: interval,
            ignored,
        })
        .into_response()
    }
}

#[derive(serde::Deserialize)]
struct DesiredQuery {
    #[serde(rename = "waitSeconds")]
    wait_seconds: Option<u64>,
}

async fn desired(
    State(gw): State<FakeGateway>,
    Query(query): Query<DesiredQuery>,
    headers: HeaderMap,
) -> Response {
    let (index, failure) = gw.record("desired", &headers, query.wait_seconds, None);
    if let Some(failure) = failure {
        return failure;
    }
    let mut version = gw.version.subscribe();
    let (mut doc, mut etag) = gw.document();
    let matches = |etag: &str| {
        header_of(&headers, header::IF_NONE_MATCH)
            .is_some_and(|v| apollo_protocol::hash::if_none_match_matches(v, etag))
    };
    let behaviour = gw.lock().behaviour.clone();
    if matches(&etag) {
        if let (true, Some(wait)) = (behaviour.long_poll, query.wait_seconds) {
            gw.set_status(index, HELD);
            let _ = tokio::time::timeout(Duration::from_secs(wait), version.changed()).await;
            (doc, etag) = gw.document();
        }
    }
    if matches(&etag) {
        gw.set_status(index, 304);
        let mut response = StatusCode::NOT_MODIFIED.into_response();
        if behaviour.etag_on_304 {
            set_etag(&mut response, &etag);
        }
        return response;
    }
    gw.set_status(index, 200);
    let mut response = axum::Json(doc).into_response();
    set_etag(&mut response, &etag);
    response
}

async fn report(
    State(gw): State<FakeGateway>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<serde_json::Value>,
) -> Response {
    gw.record_and_ack("report", &headers, body)
}

async fn connect(
    State(gw): State<FakeGateway>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<serde_json::Value>,
) -> Response {
    gw.record_and_ack("connect", &headers, body)
}

/// An agent configured for fast tests against `url`.
pub fn config(url: &str) -> apollo_agent::AgentConfig {
    let mut config = apollo_agent::AgentConfig::new(DEVICE, url.parse().expect("gateway url"));
    config.device_token = Some(TOKEN.into());
    config.poll_wait = Duration::from_secs(30);
    config.min_poll_interval = Duration::from_millis(100);
    config.request_timeout = Duration::from_secs(5);
    config.backoff.base = Duration::from_millis(100);
    config.backoff.cap = Duration::from_secs(1);
    config
}

/// A running in-process agent, cancelled on drop.
pub struct RunningAgent {
    pub cancel: tokio_util::sync::CancellationToken,
    pub metrics: Arc<apollo_agent::AgentMetrics>,
    pub task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningAgent {
    pub fn start(config: apollo_agent::AgentConfig) -> Self {
        let metrics = Arc::new(apollo_agent::AgentMetrics::default());
        let http = apollo_agent::http_client().expect("http client");
        let agent = apollo_agent::Agent::new(config, http, metrics.clone()).expect("agent");
        let cancel = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { agent.run(cancel).await }
        });
        Self {
            cancel,
            metrics,
            task: Some(task),
        }
    }

    /// Cancels and returns how long the agent took to stop.
    pub async fn stop(mut self) -> Duration {
        let started = Instant::now();
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("agent stops after cancellation")
                .expect("agent task did not panic");
        }
        started.elapsed()
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

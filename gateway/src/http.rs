//! The device HTTP API (v1) and the admin endpoints.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use apollo_protocol::hash::if_none_match_matches;
use apollo_protocol::wire::{
    ConnectRequest, ErrorBody, ErrorDetail, FieldError, Report, ReportAck,
};
use apollo_protocol::{GATEWAY_HEADER, MAX_REPORT_BYTES, MAX_WAIT_SECONDS};
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{BoxError, Router};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::auth::{Auth, AuthFailure};
use crate::cache::{Cache, ObservationCheck};
use crate::desired::DesiredSnapshot;
use crate::metrics::{Metrics, RequestLabels, RouteLabels};
use crate::model::ObjectKey;
use crate::projection::Shown;
use crate::state::{now_ms, ReportInput, ReportOutcome, StateStore, Store};

/// Route templates (the `route` label of request metrics).
pub const ROUTE_DESIRED: &str = "/v1/devices/{device}/desired";
/// See [`ROUTE_DESIRED`].
pub const ROUTE_REPORT: &str = "/v1/devices/{device}/report";
/// See [`ROUTE_DESIRED`].
pub const ROUTE_CONNECT: &str = "/v1/devices/{device}/connect";
/// Longest device name accepted (a Kubernetes object name).
const MAX_DEVICE_NAME_LEN: usize = 253;
/// Requests end with 408 after this, which no long poll reaches.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(MAX_WAIT_SECONDS + 30);

/// Receives the transitions a report decided (the status writer, or a test double).
pub trait ReportSink: Send + Sync + 'static {
    /// Called once per recorded report, after the store decided its transitions.
    /// `before` is what each DeviceProcess's status showed before the report was recorded.
    fn on_report(&self, device: &str, outcome: &ReportOutcome, before: &HashMap<ObjectKey, Shown>);
}

impl ReportSink for crate::status::StatusWriter {
    fn on_report(&self, device: &str, outcome: &ReportOutcome, before: &HashMap<ObjectKey, Shown>) {
        crate::status::StatusWriter::on_report(self, device, outcome, before);
    }
}

/// Everything the device handlers share.
pub struct DeviceApi {
    /// The watch cache.
    pub cache: Arc<Cache>,
    /// The shared state.
    pub store: Store,
    /// Where report transitions go.
    pub sink: Arc<dyn ReportSink>,
    /// Authentication.
    pub auth: Auth,
    /// Heartbeat interval told to agents.
    pub heartbeat_interval_seconds: u64,
    /// Metrics.
    pub metrics: Metrics,
    /// Ends long polls (with 304) on shutdown.
    pub shutdown: CancellationToken,
    /// Desired ETags to record in the store, off the request path.
    pub etag_records: mpsc::Sender<(String, String)>,
    /// This replica's ordinal, sent as X-Apollo-Gateway.
    pub ordinal: u32,
    /// Concurrent requests above which requests are shed with 503.
    pub max_concurrent_requests: usize,
    /// Log one info line per device request (method, path, status, latency).
    pub access_log: bool,
}

/// An error answered with the JSON envelope.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    fn invalid(error: FieldError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_field", error.to_string()).field(error.field)
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(1)
    }
}

impl From<AuthFailure> for ApiError {
    fn from(failure: AuthFailure) -> Self {
        match failure {
            AuthFailure::MissingToken => Self::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "missing device token (X-Device-Token or Authorization: Bearer)",
            ),
            AuthFailure::InvalidToken => Self::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "invalid device token",
            ),
            AuthFailure::WrongDevice => Self::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the token does not belong to this device",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                field: self.field,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"apollo-device\""),
            );
        }
        response
    }
}

/// The device API router with its layers: per-request span, metrics and X-Apollo-Gateway on
/// every response (503s and 408s included), request timeout, load shedding above the concurrency
/// limit.
pub fn device_router(api: Arc<DeviceApi>) -> Router {
    let ordinal = HeaderValue::from(api.ordinal);
    let metrics = api.metrics.clone();
    let limit = api.max_concurrent_requests;
    let outer = Arc::new(Outer {
        ordinal,
        metrics,
        access_log: api.access_log,
    });
    Router::new()
        .route(ROUTE_DESIRED, get(desired))
        .route(ROUTE_REPORT, post(report))
        .route(ROUTE_CONNECT, post(connect))
        .fallback(not_found)
        .with_state(api)
        .layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn_with_state(outer, observe))
                .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
                    let span = tracing::info_span!(
                        "gateway.request",
                        otel.kind = "server",
                        method = %req.method(),
                        path = %req.uri().path()
                    );
                    // Continue the agent's (and router's) trace: one trace per report.
                    apollo_telemetry::set_parent_from_headers(&span, req.headers());
                    span
                }))
                .layer(HandleErrorLayer::new(overloaded))
                .load_shed()
                .concurrency_limit(limit)
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::REQUEST_TIMEOUT,
                    REQUEST_TIMEOUT,
                )),
        )
}

struct Outer {
    ordinal: HeaderValue,
    metrics: Metrics,
    access_log: bool,
}

async fn observe(State(outer): State<Arc<Outer>>, request: Request, next: Next) -> Response {
    let route = route_label(request.uri().path());
    let start = Instant::now();
    let access = outer
        .access_log
        .then(|| (request.method().clone(), request.uri().path().to_owned()));
    let mut response = next.run(request).await;
    if let Some((method, path)) = access {
        tracing::info!(
            target: "apollo_gateway::access",
            "{method} {path} {} {:.1}ms",
            response.status().as_u16(),
            start.elapsed().as_secs_f64() * 1000.0
        );
    }
    response
        .headers_mut()
        .insert(GATEWAY_HEADER, outer.ordinal.clone());
    let labels = RequestLabels {
        route,
        code: response.status().as_u16(),
    };
    outer.metrics.requests.get_or_create(&labels).inc();
    outer
        .metrics
        .request_seconds
        .get_or_create(&RouteLabels { route })
        .observe(start.elapsed().as_secs_f64());
    response
}

async fn overloaded(_: BoxError) -> Response {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "too many concurrent requests",
    )
    .retry_after(1)
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// The metrics label of a request path.
pub fn route_label(path: &str) -> &'static str {
    let mut parts = path.trim_start_matches('/').split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("v1"), Some("devices"), Some(_), Some("desired"), None, None) => ROUTE_DESIRED,
        (Some("v1"), Some("devices"), Some(_), Some("report"), None, None) => ROUTE_REPORT,
        (Some("v1"), Some("devices"), Some(_), Some("connect"), None, None) => ROUTE_CONNECT,
        _ => "other",
    }
}

/// Device names become parts of state-store keys: Kubernetes-name characters only.
fn check_device(device: &str) -> Result<(), ApiError> {
    let ok = !device.is_empty()
        && device.len() <= MAX_DEVICE_NAME_LEN
        && device
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_device",
            "device names are 1-253 characters of letters, digits, '-', '.' and '_'",
        )
        .field("device"))
    }
}

fn if_none_match(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
}

fn not_modified(etag: &str) -> Response {
    let mut response = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(value) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

fn document(api: &DeviceApi, device: &str, snapshot: &DesiredSnapshot) -> Response {
    if snapshot.claim_etag_recording() {
        // Lets a replica that has not synced yet answer 304 from the store. Best effort: when
        // the recorder is behind, this document simply is not recorded.
        let _ = api
            .etag_records
            .try_send((device.to_owned(), snapshot.etag.clone()));
    }
    let mut response = Response::new(Body::from(snapshot.body.clone()));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(&snapshot.etag) {
        headers.insert(header::ETAG, value);
    }
    response
}

/// Counts a held long poll for as long as it lives.
struct Waiter<'a>(&'a Metrics);

impl<'a> Waiter<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.long_poll_waiters.inc();
        Self(metrics)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.long_poll_waiters.dec();
    }
}

async fn desired(
    State(api): State<Arc<DeviceApi>>,
    Path(device): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_device(&device)?;
    api.auth.check(&device, &headers)?;
    let wait_seconds = match query.get("waitSeconds") {
        None => 0,
        Some(raw) => raw.parse::<u64>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("waitSeconds {raw:?} is not a whole number of seconds"),
            )
            .field("waitSeconds")
        })?,
    }
    .min(MAX_WAIT_SECONDS);
    let deadline = Instant::now() + Duration::from_secs(wait_seconds);
    let presented = if_none_match(&headers);

    if !api.cache.is_synced() {
        if presented.is_some() && wait_seconds > 0 {
            tokio::select! {
                _ = api.cache.wait_synced() => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = api.shutdown.cancelled() => {}
            }
        }
        if !api.cache.is_synced() {
            return warm_start(&api, &device, presented).await;
        }
    }

    let mut updates = api.cache.subscribe(&device);
    let mut waiter = None;
    loop {
        let snapshot = updates.borrow_and_update().clone();
        let unchanged = presented.is_some_and(|p| if_none_match_matches(p, &snapshot.etag));
        if !unchanged {
            return Ok(document(&api, &device, &snapshot));
        }
        if Instant::now() >= deadline || api.shutdown.is_cancelled() {
            return Ok(not_modified(&snapshot.etag));
        }
        waiter.get_or_insert_with(|| Waiter::new(&api.metrics));
        tokio::select! {
            changed = updates.changed() => if changed.is_err() {
                // The device entry went away (cannot happen while we hold a receiver).
                return Ok(not_modified(&snapshot.etag));
            },
            _ = tokio::time::sleep_until(deadline) => return Ok(not_modified(&snapshot.etag)),
            _ = api.shutdown.cancelled() => return Ok(not_modified(&snapshot.etag)),
        }
    }
}

/// Before the cache has synced: a 304 when the presented tag is the one last served to this
/// device (by any replica), otherwise 503 so the agent comes back shortly.
async fn warm_start(
    api: &DeviceApi,
    device: &str,
    presented: Option<&str>,
) -> Result<Response, ApiError> {
    if let Some(presented) = presented {
        if let Ok(Some(etag)) = api.store.desired_etag(device).await {
            if if_none_match_matches(presented, &etag) {
                return Ok(not_modified(&etag));
            }
        }
    }
    Err(ApiError::unavailable(
        "the gateway is still loading DeviceProcesses",
    ))
}

/// Reads the body up to the report limit: 413 above it.
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    match Limited::new(body, MAX_REPORT_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request bodies are limited to {MAX_REPORT_BYTES} bytes"),
        )
        .field("body")),
        Err(error) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("reading the request body failed: {error}"),
        )
        .field("body")),
    }
}

/// What every device write checks first, in this order: a well-formed device name, a token for
/// that device (before any of the body is read), then the body within the size limit.
async fn authorized_body(
    api: &DeviceApi,
    device: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    check_device(device)?;
    api.auth.check(device, headers)?;
    read_body(body).await
}

async fn report(
    State(api): State<Arc<DeviceApi>>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = authorized_body(&api, &device, &headers, body).await?;
    let report = parse_report(&bytes).map_err(ApiError::invalid)?;
    report.validate().map_err(ApiError::invalid)?;
    record(&api, &device, &report).await
}

async fn connect(
    State(api): State<Arc<DeviceApi>>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = authorized_body(&api, &device, &headers, body).await?;
    let request = parse_connect(&bytes).map_err(ApiError::invalid)?;
    request.validate().map_err(ApiError::invalid)?;
    let report = Report {
        agent_version: request.agent_version,
        timestamp: String::new(),
        heartbeat: true,
        observations: Vec::new(),
    };
    record(&api, &device, &report).await
}

async fn record(api: &DeviceApi, device: &str, report: &Report) -> Result<Response, ApiError> {
    if !api.cache.is_synced() {
        // Observations cannot be checked against an empty cache; make the agent retry.
        return Err(ApiError::unavailable(
            "the gateway is still loading DeviceProcesses",
        ));
    }
    let (known, ignored) = match api.cache.check_observations(device, &report.observations) {
        ObservationCheck::Foreign { index } => {
            let o = &report.observations[index];
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "DeviceProcess {}/{} is bound to another device; nothing from this report was recorded",
                    o.namespace, o.name
                ),
            )
            .field(format!("observations[{index}]")));
        }
        ObservationCheck::Accepted { known, ignored } => (known, ignored),
    };
    // One hash per object: the last one listed wins, so a repeated entry is not two changes.
    let mut observations: Vec<(ObjectKey, String)> = Vec::with_capacity(known.len());
    for i in known {
        let o = &report.observations[i];
        let key = ObjectKey::new(o.namespace.as_str(), o.name.as_str());
        observations.retain(|(k, _)| *k != key);
        observations.push((key, o.observed_spec_hash.clone()));
    }
    let input = ReportInput {
        device,
        now_ms: now_ms(),
        agent_version: &report.agent_version,
        observations,
    };
    let before = api.cache.shown_for_device(device);
    let outcome = api.store.record_report(&input).await.map_err(|error| {
        tracing::warn!(%device, %error, "recording a report failed");
        ApiError::unavailable("the state store is unavailable")
    })?;
    api.sink.on_report(device, &outcome, &before);
    Ok(axum::Json(ReportAck {
        ack: true,
        heartbeat_interval_seconds: api.heartbeat_interval_seconds,
        ignored,
    })
    .into_response())
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn parse_object(bytes: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, FieldError> {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(field_error("body", "must be a JSON object")),
        Err(error) => Err(field_error("body", format!("malformed JSON: {error}"))),
    }
}

fn require_string(
    map: &serde_json::Map<String, serde_json::Value>,
    name: &str,
    path: &str,
) -> Result<(), FieldError> {
    match map.get(name) {
        Some(serde_json::Value::String(_)) => Ok(()),
        Some(_) => Err(field_error(path, "must be a string")),
        None => Err(field_error(path, "is required")),
    }
}

/// Parses a report body, naming the field at fault for anything malformed.
pub fn parse_report(bytes: &[u8]) -> Result<Report, FieldError> {
    let map = parse_object(bytes)?;
    require_string(&map, "agentVersion", "agentVersion")?;
    require_string(&map, "timestamp", "timestamp")?;
    match map.get("heartbeat") {
        None | Some(serde_json::Value::Bool(_)) => {}
        Some(_) => return Err(field_error("heartbeat", "must be a boolean")),
    }
    match map.get("observations") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let serde_json::Value::Object(o) = item else {
                    return Err(field_error(
                        format!("observations[{i}]"),
                        "must be an object",
                    ));
                };
                for name in ["namespace", "name", "observedSpecHash"] {
                    require_string(o, name, &format!("observations[{i}].{name}"))?;
                }
            }
        }
        Some(_) => return Err(field_error("observations", "must be an array")),
    }
    let mut map = map;
    if map
        .get("observations")
        .is_some_and(serde_json::Value::is_null)
    {
        map.remove("observations");
    }
    serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|error| field_error("body", error.to_string()))
}

/// Parses a connect body, naming the field at fault.
pub fn parse_connect(bytes: &[u8]) -> Result<ConnectRequest, FieldError> {
    let map = parse_object(bytes)?;
    require_string(&map, "agentVersion", "agentVersion")?;
    serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|error| field_error("body", error.to_string()))
}

/// Shared by the admin handlers.
pub struct AdminState {
    /// The watch cache (ready once synced).
    pub cache: Arc<Cache>,
    /// The shared state (ready once it answers).
    pub store: Store,
    /// Rendered by /metrics.
    pub registry: Registry,
}

/// `/healthz`, `/readyz`, `/metrics`.
pub fn admin_router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let synced = state.cache.is_synced();
    let store = matches!(
        tokio::time::timeout(Duration::from_secs(1), state.store.ping()).await,
        Ok(Ok(()))
    );
    let body = serde_json::json!({
        "ready": synced && store,
        "cacheSynced": synced,
        "stateStore": store,
    });
    let status = if synced && store {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &state.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_are_templates() {
        assert_eq!(route_label("/v1/devices/tor1-01/desired"), ROUTE_DESIRED);
        assert_eq!(route_label("/v1/devices/x/report"), ROUTE_REPORT);
        assert_eq!(route_label("/v1/devices/x/connect"), ROUTE_CONNECT);
        assert_eq!(route_label("/v1/devices/x/other"), "other");
        assert_eq!(route_label("/v1/devices/x/desired/more"), "other");
    }

    #[test]
    fn report_parsing_names_the_field() {
        let field = |body: &str| {
            parse_report(body.as_bytes())
                .map(|_| ())
                .map_err(|e| e.field)
        };
        assert_eq!(field("{"), Err("body".into()));
        assert_eq!(field("[]"), Err("body".into()));
        assert_eq!(field(r#"{"timestamp":"x"}"#), Err("agentVersion".into()));
        assert_eq!(
            field(r#"{"agentVersion":1,"timestamp":"x"}"#),
            Err("agentVersion".into())
        );
        assert_eq!(field(r#"{"agentVersion":"1"}"#), Err("timestamp".into()));
        assert_eq!(
            field(r#"{"agentVersion":"1","timestamp":"x","heartbeat":"yes"}"#),
            Err("heartbeat".into())
        );
        assert_eq!(
            field(r#"{"agentVersion":"1","timestamp":"x","observations":{}}"#),
            Err("observations".into())
        );
        assert_eq!(
            field(
                r#"{"agentVersion":"1","timestamp":"x","observations":[{"namespace":"a","name":"b"}]}"#
            ),
            Err("observations[0].observedSpecHash".into())
        );
        assert_eq!(
            field(r#"{"agentVersion":"1","timestamp":"x","observations":null}"#),
            Ok(())
        );
        let bad_time = parse_report(br#"{"agentVersion":"1","timestamp":"x"}"#).expect("shape ok");
        assert_eq!(
            bad_time.validate().map_err(|e| e.field),
            Err("timestamp".into())
        );
    }

    #[test]
    fn connect_parsing_names_the_field() {
        assert_eq!(
            parse_connect(b"{}").map_err(|e| e.field).err(),
            Some("agentVersion".into())
        );
        assert!(parse_connect(br#"{"agentVersion":"1"}"#).is_ok());
    }

    #[test]
    fn device_names_are_checked() {
        assert!(check_device("tor1-01.site_a").is_ok());
        assert!(check_device("").is_err());
        assert!(check_device("a{b}").is_err());
        assert!(check_device(&"a".repeat(254)).is_err());
    }
}

//! The device HTTP API (v1): the router and its layers ([`device_router`]), the handlers of
//! `desired` ([`desired`]) and of `report`/`connect` ([`report`]), request parsing ([`parse`]),
//! device-token checks ([`auth`]), the desired documents and their ETags ([`document`]) and the
//! error envelope ([`errors`]).

pub mod auth;
pub mod budget;
pub mod desired;
pub mod document;
pub mod errors;
pub mod parse;
pub mod report;

pub use errors::ApiError;
pub use parse::{parse_connect, parse_report};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use apollo_protocol::{GATEWAY_HEADER, MAX_WAIT_SECONDS};
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use http::{HeaderValue, StatusCode};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;

use crate::api::auth::Auth;
use crate::api::desired::desired;
use crate::api::report::{connect, report};
use crate::cache::Cache;
use crate::metrics::{Metrics, RequestLabels, RouteLabels};
use crate::model::ObjectKey;
use crate::state::{ReportOutcome, Store};
use crate::status::projection::Shown;

/// Route templates (the `route` label of request metrics).
pub const ROUTE_DESIRED: &str = "/v1/devices/{device}/desired";
/// See [`ROUTE_DESIRED`].
pub const ROUTE_REPORT: &str = "/v1/devices/{device}/report";
/// See [`ROUTE_DESIRED`].
pub const ROUTE_CONNECT: &str = "/v1/devices/{device}/connect";
/// Longest device name accepted (a Kubernetes object name).
/// Requests end with 408 after this, which no long poll reaches.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(MAX_WAIT_SECONDS + 30);

/// Receives the transitions a report decided (the status writer, or a test double).
pub trait ReportSink: Send + Sync + 'static {
    /// Called once per recorded report, after the store decided its transitions.
    /// `before` is what each DeviceProcess's status showed before the report was recorded.
    fn on_report(&self, device: &str, outcome: &ReportOutcome, before: &HashMap<ObjectKey, Shown>);
}

impl ReportSink for crate::status::StatusWriter {
    fn on_report(
        &self,
        _device: &str,
        outcome: &ReportOutcome,
        before: &HashMap<ObjectKey, Shown>,
    ) {
        let _ = before; // kept in the pending records by the store (see ShownBefore)
        crate::status::StatusWriter::on_report(self, outcome);
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
    /// What the replica serves at once (requests, long polls, long polls per device).
    pub budgets: budget::Budgets,
    /// Largest accepted distance of a report's timestamp from the gateway's clock (zero: any).
    pub max_report_clock_skew: Duration,
    /// Log one info line per device request (method, path, status, latency).
    pub access_log: bool,
}

/// The device API router with its layers: per-request span (`info` only while spans are exported,
/// [`apollo_telemetry::request_span`]), metrics and X-Apollo-Gateway on
/// every response (503s and 408s included), request timeout. Load is shed by the handlers, per
/// budget ([`budget`]).
pub fn device_router(api: Arc<DeviceApi>) -> Router {
    let ordinal = HeaderValue::from(api.ordinal);
    let metrics = api.metrics.clone();
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
    let span = apollo_telemetry::request_span!(
        "gateway.request",
        otel.kind = "server",
        method = %request.method(),
        path = %request.uri().path()
    );
    // Continue the agent's (and router's) trace: one trace per report.
    apollo_telemetry::set_parent_from_headers(&span, request.headers());
    let mut response = next.run(request).instrument(span).await;
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
}

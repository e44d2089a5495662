//! The one admin router of gateway, router and controller: `/healthz` (the process serves),
//! `/readyz` (every readiness check of the process passes; a JSON body names each) and `/metrics`
//! (the process's prometheus-client registry as OpenMetrics text).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ServeOptions;

/// Content type of the OpenMetrics text exposition.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long open admin connections (a scrape in flight) get after shutdown.
const ADMIN_DRAIN: Duration = Duration::from_secs(1);

/// `--admin-listen`, shared by every binary with admin endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct AdminArgs {
    /// Address of the admin endpoints (`/healthz`, `/readyz`, `/metrics`).
    #[arg(
        id = "admin_listen",
        long = "admin-listen",
        env = "APOLLO_ADMIN_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub listen: SocketAddr,
}

/// What `/readyz` reports: named checks; the process is ready when all pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    checks: Vec<(&'static str, bool)>,
}

impl Readiness {
    /// No checks yet (ready).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the check `name` (a camelCase key of the JSON body).
    pub fn check(mut self, name: &'static str, passed: bool) -> Self {
        self.checks.push((name, passed));
        self
    }

    /// Whether every check passed.
    pub fn is_ready(&self) -> bool {
        self.checks.iter().all(|(_, passed)| *passed)
    }

    /// `{"ready": <all passed>, "<check>": <passed>, ...}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut body = serde_json::Map::new();
        body.insert("ready".to_owned(), self.is_ready().into());
        for (name, passed) in &self.checks {
            body.insert((*name).to_owned(), (*passed).into());
        }
        body.into()
    }
}

struct AdminState<R> {
    registry: Arc<Registry>,
    readiness: R,
}

/// `/healthz`, `/readyz` and `/metrics` over `registry`; `readiness` is asked on every `/readyz`
/// (200 when ready, else 503).
pub fn router<R, Fut>(registry: Arc<Registry>, readiness: R) -> Router
where
    R: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Readiness> + Send + 'static,
{
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<R, Fut>))
        .route("/metrics", get(metrics::<R>))
        .with_state(Arc::new(AdminState {
            registry,
            readiness,
        }))
}

async fn readyz<R, Fut>(State(state): State<Arc<AdminState<R>>>) -> Response
where
    R: Fn() -> Fut,
    Fut: Future<Output = Readiness>,
{
    let readiness = (state.readiness)().await;
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness.to_json())).into_response()
}

async fn metrics<R>(State(state): State<Arc<AdminState<R>>>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(error) => {
            tracing::warn!(%error, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then gives open connections a second.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    crate::serve(
        listener,
        move |_peer| hyper_util::service::TowerToHyperService::new(router.clone()),
        ServeOptions {
            drain: ADMIN_DRAIN,
            ..ServeOptions::default()
        },
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower::ServiceExt;

    async fn get_path(app: &Router, path: &str) -> (StatusCode, Option<String>, String) {
        let response = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (
            status,
            content_type,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    #[tokio::test]
    async fn readiness_is_asked_on_every_request_and_metrics_render() {
        let mut registry = Registry::with_prefix("apollo_test");
        let gauge = Gauge::<i64>::default();
        registry.register("up", "Whether the test is up", gauge.clone());
        gauge.set(1);
        let synced = Arc::new(AtomicBool::new(false));
        let app = {
            let synced = synced.clone();
            router(Arc::new(registry), move || {
                let synced = synced.load(Ordering::SeqCst);
                async move {
                    Readiness::new()
                        .check("cacheSynced", synced)
                        .check("stateStore", true)
                }
            })
        };

        let (status, _, body) = get_path(&app, "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));

        let (status, content_type, body) = get_path(&app, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(content_type.as_deref(), Some("application/json"));
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"ready": false, "cacheSynced": false, "stateStore": true})
        );

        synced.store(true, Ordering::SeqCst);
        let (status, _, body) = get_path(&app, "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        let body: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(body["ready"], true);

        let (status, content_type, body) = get_path(&app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some(OPENMETRICS));
        assert!(body.contains("apollo_test_up 1"), "{body}");
        assert_eq!(get_path(&app, "/other").await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn serves_on_a_real_socket_until_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let app = router(Arc::new(Registry::default()), || async { Readiness::new() });
        let server = tokio::spawn(serve(listener, app, shutdown.clone()));
        let body = reqwest::get(format!("http://{addr}/readyz"))
            .await
            .expect("readyz")
            .text()
            .await
            .expect("body");
        assert_eq!(body, r#"{"ready":true}"#);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("stops")
            .expect("no panic");
    }
}

//! Admin endpoints: `/healthz` (the process serves), `/readyz` (every watch cache has synced),
//! `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// Content type of the OpenMetrics text exposition.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct AdminState {
    registry: Arc<Registry>,
    ready: watch::Receiver<bool>,
}

/// The admin router. `ready` turns true once the caches have synced.
pub fn router(registry: Arc<Registry>, ready: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { registry, ready })
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if *state.ready.borrow() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced\n")
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(error) => {
            tracing::warn!(%error, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get_path(app: &Router, path: &str) -> (StatusCode, String) {
        let response = app
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readiness_follows_cache_sync_and_metrics_render() {
        let mut registry = Registry::default();
        let metrics = crate::metrics::Metrics::register(&mut registry);
        metrics.set_leader(true);
        let (ready_tx, ready_rx) = watch::channel(false);
        let app = router(Arc::new(registry), ready_rx);

        assert_eq!(get_path(&app, "/healthz").await.0, StatusCode::OK);
        assert_eq!(
            get_path(&app, "/readyz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        ready_tx.send_replace(true);
        assert_eq!(get_path(&app, "/readyz").await.0, StatusCode::OK);
        let (status, body) = get_path(&app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("apollo_controller_leader 1"), "{body}");
    }
}

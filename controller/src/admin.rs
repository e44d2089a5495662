//! Admin endpoints: the shared admin router, ready once every watch cache has synced
//! (`/readyz` body `{"ready": .., "cachesSynced": ..}`).

use std::sync::Arc;

use apollo_runtime::shell::admin::{self, Readiness};
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// `/healthz`, `/readyz` and `/metrics`. `ready` turns true once the caches have synced.
pub fn router(registry: Arc<Registry>, ready: watch::Receiver<bool>) -> Router {
    admin::router(registry, move || {
        let readiness = Readiness::new().check("cachesSynced", *ready.borrow());
        async move { readiness }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
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

//! The gateway's admin endpoints: `/healthz`, `/readyz` (cache synced and store answering),
//! `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::{header, StatusCode};
use prometheus_client::registry::Registry;

use crate::cache::Cache;
use crate::state::{StateStore, Store};

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

//! The gateway's admin endpoints, served by the runtime's one admin router: `/healthz`,
//! `/metrics`, and `/readyz` with two named checks — `cacheSynced` (the DeviceProcess watch has
//! listed everything) and `stateStore` (the shared state answers a ping within a second).

use std::sync::Arc;
use std::time::Duration;

use apollo_runtime::shell::admin::{self, Readiness};
use axum::Router;
use prometheus_client::registry::Registry;

use crate::cache::Cache;
use crate::state::{StateStore, Store};

/// How long `/readyz` waits for the state store's answer.
const STORE_PING_TIMEOUT: Duration = Duration::from_secs(1);

/// `/healthz`, `/readyz`, `/metrics` over `registry`; readiness asks `cache` and `store` on every
/// request.
pub fn router(registry: Arc<Registry>, cache: Arc<Cache>, store: Store) -> Router {
    admin::router(registry, move || readiness(cache.clone(), store.clone()))
}

/// The gateway's readiness checks.
pub async fn readiness(cache: Arc<Cache>, store: Store) -> Readiness {
    let synced = cache.is_synced();
    let store = matches!(
        tokio::time::timeout(STORE_PING_TIMEOUT, store.ping()).await,
        Ok(Ok(()))
    );
    Readiness::new()
        .check("cacheSynced", synced)
        .check("stateStore", store)
}

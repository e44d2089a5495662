//! The router's admin endpoints: the shared admin router, ready once the membership has been read
//! from Redis and names at least one live gateway replica.

use std::sync::Arc;

use apollo_runtime::shell::admin::{self, Readiness};
use prometheus_client::registry::Registry;

use crate::membership::Membership;

/// `/healthz`, `/readyz` (`membershipRead`, `gatewayAlive`) and `/metrics` over `registry`.
pub fn router(membership: Membership, registry: Arc<Registry>) -> axum::Router {
    admin::router(registry, move || {
        let snapshot = membership.current();
        let readiness = Readiness::new()
            .check("membershipRead", snapshot.refreshed_at.is_some())
            .check("gatewayAlive", !snapshot.view.alive.is_empty());
        async move { readiness }
    })
}

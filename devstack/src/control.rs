//! apollo-dev's control endpoint, so a second terminal can stop and start agents:
//! `scripts/dev.sh agent stop tor1-02` posts to `POST /agents/tor1-02/stop`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::Stack;

/// Serves the control endpoint on `addr` until `shutdown`.
pub async fn serve(
    stack: Arc<Stack>,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/status", get(status))
        .route("/agents/{device}/stop", post(stop_agent))
        .route("/agents/{device}/start", post(start_agent))
        .with_state(stack);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

async fn status(State(stack): State<Arc<Stack>>) -> Json<serde_json::Value> {
    Json(json!({
        "kubeconfig": stack.kubeconfig(),
        "apiserver": stack.apiserver_url(),
        "jaeger": stack.jaeger().map(|j| j.ui_url()),
        "router": stack.router_url(),
        "gateways": stack.gateways().ordinals(),
        "agents": stack.running_agents(),
    }))
}

async fn stop_agent(
    State(stack): State<Arc<Stack>>,
    Path(device): Path<String>,
) -> (StatusCode, String) {
    if stack.stop_agent(&device).await {
        (StatusCode::OK, format!("agent {device} stopped\n"))
    } else {
        (
            StatusCode::NOT_FOUND,
            format!("no running agent for {device}\n"),
        )
    }
}

async fn start_agent(
    State(stack): State<Arc<Stack>>,
    Path(device): Path<String>,
) -> (StatusCode, String) {
    if stack.running_agents().contains(&device) {
        return (
            StatusCode::CONFLICT,
            format!("agent {device} is already running\n"),
        );
    }
    match stack.start_agent(&device) {
        Ok(()) => (StatusCode::OK, format!("agent {device} started\n")),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
    }
}

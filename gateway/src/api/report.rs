//! `POST /v1/devices/{device}/report` and `/connect`: name, token, then body (in that order),
//! observations checked against the cache (another device's: 403, nothing recorded), one round
//! trip to the state store, and the transitions it decided handed to the status writer.

use std::sync::Arc;

use apollo_protocol::wire::{Report, ReportAck};
use apollo_protocol::MAX_REPORT_BYTES;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::api::errors::ApiError;
use crate::api::parse::{check_device, parse_connect, parse_report};
use crate::api::DeviceApi;
use crate::cache::ObservationCheck;
use crate::model::ObjectKey;
use crate::state::{ReportInput, ShownBefore, StateStore};

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

pub(crate) async fn report(
    State(api): State<Arc<DeviceApi>>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let _permit = api.budgets.request()?;
    let bytes = authorized_body(&api, &device, &headers, body).await?;
    let report = parse_report(&bytes).map_err(ApiError::invalid)?;
    report.validate().map_err(ApiError::invalid)?;
    record(&api, &device, &report).await
}

pub(crate) async fn connect(
    State(api): State<Arc<DeviceApi>>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let _permit = api.budgets.request()?;
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
        return Err(ApiError::not_ready(
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
    // What the statuses showed before this report: kept with the transitions it decides, so
    // their Events are decided on this evidence however late they are delivered.
    let before = api.cache.shown_for_device(device);
    let shown = ShownBefore {
        connected: !before.is_empty() && before.values().all(|s| s.connected),
        observed: observations
            .iter()
            .filter(|(key, hash)| {
                before.get(key).and_then(|s| s.observed_hash.as_ref()) == Some(hash)
            })
            .map(|(key, _)| key.clone())
            .collect(),
    };
    let input = ReportInput {
        device,
        now_ms: api.store.clock().now_ms(),
        agent_version: &report.agent_version,
        observations,
        shown,
    };
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

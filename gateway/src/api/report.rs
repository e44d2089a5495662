//! `POST /v1/devices/{device}/report` and `/connect`: name, token, then body (in that order),
//! observations checked against the cache (another device's: 403, nothing recorded), one round
//! trip to the state store, and the transitions it decided handed to the status writer.

use std::sync::Arc;
use std::time::Duration;

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
    check_json(headers)?;
    read_body(body).await
}

/// The body must be declared JSON (`application/json`, parameters allowed): 415 otherwise.
fn check_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let declared = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = declared.split(';').next().unwrap_or("").trim();
    if media.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!("the body must be application/json, not {declared:?}"),
    ))
}

/// A report dated further than `max` from `now_ms` (both on the gateway's clock) is refused:
/// replayed, or from a device whose clock is far off. `max` zero accepts any date.
fn check_timestamp(timestamp: &str, now_ms: i64, max: Duration) -> Result<(), ApiError> {
    if max.is_zero() || timestamp.is_empty() {
        return Ok(());
    }
    // validate() already refused a timestamp that does not parse.
    let Ok(at) = timestamp.parse::<jiff::Timestamp>() else {
        return Ok(());
    };
    let off_ms = (at.as_millisecond() - now_ms).unsigned_abs();
    if u128::from(off_ms) <= max.as_millis() {
        return Ok(());
    }
    let direction = if at.as_millisecond() > now_ms {
        "ahead of"
    } else {
        "behind"
    };
    Err(ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_field",
        format!(
            "timestamp {timestamp} is {}s {direction} the gateway's clock (at most {}s allowed); \
             nothing was recorded",
            off_ms / 1000,
            max.as_secs()
        ),
    )
    .field("timestamp"))
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
    check_timestamp(
        &report.timestamp,
        api.store.clock().now_ms(),
        api.max_report_clock_skew,
    )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-12-03T12:00:00Z";

    fn now_ms() -> i64 {
        NOW.parse::<jiff::Timestamp>()
            .expect("now")
            .as_millisecond()
    }

    #[test]
    fn timestamps_far_from_the_gateway_clock_are_refused_naming_the_field() {
        let day = Duration::from_secs(86_400);
        assert!(check_timestamp("2026-12-03T11:00:00Z", now_ms(), day).is_ok());
        assert!(check_timestamp("2026-12-04T11:59:59Z", now_ms(), day).is_ok());
        for far in [
            "2999-01-01T00:00:00Z",
            "2020-01-01T00:00:00Z",
            "2026-12-04T12:00:01Z",
        ] {
            let refused = check_timestamp(far, now_ms(), day).expect_err(far);
            assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        }
        assert!(check_timestamp("2020-01-01T00:00:00Z", now_ms(), Duration::ZERO).is_ok());
        assert!(
            check_timestamp("", now_ms(), day).is_ok(),
            "connect has no timestamp"
        );
    }

    #[test]
    fn only_bodies_declared_json_are_read() {
        let with = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, value.parse().expect("header"));
            h
        };
        assert!(check_json(&with("application/json")).is_ok());
        assert!(check_json(&with("Application/JSON; charset=utf-8")).is_ok());
        for bad in [
            "text/plain",
            "application/jsonx",
            "application/x-www-form-urlencoded",
        ] {
            let refused = check_json(&with(bad)).expect_err(bad);
            assert_eq!(refused.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        }
        assert!(check_json(&HeaderMap::new()).is_err(), "undeclared");
    }
}

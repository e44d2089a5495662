//! `GET /v1/devices/{device}/desired`: the document from memory, 304 with the ETag, long polls
//! held until the document changes, and the warm start from the ETag in the store before the
//! cache has synced.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use apollo_protocol::hash::if_none_match_matches;
use apollo_protocol::MAX_WAIT_SECONDS;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use tokio::time::Instant;

use crate::api::document::DesiredSnapshot;
use crate::api::errors::ApiError;
use crate::api::parse::check_device;
use crate::api::DeviceApi;
use crate::metrics::Metrics;
use crate::state::StateStore;

fn if_none_match(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
}

fn not_modified(etag: &str) -> Response {
    let mut response = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(value) = HeaderValue::from_str(etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

fn document(api: &DeviceApi, device: &str, snapshot: &DesiredSnapshot) -> Response {
    if snapshot.claim_etag_recording() {
        // Lets a replica that has not synced yet answer 304 from the store. Best effort: when
        // the recorder is behind, this document simply is not recorded.
        let _ = api
            .etag_records
            .try_send((device.to_owned(), snapshot.etag.clone()));
    }
    let mut response = Response::new(Body::from(snapshot.body.clone()));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(&snapshot.etag) {
        headers.insert(header::ETAG, value);
    }
    response
}

/// Counts a held long poll for as long as it lives.
struct Waiter<'a>(&'a Metrics);

impl<'a> Waiter<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.long_poll_waiters.inc();
        Self(metrics)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.long_poll_waiters.dec();
    }
}

/// `waitSeconds` of the query. The hot path: a plain scan of `key=value` pairs, no allocation;
/// only a query with escapes (`%`, `+`) goes through the full form decoding. The last occurrence
/// wins either way, as in a decoded map.
fn wait_seconds_param(uri: &Uri) -> Result<Option<Cow<'_, str>>, ApiError> {
    let Some(query) = uri.query() else {
        return Ok(None);
    };
    if !query.contains(['%', '+']) {
        return Ok(query
            .split('&')
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .rfind(|(key, _)| *key == "waitSeconds")
            .map(|(_, value)| Cow::Borrowed(value)));
    }
    let Query(map) = Query::<HashMap<String, String>>::try_from_uri(uri).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", e.body_text()).field("waitSeconds")
    })?;
    Ok(map.get("waitSeconds").cloned().map(Cow::Owned))
}

// The request itself is taken last (not a `HeaderMap`, which axum would clone for every poll):
// its headers and query are read in place.
pub(crate) async fn desired(
    State(api): State<Arc<DeviceApi>>,
    Path(device): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let request_permit = api.budgets.request()?;
    check_device(&device)?;
    let headers = request.headers();
    api.auth.check(&device, headers)?;
    let wait_seconds = match wait_seconds_param(request.uri())? {
        None => 0,
        Some(raw) => raw.parse::<u64>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("waitSeconds {raw:?} is not a whole number of seconds"),
            )
            .field("waitSeconds")
        })?,
    }
    .min(MAX_WAIT_SECONDS);
    let deadline = Instant::now() + Duration::from_secs(wait_seconds);
    let presented = if_none_match(headers);

    // A request that waits gives its request permit back and holds a long-poll permit instead.
    let mut request_permit = Some(request_permit);
    let mut long_poll = None;
    if !api.cache.is_synced() {
        if presented.is_some() && wait_seconds > 0 {
            request_permit.take();
            long_poll = Some(api.budgets.long_poll(&device)?);
            tokio::select! {
                _ = api.cache.wait_synced() => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = api.shutdown.cancelled() => {}
            }
        }
        if !api.cache.is_synced() {
            return warm_start(&api, &device, presented).await;
        }
    }

    let mut updates = api.cache.subscribe(&device);
    let mut waiter = None;
    loop {
        let snapshot = updates.borrow_and_update().clone();
        let unchanged = presented.is_some_and(|p| if_none_match_matches(p, &snapshot.etag));
        if !unchanged {
            return Ok(document(&api, &device, &snapshot));
        }
        if Instant::now() >= deadline || api.shutdown.is_cancelled() {
            return Ok(not_modified(&snapshot.etag));
        }
        if long_poll.is_none() {
            request_permit.take();
            long_poll = Some(api.budgets.long_poll(&device)?);
        }
        waiter.get_or_insert_with(|| Waiter::new(&api.metrics));
        tokio::select! {
            changed = updates.changed() => if changed.is_err() {
                // The device entry went away (cannot happen while we hold a receiver).
                return Ok(not_modified(&snapshot.etag));
            },
            _ = tokio::time::sleep_until(deadline) => return Ok(not_modified(&snapshot.etag)),
            _ = api.shutdown.cancelled() => return Ok(not_modified(&snapshot.etag)),
        }
    }
}

/// Before the cache has synced: a 304 when the presented tag is the one last served to this
/// device (by any replica), otherwise 503 so the agent comes back shortly.
async fn warm_start(
    api: &DeviceApi,
    device: &str,
    presented: Option<&str>,
) -> Result<Response, ApiError> {
    if let Some(presented) = presented {
        if let Ok(Some(etag)) = api.store.desired_etag(device).await {
            if if_none_match_matches(presented, &etag) {
                return Ok(not_modified(&etag));
            }
        }
    }
    Err(ApiError::not_ready(
        "the gateway is still loading DeviceProcesses",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(uri: &str) -> Option<String> {
        let uri: Uri = uri.parse().expect("uri");
        wait_seconds_param(&uri)
            .expect("parses")
            .map(|v| v.into_owned())
    }

    #[test]
    fn wait_seconds_is_read_from_the_query_as_a_decoded_map_would() {
        assert_eq!(wait("/v1/devices/d/desired"), None);
        assert_eq!(
            wait("/v1/devices/d/desired?waitSeconds=30"),
            Some("30".into())
        );
        assert_eq!(wait("/x?a=1&waitSeconds=5&b"), Some("5".into()));
        assert_eq!(wait("/x?waitSeconds=1&waitSeconds=2"), Some("2".into()));
        assert_eq!(wait("/x?waitSeconds"), Some(String::new()));
        assert_eq!(wait("/x?waitseconds=3"), None);
        // Escapes take the full decoding.
        assert_eq!(wait("/x?waitSeconds=%33%30"), Some("30".into()));
        assert_eq!(wait("/x?wait%53econds=7"), Some("7".into()));
        assert_eq!(wait("/x?waitSeconds=1+2"), Some("1 2".into()));
    }
}

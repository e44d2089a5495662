//! The proxy itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apollo_protocol::shard::slot;
use apollo_protocol::wire::ErrorBody;
use apollo_protocol::MAX_REPORT_BYTES;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tracing::{debug, warn, Instrument};

use crate::membership::Membership;
use crate::metrics::{Metrics, RefusedLabels, Upstream, UpstreamLabels};
use crate::PeerAddr;

/// Response body type of both listeners.
pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Connection-level headers that must not be forwarded (RFC 9110 §7.6.1), plus `host`, which the
/// upstream URI replaces.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Forwards device requests to the replica that owns the device.
pub struct Proxy {
    membership: Membership,
    metrics: Arc<Metrics>,
    client: Client<HttpConnector, Full<Bytes>>,
    fallback_hold: Duration,
    body_read_timeout: Duration,
    /// Replicas that failed recently: skipped until the instant passes.
    held_down: Mutex<HashMap<u32, Instant>>,
}

/// Reset streams an upstream connection remembers (see [`Proxy::new`]): the gateway's default
/// `--max-concurrent-streams` per connection.
const UPSTREAM_RESET_STREAMS: usize = 100_000;

impl Proxy {
    /// A proxy routing by `membership`, with an HTTP/2 (prior knowledge) pool to the replicas.
    pub fn new(
        membership: Membership,
        metrics: Arc<Metrics>,
        connect_timeout: Duration,
        fallback_hold: Duration,
        body_read_timeout: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .http2_only(true)
            // Long polls are idle for up to a minute: pings find dead peers without cutting them.
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            .http2_keep_alive_while_idle(true)
            // One connection per replica carries the requests of tens of thousands of agents.
            // When agents give up on requests (client timeouts under overload), the router
            // cancels their upstream streams; h2 remembers only 50 reset streams by default, so
            // the replica's answers already in flight for the others arrive on forgotten
            // streams and h2 resets them again as protocol errors. It counts those over the
            // connection's whole life and at 1,024 closes it with GOAWAY, failing every stream
            // on it: seen at ~47,000 agents (`locally-reset streams reached limit (1024)` in
            // the router's log, then a wave of 502s and retries). Remember every stream a
            // connection can have open, and do not count: the peer is our own gateway.
            .http2_max_concurrent_reset_streams(UPSTREAM_RESET_STREAMS)
            .http2_max_local_error_reset_streams(None)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self {
            membership,
            metrics,
            client,
            fallback_hold,
            body_read_timeout,
            held_down: Mutex::new(HashMap::new()),
        }
    }

    /// Handles one agent request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let Some(device) = device_of(req.uri().path()) else {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "the router serves /v1/devices/{device}/... only",
            );
        };
        let slot = slot(&device);
        let (parts, body) = req.into_parts();
        // Request bodies are small (reports are capped at 64 KiB); buffering them is what lets a
        // request that failed on a dead replica be replayed on the fallback.
        let body = match self.read_body(&parts, body).await {
            Ok(b) => b,
            Err(resp) => {
                self.metrics
                    .refused
                    .get_or_create(&RefusedLabels {
                        code: resp.status().as_u16(),
                    })
                    .inc();
                return resp;
            }
        };
        let span = apollo_telemetry::request_span!(
            "router.request",
            otel.kind = "server",
            http.method = %parts.method,
            device = %device,
            slot,
            upstream = tracing::field::Empty,
            http.status_code = tracing::field::Empty,
        );
        apollo_telemetry::set_parent_from_headers(&span, &parts.headers);
        self.metrics.in_flight.inc();
        let resp = self
            .forward(&parts, body, slot)
            .instrument(span.clone())
            .await;
        self.metrics.in_flight.dec();
        span.record("http.status_code", resp.status().as_u16());
        resp
    }

    async fn forward(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
        slot: u16,
    ) -> Response<Body> {
        let snapshot = self.membership.current();
        let view = &snapshot.view;
        let mut exclude = self.held_down_now();
        let mut tried: Vec<u32> = Vec::new();
        // The "not ready" 503 of a replica we moved past, answered if no other replica can be.
        let mut not_ready_answer = None;
        // Owner (or first fallback), then one more replica.
        for _attempt in 0..2 {
            let route = view
                .route(slot, &exclude)
                // Everyone held down: try them anyway rather than refuse.
                .or_else(|| view.route(slot, &tried));
            let Some(route) = route else { break };
            if tried.contains(&route.ordinal) {
                break;
            }
            tried.push(route.ordinal);
            let upstream_req = match build_upstream_request(parts, &route.addr, body.clone()) {
                Ok(r) => r,
                Err(e) => {
                    warn!(addr = %route.addr, error = %e, "invalid upstream address in membership");
                    exclude.push(route.ordinal);
                    continue;
                }
            };
            tracing::Span::current().record("upstream", route.ordinal);
            if route.fallback || tried.len() > 1 {
                self.metrics.fallbacks.inc();
            }
            match self.client.request(upstream_req).await {
                Ok(resp) => {
                    let code = resp.status().as_u16();
                    self.metrics
                        .requests
                        .get_or_create(&UpstreamLabels {
                            upstream: route.ordinal.to_string(),
                            code,
                        })
                        .inc();
                    // A replica still loading (e.g. just restarted, its old registration still
                    // alive) says so: its devices go to the fallback meanwhile, once.
                    let not_ready = resp.status() == StatusCode::SERVICE_UNAVAILABLE
                        && resp
                            .headers()
                            .contains_key(apollo_protocol::NOT_READY_HEADER);
                    if not_ready && tried.len() < 2 {
                        debug!(
                            upstream = route.ordinal,
                            "upstream not ready; trying the fallback"
                        );
                        exclude.push(route.ordinal);
                        not_ready_answer = Some(resp);
                        continue;
                    }
                    return into_downstream(resp);
                }
                Err(e) => {
                    self.metrics
                        .upstream_errors
                        .get_or_create(&Upstream {
                            upstream: route.ordinal.to_string(),
                        })
                        .inc();
                    debug!(upstream = route.ordinal, addr = %route.addr, error = %e, "upstream failed; trying the fallback");
                    self.hold_down(route.ordinal);
                    exclude.push(route.ordinal);
                }
            }
        }
        if let Some(resp) = not_ready_answer {
            return into_downstream(resp);
        }
        let code = if tried.is_empty() {
            self.metrics.no_upstream.inc();
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::BAD_GATEWAY
        };
        self.metrics
            .requests
            .get_or_create(&UpstreamLabels {
                upstream: "none".into(),
                code: code.as_u16(),
            })
            .inc();
        if tried.is_empty() {
            let mut resp = error(code, "no_gateway", "no gateway replica is alive");
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        } else {
            let mut resp = error(
                code,
                "bad_gateway",
                "the gateway replicas tried did not answer",
            );
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
    }

    fn held_down_now(&self) -> Vec<u32> {
        let now = Instant::now();
        let mut held = self.held_down.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|_, until| *until > now);
        held.keys().copied().collect()
    }

    fn hold_down(&self, ordinal: u32) {
        if self.fallback_hold.is_zero() {
            return;
        }
        let mut held = self.held_down.lock().unwrap_or_else(|e| e.into_inner());
        held.insert(ordinal, Instant::now() + self.fallback_hold);
    }
}

pub use apollo_protocol::parse::device_of;

impl Proxy {
    /// Reads the whole body within the body-read timeout (408 past it). A GET or HEAD must not
    /// carry one (400): the gateway's routes take none, and forwarding it would only cost an
    /// upstream stream.
    async fn read_body(
        &self,
        parts: &http::request::Parts,
        body: Incoming,
    ) -> Result<Bytes, Response<Body>> {
        let bodiless = parts.method == Method::GET || parts.method == Method::HEAD;
        if bodiless && declares_body(&parts.headers) {
            return Err(body_not_allowed(&parts.method));
        }
        let read = tokio::time::timeout(self.body_read_timeout, read_body(&parts.headers, body));
        match read.await {
            Ok(Ok(body)) if bodiless && !body.is_empty() => Err(body_not_allowed(&parts.method)),
            Ok(result) => result,
            Err(_elapsed) => Err(error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {:?}",
                    self.body_read_timeout
                ),
            )),
        }
    }
}

/// Whether the head announces a body: a non-zero `Content-Length` or any `Transfer-Encoding`.
fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(0))
}

fn body_not_allowed(method: &Method) -> Response<Body> {
    error(
        StatusCode::BAD_REQUEST,
        "body_not_allowed",
        format!("a {method} request carries no body"),
    )
}

async fn read_body(headers: &HeaderMap, body: Incoming) -> Result<Bytes, Response<Body>> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body larger than {MAX_REPORT_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_REPORT_BYTES) {
        return Err(too_large());
    }
    match Limited::new(body, MAX_REPORT_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("could not read the request body: {e}"),
        )),
    }
}

fn build_upstream_request(
    parts: &http::request::Parts,
    addr: &str,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let uri: Uri = format!("http://{addr}{path}").parse()?;
    let mut builder = Request::builder().method(parts.method.clone()).uri(uri);
    if let Some(headers) = builder.headers_mut() {
        copy_end_to_end_headers(&parts.headers, headers);
        headers.remove(header::HOST);
        // The body was buffered: its length is known here, whatever the client declared (a
        // declared length that differs from the DATA sent is a protocol error on the shared
        // HTTP/2 connection, a reset stream).
        headers.remove(header::CONTENT_LENGTH);
        if !(parts.method == Method::GET || parts.method == Method::HEAD) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        // The gateway's span becomes a child of this router span (same trace id).
        apollo_telemetry::inject_current(headers);
        if let Some(PeerAddr(peer)) = parts.extensions.get::<PeerAddr>() {
            let forwarded = match parts
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prior) => format!("{prior}, {}", peer.ip()),
                None => peer.ip().to_string(),
            };
            if let Ok(v) = HeaderValue::from_str(&forwarded) {
                headers.insert(HeaderName::from_static("x-forwarded-for"), v);
            }
        }
    }
    let body = if parts.method == Method::GET || parts.method == Method::HEAD {
        Full::new(Bytes::new())
    } else {
        Full::new(body)
    };
    builder.body(body)
}

fn copy_end_to_end_headers(from: &HeaderMap, to: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in from {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || named.iter().any(|h| h == n) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

fn into_downstream(resp: Response<Incoming>) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let mut out = Response::builder().status(parts.status);
    if let Some(headers) = out.headers_mut() {
        copy_end_to_end_headers(&parts.headers, headers);
    }
    let body = body.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
    out.body(body.boxed()).unwrap_or_else(|_| {
        error(
            StatusCode::BAD_GATEWAY,
            "bad_gateway",
            "invalid upstream response",
        )
    })
}

/// A JSON error response in the device API's envelope.
pub fn error(code: StatusCode, kind: &str, message: impl Into<String>) -> Response<Body> {
    let body = serde_json::to_vec(&ErrorBody::new(kind, message)).unwrap_or_default();
    let mut resp = Response::new(full(Bytes::from(body)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut from = HeaderMap::new();
        from.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        from.insert("x-secret-hop", HeaderValue::from_static("1"));
        from.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        from.insert("if-none-match", HeaderValue::from_static("\"abc\""));
        from.insert("x-device-token", HeaderValue::from_static("t"));
        from.insert("traceparent", HeaderValue::from_static("00-a-b-01"));
        let mut to = HeaderMap::new();
        copy_end_to_end_headers(&from, &mut to);
        assert!(to.get("connection").is_none());
        assert!(to.get("x-secret-hop").is_none());
        assert!(to.get("keep-alive").is_none());
        assert_eq!(
            to.get("if-none-match").map(|v| v.as_bytes()),
            Some(&b"\"abc\""[..])
        );
        assert!(to.get("x-device-token").is_some());
        assert!(to.get("traceparent").is_some());
    }
}

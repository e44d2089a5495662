//! A fault proxy between one component and the real kube-apiserver: plain HTTP on 127.0.0.1 in
//! front, TLS to the apiserver behind, the component's own bearer token passed through (so the
//! audit log still names the component). Faults answer matching requests with an error status,
//! delay them, cut the connection, or end every open watch at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::ControlPlane;

/// What to do with matching requests. Unset selectors match anything.
#[derive(Clone, Debug, Default)]
pub struct Fault {
    /// Audit verb (get, list, watch, create, update, patch, delete, deletecollection).
    pub verb: Option<String>,
    /// Resource plural, e.g. `deviceprocesses`.
    pub resource: Option<String>,
    /// Subresource, e.g. `status` (`Some("")` matches only the main resource).
    pub subresource: Option<String>,
    /// Answer with this status code (a Kubernetes Status body) instead of forwarding.
    pub code: Option<u16>,
    /// With `code` 429 or 503: the `Retry-After` header (seconds).
    pub retry_after: Option<u32>,
    /// Hold the request this long before acting on it.
    pub delay: Option<Duration>,
    /// Close the client's connection without an answer.
    pub cut: bool,
    /// Act on only this many matching requests, then expire.
    pub times: Option<u32>,
}

impl Fault {
    /// Matching requests get `code`.
    pub fn status(verb: &str, resource: &str, code: u16) -> Self {
        Self {
            verb: Some(verb.to_owned()),
            resource: Some(resource.to_owned()),
            code: Some(code),
            ..Self::default()
        }
    }

    /// Every request gets `code`.
    pub fn every_request(code: u16) -> Self {
        Self {
            code: Some(code),
            ..Self::default()
        }
    }

    fn matches(&self, r: &RequestInfo) -> bool {
        self.verb.as_deref().is_none_or(|v| v == r.verb)
            && self.resource.as_deref().is_none_or(|v| v == r.resource)
            && self
                .subresource
                .as_deref()
                .is_none_or(|v| v == r.subresource)
    }
}

/// Verb and resource of a Kubernetes API request, as the audit log would name them.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct RequestInfo {
    pub verb: String,
    pub resource: String,
    pub subresource: String,
}

pub(crate) fn classify(method: &str, path: &str, query: &str) -> RequestInfo {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest: &[&str] = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => &[],
    };
    let rest = match rest {
        ["namespaces", _ns, resource, tail @ ..] if !matches!(*resource, "status" | "finalize") => {
            let mut v = vec![*resource];
            v.extend_from_slice(tail);
            v
        }
        other => other.to_vec(),
    };
    let resource = rest.first().copied().unwrap_or_default().to_owned();
    let named = rest.len() >= 2;
    let subresource = rest.get(2).copied().unwrap_or_default().to_owned();
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match method {
        "GET" | "HEAD" if watch => "watch",
        "GET" | "HEAD" if named => "get",
        "GET" | "HEAD" => "list",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" if named => "delete",
        "DELETE" => "deletecollection",
        other => other,
    };
    RequestInfo {
        verb: verb.to_owned(),
        resource,
        subresource,
    }
}

struct Shared {
    faults: Mutex<Vec<Fault>>,
    /// Requests a fault acted on.
    hits: std::sync::atomic::AtomicU64,
    /// Cancelled (and replaced) by `cut_connections`: every open stream ends.
    streams: Mutex<CancellationToken>,
    upstream: String,
    http: reqwest::Client,
}

/// The proxy; stops on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

type ProxyBody = BoxBody<Bytes, std::io::Error>;

impl FaultProxy {
    /// Starts a proxy to `control_plane`'s apiserver on a free 127.0.0.1 port.
    pub async fn start(control_plane: &ControlPlane) -> FaultProxy {
        let ca = std::fs::read(control_plane.ca_file()).expect("read the control plane's CA");
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("parse the CA"))
            .tls_built_in_root_certs(false)
            .http1_only()
            .build()
            .expect("build the proxy's upstream client");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            faults: Mutex::new(Vec::new()),
            hits: std::sync::atomic::AtomicU64::new(0),
            streams: Mutex::new(CancellationToken::new()),
            upstream: control_plane.apiserver_url().to_owned(),
            http,
        });
        let shutdown = CancellationToken::new();
        let accept_shared = shared.clone();
        let accept_shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = accept_shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let shared = accept_shared.clone();
                let conn_shutdown = accept_shutdown.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| forward(shared.clone(), req));
                    let conn =
                        http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = conn_shutdown.cancelled() => {}
                    }
                });
            }
        });
        FaultProxy {
            addr,
            shared,
            shutdown,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces every fault.
    pub fn set_faults(&self, faults: Vec<Fault>) {
        *self.shared.faults.lock().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    /// Adds one fault.
    pub fn add_fault(&self, fault: Fault) {
        self.shared
            .faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.set_faults(Vec::new());
    }

    /// How many requests a fault has acted on so far.
    pub fn hits(&self) -> u64 {
        self.shared.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ends every response still streaming (watches) now, as a dropped connection would.
    pub fn cut_streams(&self) {
        let mut token = self
            .shared
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        token.cancel();
        *token = CancellationToken::new();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.cut_streams();
    }
}

/// The first fault matching `info`, counting it down when limited.
fn take_fault(shared: &Shared, info: &RequestInfo) -> Option<Fault> {
    let mut faults = shared.faults.lock().unwrap_or_else(|e| e.into_inner());
    let index = faults.iter().position(|f| f.matches(info))?;
    let fault = faults[index].clone();
    if let Some(times) = faults[index].times.as_mut() {
        *times = times.saturating_sub(1);
        if *times == 0 {
            faults.remove(index);
        }
    }
    Some(fault)
}

fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn status_response(code: u16, retry_after: Option<u32>) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = match code {
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    };
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("injected by the test fault proxy ({code})"),
        "reason": reason, "code": code,
    });
    let mut response = Response::new(full(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    if let Some(seconds) = retry_after {
        response.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from(seconds),
        );
    }
    response
}

async fn forward(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::io::Error> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let info = classify(req.method().as_str(), &path, &query);
    if let Some(fault) = take_fault(&shared, &info) {
        shared
            .hits
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(delay) = fault.delay {
            tokio::time::sleep(delay).await;
        }
        if fault.cut {
            return Err(std::io::Error::other(
                "connection cut by the test fault proxy",
            ));
        }
        if let Some(code) = fault.code {
            return Ok(status_response(code, fault.retry_after));
        }
    }
    let method = req.method().clone();
    let mut headers = req.headers().clone();
    for h in [
        "host",
        "connection",
        "transfer-encoding",
        "keep-alive",
        "upgrade",
    ] {
        headers.remove(h);
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let url = if query.is_empty() {
        format!("{}{path}", shared.upstream)
    } else {
        format!("{}{path}?{query}", shared.upstream)
    };
    let upstream = match shared
        .http
        .request(method, url)
        .headers(headers)
        .body(body)
        .send()
        .await
    {
        Ok(r) => r,
        // The apiserver is down: the component sees what it would see without the proxy.
        Err(_) => return Err(std::io::Error::other("apiserver unreachable")),
    };
    let mut response = Response::builder().status(upstream.status());
    for (name, value) in upstream.headers() {
        if !matches!(
            name.as_str(),
            "connection" | "transfer-encoding" | "content-length"
        ) {
            response = response.header(name, value);
        }
    }
    let cut = shared
        .streams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let stream = upstream
        .bytes_stream()
        .map(|chunk| chunk.map(Frame::data).map_err(std::io::Error::other))
        .take_until(async move { cut.cancelled().await });
    response
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_requests_as_the_audit_log_names_them() {
        let c = |m, p, q| {
            let i = classify(m, p, q);
            (i.verb, i.resource, i.subresource)
        };
        let s = |v: &str, r: &str, sub: &str| (v.to_owned(), r.to_owned(), sub.to_owned());
        assert_eq!(
            c(
                "GET",
                "/apis/azure.com/v1alpha1/deviceprocesses",
                "limit=500"
            ),
            s("list", "deviceprocesses", "")
        );
        assert_eq!(
            c(
                "GET",
                "/apis/azure.com/v1alpha1/namespaces/t/deviceprocesses",
                "watch=true&resourceVersion=5"
            ),
            s("watch", "deviceprocesses", "")
        );
        assert_eq!(
            c(
                "PATCH",
                "/apis/azure.com/v1alpha1/namespaces/t/deviceprocesses/a/status",
                ""
            ),
            s("patch", "deviceprocesses", "status")
        );
        assert_eq!(
            c("POST", "/apis/events.k8s.io/v1/namespaces/t/events", ""),
            s("create", "events", "")
        );
        assert_eq!(
            c("GET", "/api/v1/namespaces/t", ""),
            s("get", "namespaces", "")
        );
        assert_eq!(
            c(
                "PUT",
                "/apis/coordination.k8s.io/v1/namespaces/t/leases/l",
                ""
            ),
            s("update", "leases", "")
        );
        assert_eq!(
            c(
                "DELETE",
                "/apis/azure.com/v1alpha1/namespaces/t/deviceprocesses",
                ""
            ),
            s("deletecollection", "deviceprocesses", "")
        );
    }
}

//! The three device API calls, over a caller-provided `reqwest::Client` so that thousands of
//! agents in one process share one connection pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apollo_protocol::wire::{ConnectRequest, DesiredDocument, ErrorBody, Report, ReportAck};
use apollo_protocol::DEVICE_TOKEN_HEADER;
use reqwest::header::{HeaderValue, ETAG, IF_NONE_MATCH, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use tracing::Instrument;

use crate::backoff::parse_retry_after;
use crate::config::TraceparentSource;
use crate::metrics::{AgentMetrics, RequestKind, RequestOutcome};
use crate::trace::{new_traceparent, TRACEPARENT_HEADER};
use crate::AgentError;

/// Extra time a long poll may take beyond its wait before the agent gives up on it.
const LONG_POLL_GRACE: Duration = Duration::from_secs(10);

/// Answer to a desired-state poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DesiredResponse {
    /// 200 with the document and the ETag header, when the gateway sent one.
    Document {
        /// The document.
        document: DesiredDocument,
        /// `ETag` response header.
        etag: Option<String>,
    },
    /// 304, with the ETag header when the gateway sent one.
    NotModified {
        /// `ETag` response header.
        etag: Option<String>,
    },
}

/// Device API client for one device.
#[derive(Debug, Clone)]
pub struct GatewayClient {
    http: reqwest::Client,
    desired_url: Url,
    report_url: Url,
    connect_url: Url,
    token: Option<HeaderValue>,
    request_timeout: Duration,
    metrics: Arc<AgentMetrics>,
    traceparent_source: Option<TraceparentSource>,
}

fn device_url(base: &Url, device: &str, last: &str) -> Url {
    let mut url = base.clone();
    // Configuration rejected cannot-be-a-base URLs, so segments are always available; keeping a
    // base path lets the agent sit behind a path-prefixed proxy.
    if let Ok(mut segments) = url.path_segments_mut() {
        segments
            .pop_if_empty()
            .extend(["v1", "devices", device, last]);
    }
    url
}

impl GatewayClient {
    /// A client for `device` at `gateway_url`.
    pub fn new(
        http: reqwest::Client,
        gateway_url: &Url,
        device: &str,
        token: Option<&str>,
        request_timeout: Duration,
        metrics: Arc<AgentMetrics>,
    ) -> Result<Self, AgentError> {
        let token = token
            .map(|t| {
                let mut value = HeaderValue::from_str(t).map_err(|_| AgentError::Config {
                    variable: crate::config::ENV_DEVICE_TOKEN,
                    problem: "the token is not a valid header value".into(),
                })?;
                value.set_sensitive(true);
                Ok::<_, AgentError>(value)
            })
            .transpose()?;
        Ok(Self {
            http,
            desired_url: device_url(gateway_url, device, "desired"),
            report_url: device_url(gateway_url, device, "report"),
            connect_url: device_url(gateway_url, device, "connect"),
            token,
            request_timeout,
            metrics,
            traceparent_source: None,
        })
    }

    /// Reports name the span `source` gives (see [`crate::config::TraceparentSource`]).
    pub fn with_traceparent_source(mut self, source: Option<TraceparentSource>) -> Self {
        self.traceparent_source = source;
        self
    }

    /// URL of the desired-state document (without `waitSeconds`).
    pub fn desired_url(&self) -> &Url {
        &self.desired_url
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.header(DEVICE_TOKEN_HEADER, token.clone()),
            None => request,
        }
    }

    /// `GET /desired`, long-polling for up to `wait` when `etag` is known.
    pub async fn fetch_desired(
        &self,
        etag: Option<&str>,
        wait: Duration,
    ) -> Result<DesiredResponse, AgentError> {
        let kind = RequestKind::Desired;
        let mut url = self.desired_url.clone();
        // Without an ETag the gateway answers at once anyway; asking to wait would only mislead.
        let wait = if etag.is_some() { wait } else { Duration::ZERO };
        if !wait.is_zero() {
            url.query_pairs_mut()
                .append_pair("waitSeconds", &wait.as_secs().to_string());
        }
        let mut request = self
            .authorized(self.http.get(url))
            .timeout(wait + self.request_timeout.max(LONG_POLL_GRACE));
        if let Some(etag) = etag {
            request = request.header(IF_NONE_MATCH, etag);
        }
        let started = Instant::now();
        let result = async {
            let response = request
                .send()
                .await
                .map_err(|source| AgentError::SendRequest { kind, source })?;
            let etag = response
                .headers()
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match response.status() {
                StatusCode::NOT_MODIFIED => Ok(DesiredResponse::NotModified { etag }),
                StatusCode::OK => {
                    let document = decode::<DesiredDocument>(kind, response).await?;
                    Ok(DesiredResponse::Document { document, etag })
                }
                _ => Err(unexpected_status(kind, response).await),
            }
        }
        .await;
        let outcome = match &result {
            Ok(DesiredResponse::Document { .. }) => RequestOutcome::Ok,
            Ok(DesiredResponse::NotModified { .. }) => RequestOutcome::NotModified,
            Err(e) => outcome_of_error(e),
        };
        self.metrics
            .record_request(kind, outcome, started.elapsed());
        result
    }

    /// `POST /report` with a fresh `traceparent`.
    pub async fn report(&self, report: &Report) -> Result<ReportAck, AgentError> {
        self.post(RequestKind::Report, &self.report_url, report)
            .await
    }

    /// `POST /connect` with a fresh `traceparent`.
    pub async fn connect(&self, agent_version: &str) -> Result<ReportAck, AgentError> {
        let body = ConnectRequest {
            agent_version: agent_version.to_owned(),
        };
        self.post(RequestKind::Connect, &self.connect_url, &body)
            .await
    }

    async fn post<B: serde::Serialize + ?Sized>(
        &self,
        kind: RequestKind,
        url: &Url,
        body: &B,
    ) -> Result<ReportAck, AgentError> {
        // Each report is the root of a trace of its own, whatever span the caller is in. When the
        // process exports traces (the binary with OTLP configured) the traceparent names this
        // span, so the router's span has a real parent in Jaeger; otherwise a fresh random
        // traceparent still ties the hops together.
        let span = tracing::info_span!(parent: None, "agent.report", kind = %kind);
        let traceparent = span.in_scope(|| {
            self.traceparent_source
                .and_then(|source| source())
                .unwrap_or_else(|| new_traceparent(&mut rand::rng()))
        });
        tracing::trace!(%kind, %traceparent, "sending");
        let request = self
            .authorized(self.http.post(url.clone()))
            .header(TRACEPARENT_HEADER, traceparent)
            .timeout(self.request_timeout)
            .json(body);
        let started = Instant::now();
        let result = async {
            let response = request
                .send()
                .await
                .map_err(|source| AgentError::SendRequest { kind, source })?;
            if response.status() == StatusCode::OK {
                decode::<ReportAck>(kind, response).await
            } else {
                Err(unexpected_status(kind, response).await)
            }
        }
        .instrument(span)
        .await;
        let outcome = match &result {
            Ok(_) => RequestOutcome::Ok,
            Err(e) => outcome_of_error(e),
        };
        self.metrics
            .record_request(kind, outcome, started.elapsed());
        result
    }
}

fn outcome_of_error(e: &AgentError) -> RequestOutcome {
    match e {
        AgentError::SendRequest { .. } => RequestOutcome::TransportError,
        _ => RequestOutcome::HttpError,
    }
}

async fn decode<T: serde::de::DeserializeOwned>(
    kind: RequestKind,
    response: reqwest::Response,
) -> Result<T, AgentError> {
    let body = response
        .bytes()
        .await
        .map_err(|e| AgentError::DecodeResponse {
            kind,
            message: format!("reading the body: {e}"),
        })?;
    serde_json::from_slice(&body).map_err(|e| AgentError::DecodeResponse {
        kind,
        message: e.to_string(),
    })
}

/// Largest error body quoted in a log line.
const MAX_ERROR_MESSAGE: usize = 256;

async fn unexpected_status(kind: RequestKind, response: reqwest::Response) -> AgentError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, jiff::Timestamp::now()));
    let body = response.bytes().await.unwrap_or_default();
    let message = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(parsed) => format!("{}: {}", parsed.error.code, parsed.error.message),
        Err(_) if body.is_empty() => "empty body".to_owned(),
        Err(_) => String::from_utf8_lossy(&body)
            .chars()
            .take(MAX_ERROR_MESSAGE)
            .collect(),
    };
    AgentError::UnexpectedStatus {
        kind,
        status,
        message,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_urls_keep_the_base_path_and_escape_nothing_unexpected() {
        let base = Url::parse("http://127.0.0.1:8080").expect("url");
        assert_eq!(
            device_url(&base, "tor1-01", "desired").as_str(),
            "http://127.0.0.1:8080/v1/devices/tor1-01/desired"
        );
        let prefixed = Url::parse("https://gw.example/apollo/").expect("url");
        assert_eq!(
            device_url(&prefixed, "tor1-01", "report").as_str(),
            "https://gw.example/apollo/v1/devices/tor1-01/report"
        );
    }
}

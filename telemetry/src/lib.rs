//! Logging and tracing set-up shared by Apollo's servers.
//!
//! - Logs: `tracing` to stderr, `RUST_LOG` filter (default `info`), text (coloured only on a
//!   terminal) or JSON.
//! - Traces: when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) variable is
//!   set, spans are exported over OTLP/HTTP (protobuf) to it — Jaeger all-in-one listens on :4318.
//!   `OTEL_SERVICE_NAME` overrides the service name. Without those variables nothing is exported.
//! - Propagation: W3C `traceparent`/`tracestate`; [`set_parent_from_headers`] continues the caller's
//!   trace in a request span and [`inject_current`] passes the current span on to the next hop.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Log line format. With the `clap` feature it is a clap `ValueEnum`: an unknown value is a usage
/// error naming the accepted ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

/// Flushes buffered spans when dropped; keep it alive for the life of `main`.
#[must_use = "dropping the guard stops span export"]
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Guard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Set once [`init`] has built an OTLP exporter.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans (OTLP configured and the exporter built by [`init`]).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

#[doc(hidden)]
pub use tracing as __tracing;

/// A span opened for every request on a hot path (`request_span!("gateway.request", field = ...)`,
/// the arguments of `tracing::info_span!`). While spans are exported it is an `info` span, exported
/// and shown as the context of log lines; otherwise a `debug` span, which at the default `info`
/// filter is never built: a span per request cost the gateway's 304 path ~6% of its CPU for the
/// fmt layer to format fields nobody reads (docs/benchmarks.md). `RUST_LOG=debug` brings the
/// context back to the logs.
#[macro_export]
macro_rules! request_span {
    ($($args:tt)+) => {
        if $crate::exporting() {
            $crate::__tracing::info_span!($($args)+)
        } else {
            $crate::__tracing::debug_span!($($args)+)
        }
    };
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Installs the global subscriber (logs, and OTLP export when configured) and the W3C propagator.
/// `service` names this process in traces unless `OTEL_SERVICE_NAME` is set. Logs at `info` unless
/// `RUST_LOG` says otherwise.
pub fn init(service: &str, format: LogFormat) -> Guard {
    init_with_default_filter(service, format, "info")
}

/// [`init`] with another filter than `info` when `RUST_LOG` is unset (a harness running thousands
/// of agents in one process wants their warnings, not a line per connection).
pub fn init_with_default_filter(service: &str, format: LogFormat, default_filter: &str) -> Guard {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::stderr().is_terminal();
    let fmt_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };

    let mut export_error = None;
    let provider = if otlp_configured() {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => {
                let name =
                    std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
                let resource = opentelemetry_sdk::Resource::builder()
                    .with_service_name(name)
                    .build();
                Some(
                    SdkTracerProvider::builder()
                        .with_batch_exporter(exporter)
                        .with_resource(resource)
                        .build(),
                )
            }
            Err(e) => {
                export_error = Some(e.to_string());
                None
            }
        }
    } else {
        None
    };
    let otel_layer = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("apollo"))
            .with_filter(EnvFilter::new("info"))
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init();
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    if let Some(e) = export_error {
        tracing::warn!(error = %e, "OTLP endpoint configured but the exporter could not be built; traces are not exported");
    } else if provider.is_some() {
        tracing::info!("exporting traces over OTLP/HTTP");
    }
    Guard { provider }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// A trace context captured from a span, to continue its trace later (e.g. off the request path)
/// without keeping the span itself open.
pub type TraceContext = opentelemetry::Context;

/// The context of the current span (empty when no span or no exporter is active).
pub fn current_context() -> TraceContext {
    tracing::Span::current().context()
}

/// Makes `span` part of the trace `cx` was captured from.
pub fn set_parent(span: &tracing::Span, cx: &TraceContext) {
    let _ = span.set_parent(cx.clone());
}

/// Makes `span` a child of the trace named by the request's `traceparent`, if any.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(cx);
}

/// Writes the current span's context into `headers` as `traceparent`/`tracestate`, replacing the
/// caller's, so the next hop becomes a child of this one. Without an exported span (no OTLP
/// configured) the caller's headers are left as they are, so the trace id still flows through.
pub fn inject_current(headers: &mut http::HeaderMap) {
    let cx = tracing::Span::current().context();
    use opentelemetry::trace::TraceContextExt;
    if !cx.span().span_context().is_valid() {
        return;
    }
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers))
    });
}

/// The `traceparent` of the current span when it is exported (OTLP configured), so a client that
/// starts a trace (the agent) sends the id of a span Jaeger will actually hold; None otherwise.
pub fn current_traceparent() -> Option<String> {
    let mut headers = http::HeaderMap::new();
    inject_current(&mut headers);
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_format_parses() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!("xml".parse::<LogFormat>().is_err());
    }

    #[test]
    fn traceparent_flows_through_a_span_when_tracing_is_set_up() {
        // With a tracer installed, a span parented on an incoming traceparent keeps its trace id
        // and injects a traceparent with the same trace id and a new span id.
        let provider = SdkTracerProvider::builder().build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let mut incoming = http::HeaderMap::new();
            incoming.insert(
                "traceparent",
                http::HeaderValue::from_static(
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            );
            let span = tracing::info_span!("request");
            set_parent_from_headers(&span, &incoming);
            let _enter = span.enter();
            let mut outgoing = http::HeaderMap::new();
            inject_current(&mut outgoing);
            let tp = outgoing
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .expect("traceparent injected");
            assert!(
                tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
                "{tp}"
            );
            assert!(!tp.contains("b7ad6b7169203331"), "{tp}");
        });
    }

    #[test]
    fn a_root_span_gives_its_own_traceparent_only_when_exported() {
        assert_eq!(current_traceparent(), None, "no tracer: nothing to name");
        let provider = SdkTracerProvider::builder().build();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("agent.report");
            let _enter = span.enter();
            let tp = current_traceparent().expect("a traceparent");
            assert_eq!(tp.len(), 55, "{tp}");
            assert!(tp.ends_with("-01"), "sampled: {tp}");
        });
    }

    #[test]
    fn without_a_tracer_headers_are_left_alone() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", http::HeaderValue::from_static("00-aa-bb-01"));
        inject_current(&mut headers);
        assert_eq!(
            headers.get("traceparent").map(|v| v.as_bytes()),
            Some(&b"00-aa-bb-01"[..])
        );
    }
}

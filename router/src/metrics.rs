//! Router metrics (Prometheus text on the admin port's /metrics).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a proxied request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Gateway ordinal that answered ("none" when no replica was reachable).
    pub upstream: String,
    /// HTTP status code returned to the agent.
    pub code: u16,
}

/// Labels naming one upstream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Upstream {
    /// Gateway ordinal.
    pub upstream: String,
}

/// Why the router closed a client connection.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ConnectionClose {
    /// An HTTP/1.1 request head was not complete within the header-read timeout.
    HeaderTimeout,
    /// No request in flight for the idle timeout.
    Idle,
}

/// Labels of a closed connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// Why.
    pub reason: ConnectionClose,
}

/// Every router metric.
pub struct Metrics {
    /// Requests by answering upstream and status code.
    pub requests: Family<UpstreamLabels, Counter>,
    /// Requests sent to a fallback because the owner was not alive or failed.
    pub fallbacks: Counter,
    /// Transport failures talking to an upstream (the request was retried elsewhere).
    pub upstream_errors: Family<Upstream, Counter>,
    /// Requests answered 503 because no replica was alive.
    pub no_upstream: Counter,
    /// Times the membership view changed (replicas joined, left, died or came back).
    pub membership_changes: Counter,
    /// Failed membership reads from Redis.
    pub membership_errors: Counter,
    /// Replica count N currently used for hashing.
    pub replicas: Gauge,
    /// Replicas currently alive.
    pub alive: Gauge,
    /// Requests being proxied right now (long polls included).
    pub in_flight: Gauge,
    /// Client connections open now.
    pub connections_open: Gauge,
    /// Client connections closed on accept because `--max-connections` were open.
    pub connections_refused: Counter,
    /// Client connections the router closed, by reason.
    pub connections_closed: Family<CloseLabels, Counter>,
    /// Requests refused before any upstream was tried (bodies too slow or where none belong).
    pub refused: Family<RefusedLabels, Counter>,
}

/// Labels of a request the router refused itself.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// Status code answered.
    pub code: u16,
}

impl Metrics {
    /// Registers every metric in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            fallbacks: Counter::default(),
            upstream_errors: Family::default(),
            no_upstream: Counter::default(),
            membership_changes: Counter::default(),
            membership_errors: Counter::default(),
            replicas: Gauge::default(),
            alive: Gauge::default(),
            in_flight: Gauge::default(),
            connections_open: Gauge::default(),
            connections_refused: Counter::default(),
            connections_closed: Family::default(),
            refused: Family::default(),
        };
        registry.register(
            "requests",
            "Device requests by upstream and code",
            m.requests.clone(),
        );
        registry.register(
            "fallbacks",
            "Requests routed to a fallback replica",
            m.fallbacks.clone(),
        );
        registry.register(
            "upstream_errors",
            "Transport errors by upstream",
            m.upstream_errors.clone(),
        );
        registry.register(
            "no_upstream",
            "Requests answered 503: no replica alive",
            m.no_upstream.clone(),
        );
        registry.register(
            "membership_changes",
            "Changes of the gateway membership view",
            m.membership_changes.clone(),
        );
        registry.register(
            "membership_errors",
            "Failed membership reads from Redis",
            m.membership_errors.clone(),
        );
        registry.register(
            "replicas",
            "Gateway replica count used for hashing",
            m.replicas.clone(),
        );
        registry.register("alive_replicas", "Gateway replicas alive", m.alive.clone());
        registry.register("in_flight", "Requests being proxied", m.in_flight.clone());
        registry.register(
            "connections_open",
            "Client connections open",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections closed on accept: --max-connections reached",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_closed",
            "Client connections closed by the router's timeouts, by reason",
            m.connections_closed.clone(),
        );
        registry.register(
            "refused",
            "Requests the router answered itself without an upstream (bad bodies), by code",
            m.refused.clone(),
        );
        m
    }

    /// Counts a connection the router closed.
    pub fn count_close(&self, reason: ConnectionClose) {
        self.connections_closed
            .get_or_create(&CloseLabels { reason })
            .inc();
    }
}

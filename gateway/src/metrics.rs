//! Prometheus metrics of the gateway. The registry is passed in; nothing is global.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Labels of a device API request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route template, e.g. `/v1/devices/{device}/desired`.
    pub route: &'static str,
    /// HTTP status code.
    pub code: u16,
}

/// Labels of a device API route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route template.
    pub route: &'static str,
}

/// Labels of a state-store operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// Operation, e.g. `report`, `sweep`.
    pub op: &'static str,
}

/// Labels of a Kubernetes write.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeWriteLabels {
    /// `status_patch` or `event`.
    pub kind: &'static str,
    /// Why the write happened: `connected`, `disconnected`, `spec_observed`, `spec_changed`,
    /// `resync`, `retry`.
    pub reason: &'static str,
    /// `ok`, `conflict`, `error`, `timeout`, `not_found`.
    pub outcome: &'static str,
}

/// Labels of a transition decided by the state store.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabels {
    /// `connected`, `disconnected` or `spec_observed`.
    pub kind: &'static str,
}

/// Labels of a status-queue outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueOutcomeLabels {
    /// `written`, `unchanged`, `gone`, `retried`, `dropped_full`.
    pub outcome: &'static str,
}

/// Every metric the gateway exports.
#[derive(Clone)]
pub struct Metrics {
    /// Device API requests by route and code.
    pub requests: Family<RequestLabels, Counter>,
    /// Device API request latency by route.
    pub request_seconds: Family<RouteLabels, Histogram>,
    /// Long polls currently held.
    pub long_poll_waiters: Gauge,
    /// State-store latency by operation.
    pub store_seconds: Family<StoreLabels, Histogram>,
    /// State-store failures by operation.
    pub store_errors: Family<StoreLabels, Counter>,
    /// Deciding state-store writes fewer Redis replicas acknowledged than `wait-replicas` asks.
    pub store_unreplicated: Counter,
    /// Kubernetes writes by kind, reason and outcome.
    pub kube_writes: Family<KubeWriteLabels, Counter>,
    /// Objects waiting in the status queue.
    pub queue_depth: Gauge,
    /// Status-queue items by outcome.
    pub queue_outcomes: Family<QueueOutcomeLabels, Counter>,
    /// Transitions decided by this replica.
    pub transitions: Family<TransitionLabels, Counter>,
    /// DeviceProcesses in the watch cache.
    pub cache_objects: Gauge,
    /// Devices with at least one DeviceProcess.
    pub cache_devices: Gauge,
    /// Desired documents built (one per change of a device's document).
    pub documents_built: Counter,
    /// Completed stale sweeps.
    pub sweeps: Counter,
    /// Completed resync passes.
    pub resyncs: Counter,
    /// How far Redis' clock (the cluster's shared clock) is ahead of this machine's, in seconds.
    pub clock_offset_seconds: Gauge<f64, AtomicU64>,
    /// Pending transitions replayed (decided, but not delivered by the replica that decided them).
    pub pending_replayed: Counter,
    /// Pending transitions in the owned slots at the last scan.
    pub pending_transitions: Gauge,
    /// Age of the oldest pending transition in the owned slots at the last scan, in seconds.
    pub pending_oldest_seconds: Gauge<f64, AtomicU64>,
    /// Stale sweeps skipped, by reason (`grace`, `reception`, `breaker`).
    pub sweeps_skipped: Family<SkipLabels, Counter>,
    /// 1 while the mass-staleness breaker holds transitions back.
    pub stale_breaker_open: Gauge,
    /// Devices the breaker holds back (stale, not marked disconnected).
    pub stale_held: Gauge,
    /// 1 for each shard whose Lease this replica holds, 0 for the cluster's other shards.
    pub shard_held: Family<ShardLabels, Gauge>,
    /// 1 while this replica stands aside from its own shard (cannot renew its Lease).
    pub shard_standing_aside: Gauge,
    /// Device requests answered at once because a budget was full.
    pub requests_shed: Family<ShedLabels, Counter>,
}

/// Label of [`Metrics::sweeps_skipped`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    /// Why the sweep did not flip anything.
    pub reason: &'static str,
}

/// Label of [`Metrics::requests_shed`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    /// The budget that was full: requests, long_polls or device_long_polls.
    pub budget: &'static str,
}

/// Label of [`Metrics::shard_held`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    /// The shard.
    pub shard: u32,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Metrics {
    /// Creates the metrics and registers them under `apollo_gateway_`.
    pub fn register(registry: &mut Registry) -> Self {
        let registry = registry.sub_registry_with_prefix("apollo_gateway");
        let metrics = Self {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(latency_histogram),
            long_poll_waiters: Gauge::default(),
            store_seconds: Family::new_with_constructor(latency_histogram),
            store_errors: Family::default(),
            store_unreplicated: Counter::default(),
            kube_writes: Family::default(),
            queue_depth: Gauge::default(),
            queue_outcomes: Family::default(),
            transitions: Family::default(),
            cache_objects: Gauge::default(),
            cache_devices: Gauge::default(),
            documents_built: Counter::default(),
            sweeps: Counter::default(),
            resyncs: Counter::default(),
            clock_offset_seconds: Gauge::default(),
            pending_replayed: Counter::default(),
            pending_transitions: Gauge::default(),
            pending_oldest_seconds: Gauge::default(),
            sweeps_skipped: Family::default(),
            stale_breaker_open: Gauge::default(),
            stale_held: Gauge::default(),
            shard_held: Family::default(),
            shard_standing_aside: Gauge::default(),
            requests_shed: Family::default(),
        };
        registry.register(
            "http_requests",
            "Device API requests by route and status code",
            metrics.requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Device API request latency (long polls included)",
            Unit::Seconds,
            metrics.request_seconds.clone(),
        );
        registry.register(
            "long_poll_waiters",
            "Long polls currently held",
            metrics.long_poll_waiters.clone(),
        );
        registry.register_with_unit(
            "state_store_duration",
            "Latency of state-store (Redis) operations",
            Unit::Seconds,
            metrics.store_seconds.clone(),
        );
        registry.register(
            "state_store_errors",
            "Failed state-store (Redis) operations",
            metrics.store_errors.clone(),
        );
        registry.register(
            "state_store_unreplicated_writes",
            "Deciding state-store writes (report, sweep) fewer Redis replicas acknowledged within \
             wait-timeout than the Redis URL's wait-replicas asks (0 without wait-replicas)",
            metrics.store_unreplicated.clone(),
        );
        registry.register(
            "kube_writes",
            "Kubernetes writes by kind, reason and outcome",
            metrics.kube_writes.clone(),
        );
        registry.register(
            "status_queue_depth",
            "DeviceProcesses waiting for a status write",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "status_queue_items",
            "Status-queue items by outcome",
            metrics.queue_outcomes.clone(),
        );
        registry.register(
            "transitions",
            "Connection and observation transitions decided by this replica",
            metrics.transitions.clone(),
        );
        registry.register(
            "cache_objects",
            "DeviceProcesses in the watch cache",
            metrics.cache_objects.clone(),
        );
        registry.register(
            "cache_devices",
            "Devices with at least one DeviceProcess",
            metrics.cache_devices.clone(),
        );
        registry.register(
            "desired_documents_built",
            "Desired documents built (one per change of a device's document)",
            metrics.documents_built.clone(),
        );
        registry.register(
            "stale_sweeps",
            "Completed stale sweeps over the owned slots",
            metrics.sweeps.clone(),
        );
        registry.register(
            "resyncs",
            "Completed resync passes over the owned slots",
            metrics.resyncs.clone(),
        );
        registry.register_with_unit(
            "clock_offset",
            "How far Redis' clock, on which lastSeen and stale sweeps run, is ahead of this machine's wall clock",
            Unit::Seconds,
            metrics.clock_offset_seconds.clone(),
        );
        registry.register(
            "pending_replayed",
            "Pending transitions replayed by this replica (decided but not delivered by the replica that decided them)",
            metrics.pending_replayed.clone(),
        );
        registry.register(
            "pending_transitions",
            "Transitions decided but not yet delivered (status patch and Event) in the owned slots",
            metrics.pending_transitions.clone(),
        );
        registry.register_with_unit(
            "pending_oldest",
            "Age of the oldest undelivered transition in the owned slots",
            Unit::Seconds,
            metrics.pending_oldest_seconds.clone(),
        );
        registry.register(
            "stale_sweeps_skipped",
            "Stale sweeps that flipped nothing, by reason (grace: after start-up; reception: the state store or the watch was unreachable within a stale window; breaker: too many devices at once)",
            metrics.sweeps_skipped.clone(),
        );
        registry.register(
            "stale_breaker_open",
            "1 while the mass-staleness breaker holds stale transitions back",
            metrics.stale_breaker_open.clone(),
        );
        registry.register(
            "stale_held",
            "Devices the mass-staleness breaker holds back from being marked disconnected",
            metrics.stale_held.clone(),
        );
        registry.register(
            "shard_held",
            "1 for each shard whose Lease this replica holds (and so sweeps), 0 for the others",
            metrics.shard_held.clone(),
        );
        registry.register(
            "requests_shed",
            "Device requests answered at once (503 or 429) because a budget was full, by budget",
            metrics.requests_shed.clone(),
        );
        registry.register(
            "shard_standing_aside",
            "1 while this replica cannot renew its own shard Lease and lets another replica sweep it",
            metrics.shard_standing_aside.clone(),
        );
        // Counters alerts take rate()/increase() of start at 0: a series that first appears at N
        // (a mass disconnection in one sweep, a burst of shed requests) would hide those N.
        for kind in ["connected", "disconnected", "spec_observed"] {
            metrics
                .transitions
                .get_or_create(&TransitionLabels { kind })
                .inc_by(0);
        }
        for budget in ["requests", "long_polls", "device_long_polls"] {
            metrics
                .requests_shed
                .get_or_create(&ShedLabels { budget })
                .inc_by(0);
        }
        metrics
    }

    /// Metrics registered in a throwaway registry (tests and tools).
    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_prefix() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics
            .requests
            .get_or_create(&RequestLabels {
                route: "/v1/devices/{device}/desired",
                code: 304,
            })
            .inc();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        assert!(
            out.contains(
                "apollo_gateway_http_requests_total{route=\"/v1/devices/{device}/desired\",code=\"304\"} 1"
            ),
            "{out}"
        );
        assert!(out.contains("apollo_gateway_long_poll_waiters 0"), "{out}");
    }
}

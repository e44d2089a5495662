//! Prometheus metrics, registered into a registry the caller owns (no globals).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Outcome of one reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `ok`, `error`, `standby` (not the leader, nothing done) or `deferred` (a full reconcile of
    /// the same spec ran moments ago; it runs again once spaced, see `memory::PACE_FACTOR`).
    pub result: &'static str,
}

/// One Kubernetes write attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// Resource written, e.g. `deviceprocesses`, `deviceprocessdeployments/status`, `leases`.
    pub resource: &'static str,
    /// `create`, `patch`, `update` or `delete`.
    pub verb: &'static str,
    /// `ok`, `conflict`, `not_found` or `error`.
    pub outcome: &'static str,
}

/// Every metric the controller exports.
#[derive(Clone)]
pub struct Metrics {
    reconciles: Family<ReconcileLabels, Counter>,
    reconcile_seconds: Histogram,
    writes: Family<WriteLabels, Counter>,
    events: Family<ReconcileLabels, Counter>,
    leader: Gauge,
    leader_changes: Counter,
    remembered: Gauge,
}

impl Metrics {
    /// Create the metrics and register them under `apollo_controller_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Family::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            writes: Family::default(),
            events: Family::default(),
            leader: Gauge::default(),
            leader_changes: Counter::default(),
            remembered: Gauge::default(),
        };
        let sub = registry.sub_registry_with_prefix("apollo_controller");
        sub.register(
            "reconciles",
            "Reconciles of DeviceProcessDeployments by result",
            metrics.reconciles.clone(),
        );
        sub.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            metrics.reconcile_seconds.clone(),
        );
        sub.register(
            "kube_writes",
            "Kubernetes write requests by resource, verb and outcome",
            metrics.writes.clone(),
        );
        sub.register(
            "events",
            "Kubernetes Events published, by result",
            metrics.events.clone(),
        );
        sub.register(
            "leader",
            "1 while this replica holds the leader lease",
            metrics.leader.clone(),
        );
        sub.register(
            "leader_changes",
            "Times this replica gained or lost leadership",
            metrics.leader_changes.clone(),
        );
        sub.register(
            "remembered_deployments",
            "Deployments the controller keeps per-deployment memory of (follows the deployments that exist)",
            metrics.remembered.clone(),
        );
        metrics
    }

    /// Record how many deployments per-deployment memory is kept of.
    pub fn set_remembered_deployments(&self, n: usize) {
        self.remembered.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Count a reconcile and its duration.
    pub fn reconciled(&self, result: &'static str, seconds: f64) {
        self.reconciles
            .get_or_create(&ReconcileLabels { result })
            .inc();
        self.reconcile_seconds.observe(seconds);
    }

    /// Count a write attempt.
    pub fn write(&self, resource: &'static str, verb: &'static str, outcome: &'static str) {
        self.writes
            .get_or_create(&WriteLabels {
                resource,
                verb,
                outcome,
            })
            .inc();
    }

    /// Count an Event publication.
    pub fn event(&self, result: &'static str) {
        self.events.get_or_create(&ReconcileLabels { result }).inc();
    }

    /// Record the current leadership.
    pub fn set_leader(&self, leading: bool) {
        let previous = self.leader.set(i64::from(leading));
        if previous != i64::from(leading) {
            self.leader_changes.inc();
        }
    }
}

/// Classify a write error for the `outcome` label.
pub fn outcome_of(error: &kube::Error) -> &'static str {
    match error {
        kube::Error::Api(status) if status.code == 409 => "conflict",
        kube::Error::Api(status) if status.code == 404 => "not_found",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_prefix_and_labels() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        m.write("deviceprocesses", "create", "ok");
        m.set_leader(true);
        m.set_leader(true);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains(
            r#"apollo_controller_kube_writes_total{resource="deviceprocesses",verb="create",outcome="ok"} 1"#
        ), "{text}");
        assert!(text.contains("apollo_controller_leader 1"), "{text}");
        assert!(
            text.contains("apollo_controller_leader_changes_total 1"),
            "{text}"
        );
    }
}

//! Counters every agent updates, cheap enough to share one instance among thousands of agents
//! (the loadtest harness aggregates them) and plain enough to export from any metrics library.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The device API calls the agent makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// `POST /v1/devices/{device}/connect`.
    Connect,
    /// `GET /v1/devices/{device}/desired` (long poll).
    Desired,
    /// `POST /v1/devices/{device}/report`.
    Report,
}

impl RequestKind {
    /// Lowercase name, usable as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Desired => "desired",
            Self::Report => "report",
        }
    }
}

impl fmt::Display for RequestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestOutcome {
    /// 200 with a usable body.
    Ok,
    /// 304 Not Modified (desired only).
    NotModified,
    /// Any other HTTP status, or a 2xx body that could not be decoded.
    HttpError,
    /// No HTTP answer at all: refused, reset, timed out.
    TransportError,
}

#[derive(Debug, Default)]
struct KindCounters {
    ok: AtomicU64,
    not_modified: AtomicU64,
    http_error: AtomicU64,
    transport_error: AtomicU64,
    latency_micros: AtomicU64,
}

impl KindCounters {
    fn snapshot(&self) -> RequestCounts {
        RequestCounts {
            ok: self.ok.load(Ordering::Relaxed),
            not_modified: self.not_modified.load(Ordering::Relaxed),
            http_error: self.http_error.load(Ordering::Relaxed),
            transport_error: self.transport_error.load(Ordering::Relaxed),
            latency_micros_total: self.latency_micros.load(Ordering::Relaxed),
        }
    }
}

/// Upper bounds (inclusive, microseconds) of the report latency histogram's buckets; the last
/// bucket takes everything slower.
pub const LATENCY_BUCKETS_MICROS: [u64; 14] = [
    250,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    u64::MAX,
];

/// Counts of report latencies per bucket of [`LATENCY_BUCKETS_MICROS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Requests per bucket.
    pub counts: [u64; LATENCY_BUCKETS_MICROS.len()],
}

impl LatencyHistogram {
    /// Requests counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1), or None when empty. The true value
    /// is at most this (a histogram cannot say more).
    pub fn quantile_upper_bound(&self, q: f64) -> Option<Duration> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (count, bound) in self.counts.iter().zip(LATENCY_BUCKETS_MICROS) {
            seen += count;
            if seen >= rank {
                return Some(Duration::from_micros(bound));
            }
        }
        None
    }

    /// `self - earlier`, bucket by bucket.
    pub fn since(&self, earlier: &Self) -> Self {
        let mut out = Self::default();
        for (i, c) in out.counts.iter_mut().enumerate() {
            *c = self.counts[i].saturating_sub(earlier.counts[i]);
        }
        out
    }
}

#[derive(Debug, Default)]
struct AtomicHistogram {
    counts: [AtomicU64; LATENCY_BUCKETS_MICROS.len()],
}

impl AtomicHistogram {
    fn record(&self, micros: u64) {
        let i = LATENCY_BUCKETS_MICROS
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(LATENCY_BUCKETS_MICROS.len() - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> LatencyHistogram {
        let mut out = LatencyHistogram::default();
        for (o, c) in out.counts.iter_mut().zip(&self.counts) {
            *o = c.load(Ordering::Relaxed);
        }
        out
    }
}

/// Counters of one or many agents. All updates are relaxed atomic adds.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    connect: KindCounters,
    desired: KindCounters,
    report: KindCounters,
    report_latency: AtomicHistogram,
    new_documents: AtomicU64,
    observations_reported: AtomicU64,
    backoffs: AtomicU64,
    retry_after_honoured: AtomicU64,
}

impl AgentMetrics {
    fn kind(&self, kind: RequestKind) -> &KindCounters {
        match kind {
            RequestKind::Connect => &self.connect,
            RequestKind::Desired => &self.desired,
            RequestKind::Report => &self.report,
        }
    }

    /// Count one finished request and its latency.
    pub fn record_request(&self, kind: RequestKind, outcome: RequestOutcome, elapsed: Duration) {
        let counters = self.kind(kind);
        let counter = match outcome {
            RequestOutcome::Ok => &counters.ok,
            RequestOutcome::NotModified => &counters.not_modified,
            RequestOutcome::HttpError => &counters.http_error,
            RequestOutcome::TransportError => &counters.transport_error,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        counters.latency_micros.fetch_add(micros, Ordering::Relaxed);
        if kind == RequestKind::Report {
            self.report_latency.record(micros);
        }
    }

    pub(crate) fn record_new_document(&self) {
        self.new_documents.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_observations_reported(&self, count: usize) {
        self.observations_reported
            .fetch_add(count as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_backoff(&self, honoured_retry_after: bool) {
        self.backoffs.fetch_add(1, Ordering::Relaxed);
        if honoured_retry_after {
            self.retry_after_honoured.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A consistent-enough copy of every counter (each value is read atomically on its own).
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            connect: self.connect.snapshot(),
            desired: self.desired.snapshot(),
            report: self.report.snapshot(),
            report_latency: self.report_latency.snapshot(),
            new_documents: self.new_documents.load(Ordering::Relaxed),
            observations_reported: self.observations_reported.load(Ordering::Relaxed),
            backoffs: self.backoffs.load(Ordering::Relaxed),
            retry_after_honoured: self.retry_after_honoured.load(Ordering::Relaxed),
        }
    }
}

/// Counts of one request kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// 200s with a usable body.
    pub ok: u64,
    /// 304s.
    pub not_modified: u64,
    /// Other statuses and undecodable bodies.
    pub http_error: u64,
    /// No HTTP answer.
    pub transport_error: u64,
    /// Sum of the latencies of all requests counted here, in microseconds.
    pub latency_micros_total: u64,
}

impl RequestCounts {
    /// Every request sent, whatever its outcome.
    pub fn total(&self) -> u64 {
        self.ok + self.not_modified + self.http_error + self.transport_error
    }

    /// Requests that failed (HTTP or transport).
    pub fn errors(&self) -> u64 {
        self.http_error + self.transport_error
    }
}

/// Plain copy of [`AgentMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// `/connect` calls.
    pub connect: RequestCounts,
    /// `/desired` polls.
    pub desired: RequestCounts,
    /// `/report` calls (heartbeats and change reports).
    pub report: RequestCounts,
    /// Latency distribution of `/report` calls.
    pub report_latency: LatencyHistogram,
    /// Desired documents that differed from the one held before.
    pub new_documents: u64,
    /// Observations carried by acknowledged reports.
    pub observations_reported: u64,
    /// Waits taken after a failed request.
    pub backoffs: u64,
    /// Of those, waits lengthened to honour a `Retry-After`.
    pub retry_after_honoured: u64,
}

impl MetricsSnapshot {
    /// Counts of one request kind.
    pub fn requests(&self, kind: RequestKind) -> RequestCounts {
        match kind {
            RequestKind::Connect => self.connect,
            RequestKind::Desired => self.desired,
            RequestKind::Report => self.report,
        }
    }

    /// Every request of every kind.
    pub fn total_requests(&self) -> u64 {
        self.connect.total() + self.desired.total() + self.report.total()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_latency_histogram_gives_bucket_bounds_for_quantiles() {
        let m = AgentMetrics::default();
        for ms in [1u64, 1, 1, 1, 1, 1, 1, 1, 30, 700] {
            m.record_request(
                RequestKind::Report,
                RequestOutcome::Ok,
                Duration::from_millis(ms),
            );
        }
        m.record_request(
            RequestKind::Desired,
            RequestOutcome::Ok,
            Duration::from_secs(9),
        );
        let h = m.snapshot().report_latency;
        assert_eq!(h.total(), 10);
        assert_eq!(h.quantile_upper_bound(0.5), Some(Duration::from_millis(1)));
        assert_eq!(h.quantile_upper_bound(0.9), Some(Duration::from_millis(50)));
        assert_eq!(h.quantile_upper_bound(1.0), Some(Duration::from_secs(1)));
        assert_eq!(LatencyHistogram::default().quantile_upper_bound(0.5), None);
        assert_eq!(h.since(&h).total(), 0);
    }

    #[test]
    fn counts_by_kind_and_outcome() {
        let m = AgentMetrics::default();
        m.record_request(
            RequestKind::Desired,
            RequestOutcome::Ok,
            Duration::from_millis(2),
        );
        m.record_request(
            RequestKind::Desired,
            RequestOutcome::NotModified,
            Duration::from_millis(3),
        );
        m.record_request(
            RequestKind::Report,
            RequestOutcome::TransportError,
            Duration::ZERO,
        );
        m.record_backoff(true);
        m.record_backoff(false);
        let s = m.snapshot();
        assert_eq!(s.desired.ok, 1);
        assert_eq!(s.desired.not_modified, 1);
        assert_eq!(s.desired.latency_micros_total, 5_000);
        assert_eq!(s.report.errors(), 1);
        assert_eq!(s.connect.total(), 0);
        assert_eq!(s.total_requests(), 3);
        assert_eq!((s.backoffs, s.retry_after_honoured), (2, 1));
    }
}

//! The run over time: every few seconds, throughput, latency, connected devices and each stack
//! process's CPU and memory, for the JSON and the chart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apollo_agent::{AgentMetrics, MetricsSnapshot};
use tokio_util::sync::CancellationToken;

use crate::procstat;

/// One point of the timeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Seconds since the first agent started.
    pub t: f64,
    /// Agent requests per second over the last interval (every kind).
    pub requests_per_second: f64,
    /// Reports per second over the last interval.
    pub reports_per_second: f64,
    /// Failed requests in the interval.
    pub errors: u64,
    /// Report latency p50 over the interval (upper bound of its bucket), ms; null: above 2 s.
    pub p50_ms: f64,
    /// Report latency p99 over the interval (upper bound of its bucket), ms; null: above 2 s.
    pub p99_ms: f64,
    /// Agents started so far.
    pub agents_started: usize,
    /// Long polls the gateways hold (sum of `apollo_gateway_long_poll_waiters`): the devices
    /// connected and waiting for their next document. None without the local stack.
    pub long_polls_held: Option<f64>,
    /// Per stack process: CPU over the interval (percent of one core).
    pub cpu_percent: BTreeMap<String, f64>,
    /// Per stack process: RSS, MiB.
    pub rss_mib: BTreeMap<String, f64>,
}

/// Where the gateways' metrics are (admin addresses), asked afresh at every sample.
pub type GatewayAdmins = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// The sampler: runs until cancelled, then hands back its samples.
pub struct Timeline {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

async fn long_polls_held(http: &reqwest::Client, admins: &[String]) -> Option<f64> {
    let mut total = 0.0;
    for admin in admins {
        let text = http
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        total +=
            apollo_test_support::metrics::value(&text, "apollo_gateway_long_poll_waiters", &[])
                .unwrap_or(0.0);
    }
    Some(total)
}

fn append_line(path: &Path, sample: &Sample) {
    use std::io::Write as _;
    let Ok(mut line) = serde_json::to_vec(sample) else {
        return;
    };
    line.push(b'\n');
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path);
    if let Err(e) = file.and_then(|mut f| f.write_all(&line)) {
        eprintln!("loadtest: cannot append to {}: {e}", path.display());
    }
}

/// The quantile's bucket bound in ms; infinite (null in the JSON) past the histogram's last
/// finite bucket (2 s).
pub fn quantile_ms(h: &apollo_agent::LatencyHistogram, q: f64) -> f64 {
    match h.quantile_upper_bound(q) {
        None => 0.0,
        Some(d) if d == std::time::Duration::from_micros(u64::MAX) => f64::INFINITY,
        Some(d) => d.as_secs_f64() * 1000.0,
    }
}

impl Timeline {
    /// Samples every `interval` from now on; each sample is also appended to `jsonl` as it is
    /// taken (one JSON object per line), so a run that is stopped early leaves its timeline.
    pub fn start(
        interval: Duration,
        metrics: Arc<AgentMetrics>,
        started: Arc<AtomicUsize>,
        gateways: Option<GatewayAdmins>,
        jsonl: Option<PathBuf>,
    ) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let samples = samples.clone();
            let stop = stop.clone();
            async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(2))
                    .build()
                    .unwrap_or_default();
                let t0 = Instant::now();
                let mut last: MetricsSnapshot = metrics.snapshot();
                let mut last_procs = procstat::snapshot();
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(interval) => {}
                    }
                    let now = metrics.snapshot();
                    let procs = tokio::task::spawn_blocking(procstat::snapshot)
                        .await
                        .unwrap_or_else(|_| procstat::snapshot());
                    let secs = procs
                        .at
                        .duration_since(last_procs.at)
                        .as_secs_f64()
                        .max(1e-9);
                    let held = match &gateways {
                        Some(admins) => long_polls_held(&http, &admins()).await,
                        None => None,
                    };
                    let latency = now.report_latency.since(&last.report_latency);
                    let total = |s: &MetricsSnapshot| {
                        s.connect.total() + s.desired.total() + s.report.total()
                    };
                    let errors = |s: &MetricsSnapshot| {
                        s.connect.errors() + s.desired.errors() + s.report.errors()
                    };
                    let usage = procstat::between(&last_procs, &procs);
                    let sample = Sample {
                        t: t0.elapsed().as_secs_f64(),
                        requests_per_second: (total(&now) - total(&last)) as f64 / secs,
                        reports_per_second: (now.report.total() - last.report.total()) as f64
                            / secs,
                        errors: errors(&now) - errors(&last),
                        p50_ms: quantile_ms(&latency, 0.5),
                        p99_ms: quantile_ms(&latency, 0.99),
                        agents_started: started.load(Ordering::Relaxed),
                        long_polls_held: held,
                        cpu_percent: usage
                            .iter()
                            .map(|u| (u.role.clone(), u.cpu_percent))
                            .collect(),
                        rss_mib: usage.iter().map(|u| (u.role.clone(), u.rss_mib)).collect(),
                    };
                    if let Some(path) = &jsonl {
                        append_line(path, &sample);
                        eprintln!(
                            "loadtest: t={:.0}s agents {} held {} req/s {:.0} reports/s {:.0} p50 {} ms p99 {} ms errors {}",
                            sample.t,
                            sample.agents_started,
                            sample.long_polls_held.map_or(-1.0, |h| h),
                            sample.requests_per_second,
                            sample.reports_per_second,
                            sample.p50_ms,
                            sample.p99_ms,
                            sample.errors
                        );
                    }
                    if let Ok(mut s) = samples.lock() {
                        s.push(sample);
                    }
                    last = now;
                    last_procs = procs;
                }
            }
        });
        Self {
            samples,
            task,
            stop,
        }
    }

    /// Stops sampling and returns the samples.
    pub async fn finish(self) -> Vec<Sample> {
        self.stop.cancel();
        let _ = self.task.await;
        let samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        samples
    }
}

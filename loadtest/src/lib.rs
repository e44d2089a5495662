//! The load test harness: thousands of real agents (the `apollo-agent` library) in one process,
//! against a router, over HTTP/1.1 connections of their own or multiplexed on HTTP/2 connections
//! (see [`clients`]); the CPU and memory of every process of the stack ([`procstat`]), the run
//! over time ([`timeline`]) and its chart ([`chart`]).
//!
//! Two modes:
//! - `--local-stack` (default when no `--router-url` is given): starts the whole stack on loopback
//!   (the real control plane, redis-server, controller, N gateways, router), creates one
//!   NetworkSwitch per simulated device and a DeviceProcessDeployment selecting them all, and
//!   measures what matters to operators: time to converge, agent request rates and latencies, the
//!   200/304 split, and the Kubernetes API requests Apollo's components spent in steady state and
//!   per rollout wave (read from kube-apiserver's audit log).
//! - `--router-url URL --secret-file F`: drives an existing deployment; agent-side numbers only.
#![forbid(unsafe_code)]

pub mod chart;
pub mod clients;
pub mod faults;
pub mod fleet;
pub mod procstat;
pub mod rollout;
pub mod run;
pub mod timeline;

pub use run::{run, ApiCost, Results};

use std::path::PathBuf;
use std::time::Duration;

use apollo_agent::{MetricsSnapshot, RequestCounts};
use apollo_runtime::duration::DurationParser;
use apollo_runtime::shell::LogArgs;
use clap::Parser;

/// Command line of `loadtest`.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadtest",
    about = "Simulate thousands of Apollo agents and report the numbers"
)]
pub struct Args {
    /// Simulated devices (one agent each).
    #[arg(long, env = "APOLLO_LT_DEVICES", default_value_t = 2000)]
    pub devices: usize,
    /// Steady-state measurement window (`60s`, `5m`).
    #[arg(long, env = "APOLLO_LT_DURATION", default_value = "60s", value_parser = WINDOW)]
    duration: Duration,
    /// Agents are started evenly over this long.
    #[arg(long, env = "APOLLO_LT_RAMP", default_value = "10s", value_parser = WINDOW)]
    ramp: Duration,
    /// Gateway replicas of the local stack.
    #[arg(long, env = "APOLLO_LT_GATEWAYS", default_value_t = 3)]
    pub gateways: u32,
    /// Heartbeat interval the gateways announce (local stack), whole seconds.
    #[arg(long, env = "APOLLO_LT_HEARTBEAT_INTERVAL", default_value = "15s",
          value_parser = HEARTBEAT)]
    heartbeat_interval: Duration,
    /// Long-poll wait of each agent, whole seconds.
    #[arg(long, env = "APOLLO_LT_POLL_WAIT", default_value = "30s", value_parser = POLL_WAIT)]
    poll_wait: Duration,
    /// Old spelling of --duration: seconds.
    #[arg(long, env = "APOLLO_LT_DURATION_SECONDS", hide = true, conflicts_with = "duration",
          value_parser = WINDOW)]
    duration_seconds: Option<Duration>,
    /// Old spelling of --ramp: seconds.
    #[arg(long, env = "APOLLO_LT_RAMP_SECONDS", hide = true, conflicts_with = "ramp",
          value_parser = WINDOW)]
    ramp_seconds: Option<Duration>,
    /// Old spelling of --heartbeat-interval: seconds.
    #[arg(long, env = "APOLLO_LT_HEARTBEAT_SECONDS", hide = true,
          conflicts_with = "heartbeat_interval", value_parser = HEARTBEAT)]
    heartbeat_interval_seconds: Option<Duration>,
    /// Old spelling of --poll-wait: seconds.
    #[arg(long, env = "APOLLO_LT_POLL_WAIT_SECONDS", hide = true, conflicts_with = "poll_wait",
          value_parser = POLL_WAIT)]
    poll_wait_seconds: Option<Duration>,
    /// Skip the rollout wave (template change) measurement.
    #[arg(long, env = "APOLLO_LT_NO_ROLLOUT")]
    pub no_rollout: bool,
    /// `maxUnavailable` of the measured rollout wave: a count or a percentage of the devices.
    #[arg(long, env = "APOLLO_LT_MAX_UNAVAILABLE", default_value = "25%")]
    pub max_unavailable: String,
    /// Measure an `AllAtOnce` wave instead of a rolling update.
    #[arg(long, env = "APOLLO_LT_ALL_AT_ONCE")]
    pub all_at_once: bool,
    /// Drive an existing router instead of starting the local stack.
    #[arg(long, env = "APOLLO_LT_ROUTER_URL", requires = "secret_file")]
    pub router_url: Option<String>,
    /// HMAC key file of the existing deployment (device tokens are derived from it).
    #[arg(long, env = "APOLLO_LT_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// The local stack's gateways and router use this Redis instead of a redis-server of their
    /// own: `redis://host:port`, or a Redis Cluster (`redis+cluster://host:port,host:port/` or a
    /// list of `redis://` URLs; see apollo_runtime::redis).
    #[arg(long, env = "APOLLO_LT_REDIS_URL", value_parser = redis_url,
          conflicts_with_all = ["redis_cluster", "router_url"])]
    pub redis_url: Option<String>,
    /// The local stack runs a Redis Cluster of this many masters (3 or more, one replica each)
    /// instead of one redis-server.
    #[arg(long, env = "APOLLO_LT_REDIS_CLUSTER", value_parser = clap::value_parser!(u8).range(3..),
          conflicts_with = "router_url")]
    pub redis_cluster: Option<u8>,
    /// Device name prefix.
    #[arg(long, env = "APOLLO_LT_PREFIX", default_value = "lt")]
    pub prefix: String,
    /// Where the local stack keeps its logs.
    #[arg(long, env = "APOLLO_LT_WORK_DIR", default_value = "target/loadtest")]
    pub work_dir: PathBuf,
    /// Also write the results as JSON here, and the timeline chart next to it (`.svg`).
    #[arg(long, env = "APOLLO_LT_JSON")]
    pub json: Option<PathBuf>,
    /// Agents sharing one HTTP/2 connection to the router; 0: HTTP/1.1, every agent with its
    /// own connections (fewer than 10,000 agents fit the 20,000 file descriptors of a process).
    #[arg(long, env = "APOLLO_LT_AGENTS_PER_CONNECTION", default_value_t = 0)]
    pub agents_per_connection: usize,
    /// How often the timeline (throughput, latency, connected devices, CPU and memory of every
    /// process) is sampled.
    #[arg(long, env = "APOLLO_LT_SAMPLE_INTERVAL", default_value = "5s", value_parser = SAMPLE)]
    sample_interval: Duration,
    /// Only the first N devices get a NetworkSwitch and a DeviceProcess (local stack); the other
    /// agents connect, long-poll and report for devices Kubernetes does not know (an empty
    /// desired document, no status to write): the data path at full fleet size, without the
    /// control plane's cost of creating and converging every DeviceProcess. Default: all.
    #[arg(long, env = "APOLLO_LT_KUBE_DEVICES")]
    pub kube_devices: Option<usize>,
    /// The gateways' `--kube-writes-per-second` (local stack): the Kubernetes write budget of
    /// each replica.
    #[arg(long, env = "APOLLO_LT_KUBE_WRITES_PER_SECOND", default_value_t = 50.0)]
    pub kube_writes_per_second: f64,
    /// Warnings of the agents and the harness go to stderr (`RUST_LOG` for more).
    #[command(flatten)]
    pub log: LogArgs,
    /// Faults injected after convergence (local stack; see [`faults`]).
    #[command(flatten)]
    pub fault: faults::FaultArgs,
}

/// A `--redis-url` in any of its forms, checked here so that a typo exits before the stack starts.
fn redis_url(url: &str) -> Result<String, String> {
    apollo_runtime::redis::RedisTarget::parse(url)
        .map(|_| url.to_owned())
        .map_err(|e| e.to_string())
}

impl Args {
    /// The Redis of the local stack (`--redis-url`, `--redis-cluster`, else a redis-server).
    pub fn redis_choice(&self) -> apollo_dev::RedisChoice {
        match (&self.redis_url, self.redis_cluster) {
            (Some(url), _) => apollo_dev::RedisChoice::External(url.clone()),
            (None, Some(masters)) => apollo_dev::RedisChoice::Cluster {
                masters: usize::from(masters),
                replicas: 1,
            },
            (None, None) => apollo_dev::RedisChoice::Server,
        }
    }
}

/// Timeline sampling.
const SAMPLE: DurationParser = DurationParser::new()
    .at_least(Duration::from_secs(1))
    .at_most(Duration::from_secs(600));
/// Measurement windows and ramps.
const WINDOW: DurationParser = DurationParser::new().at_most(Duration::from_secs(24 * 3600));
/// The gateways announce whole seconds.
const HEARTBEAT: DurationParser = DurationParser::new()
    .at_least(Duration::from_secs(1))
    .at_most(Duration::from_secs(3600))
    .whole_seconds();
/// Sent as `waitSeconds`.
const POLL_WAIT: DurationParser = DurationParser::new()
    .at_most(Duration::from_secs(apollo_protocol::MAX_WAIT_SECONDS))
    .whole_seconds();

impl Args {
    /// Steady-state measurement window (`--duration`, or its old spelling).
    pub fn duration(&self) -> Duration {
        self.duration_seconds.unwrap_or(self.duration)
    }

    /// Ramp of the agents' start (`--ramp`, or its old spelling).
    pub fn ramp(&self) -> Duration {
        self.ramp_seconds.unwrap_or(self.ramp)
    }

    /// Heartbeat interval of the local stack (`--heartbeat-interval`, or its old spelling).
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval_seconds
            .unwrap_or(self.heartbeat_interval)
    }

    /// Long-poll wait of each agent (`--poll-wait`, or its old spelling).
    pub fn poll_wait(&self) -> Duration {
        self.poll_wait_seconds.unwrap_or(self.poll_wait)
    }

    /// Timeline sampling interval.
    pub fn sample_interval(&self) -> Duration {
        self.sample_interval
    }
}

/// Device names of the run.
pub fn device_names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// Agent-side numbers over one window.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Window {
    /// Window length in seconds.
    pub seconds: f64,
    /// Requests per second of every kind.
    pub requests_per_second: f64,
    /// /desired answered 200.
    pub desired_200: u64,
    /// /desired answered 304.
    pub desired_304: u64,
    /// /report calls.
    pub reports: u64,
    /// Reports per second.
    pub reports_per_second: f64,
    /// Mean report latency, ms.
    pub report_mean_ms: f64,
    /// Report latency p50 (upper bound of its histogram bucket), ms.
    pub report_p50_ms: f64,
    /// Report latency p99 (upper bound of its histogram bucket), ms; infinite (null) above 2 s.
    pub report_p99_ms: f64,
    /// Failed requests of every kind.
    pub errors: u64,
}

fn diff(after: RequestCounts, before: RequestCounts) -> RequestCounts {
    RequestCounts {
        ok: after.ok - before.ok,
        not_modified: after.not_modified - before.not_modified,
        http_error: after.http_error - before.http_error,
        transport_error: after.transport_error - before.transport_error,
        latency_micros_total: after.latency_micros_total - before.latency_micros_total,
    }
}

/// Numbers between two snapshots taken `elapsed` apart.
pub fn window(before: &MetricsSnapshot, after: &MetricsSnapshot, elapsed: Duration) -> Window {
    let desired = diff(after.desired, before.desired);
    let report = diff(after.report, before.report);
    let connect = diff(after.connect, before.connect);
    let secs = elapsed.as_secs_f64().max(1e-9);
    let latency = after.report_latency.since(&before.report_latency);
    let q = |p: f64| timeline::quantile_ms(&latency, p);
    let total = desired.total() + report.total() + connect.total();
    Window {
        seconds: secs,
        requests_per_second: total as f64 / secs,
        desired_200: desired.ok,
        desired_304: desired.not_modified,
        reports: report.total(),
        reports_per_second: report.total() as f64 / secs,
        report_mean_ms: if report.total() == 0 {
            0.0
        } else {
            report.latency_micros_total as f64 / report.total() as f64 / 1000.0
        },
        errors: desired.errors() + report.errors() + connect.errors(),
        report_p50_ms: q(0.5),
        report_p99_ms: q(0.99),
    }
}

/// The results as a Markdown table.
pub fn render(r: &Results) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "| metric | value |\n|---|---|\n| devices (agents) | {} |\n| gateway replicas | {} |\n",
        r.devices, r.gateways
    ));
    if let Some(c) = r.converge_seconds {
        out.push_str(&format!(
            "| time to converge (all AgentConnected + SpecObserved) | {c:.1} s |\n"
        ));
    }
    let s = &r.steady;
    let polls = s.desired_200 + s.desired_304;
    out.push_str(&format!(
        "| steady window | {:.0} s |\n| agent requests/s | {:.0} |\n| reports/s | {:.0} |\n| report latency mean / p50 / p99 | {:.2} ms / <= {} ms / <= {} ms |\n| desired polls 200 / 304 | {} / {} ({:.1}% 304) |\n| errors | {} |\n",
        s.seconds,
        s.requests_per_second,
        s.reports_per_second,
        s.report_mean_ms,
        s.report_p50_ms,
        s.report_p99_ms,
        s.desired_200,
        s.desired_304,
        if polls == 0 { 0.0 } else { 100.0 * s.desired_304 as f64 / polls as f64 },
        s.errors
    ));
    if let Some(a) = &r.steady_api {
        out.push_str(&format!(
            "| steady state: DeviceProcess writes / Event writes / Lists | {} / {} / {} |\n| steady state: Lease writes (elections, shard leases) | {} |\n",
            a.deviceprocess_writes, a.event_writes, a.lists, a.lease_writes
        ));
    }
    if let Some(flips) = r.steady_false_disconnects {
        out.push_str(&format!(
            "| steady state: false disconnects (AgentConnected True -> False) | {flips} |\n"
        ));
    }
    if let Some(c) = r.create_seconds {
        out.push_str(&format!(
            "| NetworkSwitches created -> every DeviceProcess exists | {c:.1} s |\n"
        ));
    }
    out.push_str(&format!(
        "| agent connections | {} |\n",
        if r.agents_per_connection == 0 {
            format!("HTTP/1.1, own connections ({} pools)", r.agent_clients)
        } else {
            format!(
                "HTTP/2, {} agents per connection ({} connections)",
                r.agents_per_connection, r.agent_clients
            )
        }
    ));
    if let Some(wave) = &r.rollout {
        out.push_str(&rollout::render(wave, r.devices));
    }
    out.push_str("\n| process | CPU (steady, % of a core) | RSS (MiB) | peak RSS (MiB) | RSS growth per agent |\n|---|---|---|---|---|\n");
    for p in &r.resources.steady {
        let growth = r
            .resources
            .rss_growth_per_agent_bytes
            .get(&p.role)
            .map_or_else(|| "-".to_owned(), |b| format!("{:.0} B", b));
        out.push_str(&format!(
            "| {} | {:.1} | {:.0} | {:.0} | {growth} |\n",
            p.role, p.cpu_percent, p.rss_mib, p.rss_peak_mib
        ));
    }
    out.push_str(&faults::render(&r.faults));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{rollout_deadline, write_budget_time};
    use clap::CommandFactory;

    #[test]
    fn write_budget_time_grows_with_the_fleet_and_shrinks_with_replicas() {
        let base = Duration::from_secs(120);
        // 10000 devices on 3 replicas: 20000 writes at 150/s is 133 s at best; allow twice that.
        let t = write_budget_time(10_000, 3);
        assert!(t > base + Duration::from_secs(266) && t < base + Duration::from_secs(267));
        assert!(write_budget_time(10_000, 6) < t);
        assert!(write_budget_time(0, 0) == base);
    }

    #[test]
    fn the_rollout_deadline_grows_with_the_number_of_waves() {
        let rolling = |m: &str| rollout::Strategy {
            all_at_once: false,
            max_unavailable: m.into(),
        };
        let ten_waves = rollout_deadline(10_000, 3, &rolling("10%"));
        assert_eq!(
            ten_waves,
            write_budget_time(10_000, 3) + Duration::from_secs(100)
        );
        assert!(rollout_deadline(10_000, 3, &rolling("1%")) > ten_waves);
        let bulk = rollout::Strategy {
            all_at_once: true,
            max_unavailable: "1".into(),
        };
        assert_eq!(
            rollout_deadline(100, 1, &bulk),
            write_budget_time(100, 1) + Duration::from_secs(10)
        );
    }

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn durations_take_the_shared_syntax_and_the_old_spellings_their_seconds() {
        let args = Args::try_parse_from(["loadtest"]).expect("defaults");
        assert_eq!(args.duration(), Duration::from_secs(60));
        assert_eq!(args.ramp(), Duration::from_secs(10));
        assert_eq!(args.heartbeat_interval(), Duration::from_secs(15));
        assert_eq!(args.poll_wait(), Duration::from_secs(30));
        let args = Args::try_parse_from([
            "loadtest",
            "--duration",
            "2m",
            "--ramp",
            "1500ms",
            "--heartbeat-interval",
            "5s",
        ])
        .expect("new spellings");
        assert_eq!(args.duration(), Duration::from_secs(120));
        assert_eq!(args.ramp(), Duration::from_millis(1500));
        assert_eq!(args.heartbeat_interval(), Duration::from_secs(5));
        let args = Args::try_parse_from([
            "loadtest",
            "--duration-seconds",
            "90",
            "--heartbeat-interval-seconds",
            "1",
            "--poll-wait-seconds",
            "20",
        ])
        .expect("old spellings");
        assert_eq!(args.duration(), Duration::from_secs(90));
        assert_eq!(args.heartbeat_interval(), Duration::from_secs(1));
        assert_eq!(args.poll_wait(), Duration::from_secs(20));
        assert!(Args::try_parse_from(["loadtest", "--poll-wait", "1500ms"]).is_err());
        assert!(Args::try_parse_from(["loadtest", "--ramp", "5s", "--ramp-seconds", "5"]).is_err());
    }

    #[test]
    fn an_unknown_log_format_is_refused() {
        let error =
            Args::try_parse_from(["loadtest", "--log-format", "bogus"]).expect_err("refused");
        assert!(
            error.to_string().contains("[possible values: text, json]"),
            "{error}"
        );
    }

    #[test]
    fn the_stack_s_redis_is_a_server_a_cluster_or_given() {
        use apollo_dev::RedisChoice;
        let parse = |args: &[&str]| Args::try_parse_from(args).map(|a| a.redis_choice());
        assert_eq!(parse(&["loadtest"]).expect("ok"), RedisChoice::Server);
        assert_eq!(
            parse(&["loadtest", "--redis-cluster", "3"]).expect("ok"),
            RedisChoice::Cluster {
                masters: 3,
                replicas: 1
            }
        );
        let url = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001/";
        assert_eq!(
            parse(&["loadtest", "--redis-url", url]).expect("ok"),
            RedisChoice::External(url.to_owned())
        );
        for refused in [
            &["loadtest", "--redis-cluster", "2"][..],
            &["loadtest", "--redis-url", "redis+cluster://"],
            &[
                "loadtest",
                "--redis-url",
                "redis://h:1",
                "--redis-cluster",
                "3",
            ],
        ] {
            assert!(parse(refused).is_err(), "{refused:?}");
        }
    }

    #[test]
    fn router_url_needs_a_secret_file() {
        assert!(Args::try_parse_from(["loadtest", "--router-url", "http://x"]).is_err());
    }

    #[test]
    fn device_names_are_stable_and_padded() {
        assert_eq!(device_names("lt", 2), ["lt-00000", "lt-00001"]);
    }
}

//! End to end: the real `apollo-gateway` binary (running as its own ServiceAccount), the real
//! Kubernetes control plane, redis-server and the agent (the binary, or the library where a test
//! needs its request counters).
//!
//! Needs the gateway binary next to this test's executable: `cargo build --workspace --bins`
//! first (scripts/test.sh does it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use apollo_agent::{Agent, AgentConfig, AgentMetrics};
use apollo_protocol::hash::value_hash;
use apollo_protocol::token::device_token;
use apollo_test_support::{
    binary, free_port, metrics, send_ok, wait_for, wait_until, Component, ControlPlane, Proc,
    RedisServer, TestNamespace,
};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "e2e-secret";
/// Heartbeat interval the gateway announces; with STALE_MULTIPLIER it makes a 2 s stale window.
const HEARTBEAT_SECONDS: u64 = 1;
const STALE_MULTIPLIER: u32 = 2;

struct Stack {
    /// The test's own namespace (CRDs installed, the gateway's identity, audit-log counts).
    ns: TestNamespace,
    apiserver_url: String,
    gateway_kubeconfig: std::path::PathBuf,
    /// Talks to the apiserver as the cluster admin (the test's own setup and reads).
    admin: reqwest::Client,
    _redis: RedisServer,
    redis_url: String,
    gateway: Option<Proc>,
    gateway_port: u16,
    admin_port: u16,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

/// An HTTP client authenticating as the control plane's admin (`system:masters`, the client
/// certificate behind its admin kubeconfig), trusting only the control plane's CA.
fn admin_http(control_plane: &ControlPlane) -> reqwest::Client {
    let read = |path: std::path::PathBuf| {
        std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    };
    let pki = control_plane.dir().join("pki");
    let mut identity = read(pki.join("admin.crt"));
    identity.extend(read(pki.join("admin.key")));
    reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&read(control_plane.ca_file())).expect("CA"),
        )
        .tls_built_in_root_certs(false)
        .identity(reqwest::Identity::from_pem(&identity).expect("admin identity"))
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .expect("admin http client")
}

impl Stack {
    async fn start() -> Self {
        let control_plane = ControlPlane::shared().await;
        let ns = TestNamespace::create(control_plane, "agent-e2e").await;
        let gateway_kubeconfig = ns.kubeconfig_for(Component::Gateway).await;
        let redis = RedisServer::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).expect("write secret");
        let mut stack = Self {
            redis_url: redis.url(),
            apiserver_url: control_plane.apiserver_url().to_owned(),
            admin: admin_http(control_plane),
            gateway_kubeconfig,
            ns,
            _redis: redis,
            gateway: None,
            gateway_port: free_port(),
            admin_port: free_port(),
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .no_proxy()
                .build()
                .expect("http client"),
        };
        stack.start_gateway().await;
        stack
    }

    fn gateway_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_port)
    }

    async fn start_gateway(&mut self) {
        let proc = Proc::builder(binary("apollo-gateway"))
            .name(format!("gateway-{}", self.gateway_port))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.gateway_port))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", self.admin_port))
            .arg("--redis-url")
            .arg(&self.redis_url)
            .arg("--auth-secret-file")
            .arg(self.dir.path().join("secret"))
            .args([
                "--heartbeat-interval-seconds",
                &HEARTBEAT_SECONDS.to_string(),
            ])
            .args(["--stale-multiplier", &STALE_MULTIPLIER.to_string()])
            .args(["--sweep-interval-seconds", "0.2"])
            // Concurrent tests share the control plane: this gateway sees its own namespace.
            .args(["--namespace", self.ns.name()])
            .args(["--lease-namespace", self.ns.name()])
            // No Lease renewal (every third of the duration) within a test's write counts.
            .args(["--shard-lease-seconds", "600"])
            .env("KUBECONFIG", &self.gateway_kubeconfig)
            .env_remove("POD_NAMESPACE")
            .spawn();
        self.gateway = Some(proc);
        let ready = format!("http://127.0.0.1:{}/readyz", self.admin_port);
        wait_until(Duration::from_secs(15), "gateway /readyz", || {
            let request = self.http.get(&ready).send();
            async move { request.await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
    }

    async fn stop_gateway(&mut self) {
        if let Some(mut gateway) = self.gateway.take() {
            gateway.terminate(Duration::from_secs(10)).await;
        }
    }

    fn agent_binary(&self, device: &str) -> Proc {
        // APOLLO_AGENT_BIN runs another build of the agent (to show a test failing on it).
        let bin = std::env::var("APOLLO_AGENT_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_apollo-agent").to_owned());
        Proc::builder(bin)
            .name(format!("agent-{device}"))
            .env("APOLLO_DEVICE_NAME", device)
            .env("APOLLO_GATEWAY_URL", self.gateway_url())
            .env(
                "APOLLO_DEVICE_TOKEN",
                device_token(SECRET.as_bytes(), device),
            )
            .env_remove("APOLLO_DEVICE_TOKEN_FILE")
            .spawn()
    }

    fn admin_metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.admin_port)
    }

    fn url(&self, name: &str) -> String {
        format!(
            "{}/apis/azure.com/v1alpha1/namespaces/{}/deviceprocesses{}",
            self.apiserver_url,
            self.ns.name(),
            if name.is_empty() {
                String::new()
            } else {
                format!("/{name}")
            }
        )
    }

    async fn create_process(&self, name: &str, device: &str, args: &[&str]) {
        let body = json!({
            "apiVersion": "azure.com/v1alpha1",
            "kind": "DeviceProcess",
            "metadata": {"name": name, "namespace": self.ns.name()},
            "spec": {
                "deviceRef": {"name": device},
                "artifact": {"type": "oci", "url": "alpine:3.19"},
                "execution": {"backend": "container", "args": args},
            },
        });
        let request = self.admin.post(self.url("")).json(&body);
        send_ok(request, &format!("create {name}")).await;
    }

    async fn set_args(&self, name: &str, args: &[&str]) {
        let request = self
            .admin
            .patch(self.url(name))
            .header("content-type", "application/merge-patch+json")
            .body(json!({"spec": {"execution": {"args": args}}}).to_string());
        send_ok(request, &format!("patch {name}")).await;
    }

    async fn get(&self, name: &str) -> Value {
        send_ok(self.admin.get(self.url(name)), &format!("get {name}"))
            .await
            .json()
            .await
            .expect("json")
    }

    /// Events about `name` with `reason`.
    async fn events(&self, name: &str, reason: &str) -> usize {
        let url = format!(
            "{}/apis/events.k8s.io/v1/namespaces/{}/events",
            self.apiserver_url,
            self.ns.name()
        );
        let list: Value = send_ok(self.admin.get(url), "list events")
            .await
            .json()
            .await
            .expect("json");
        list["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
                    .count()
            })
            .unwrap_or(0)
    }

    /// Status writes the apiserver served to the gateway (audit log).
    async fn status_patches(&self) -> u64 {
        self.ns
            .count("patch", "deviceprocesses", Some("status"))
            .await
            + self
                .ns
                .count("update", "deviceprocesses", Some("status"))
                .await
    }

    /// Reports the gateway has answered so far (from its /metrics).
    async fn reports_served(&self) -> f64 {
        metrics::scrape(
            &self.http,
            &self.admin_metrics_url(),
            "apollo_gateway_http_requests_total",
            &[r#"route="/v1/devices/{device}/report""#],
        )
        .await
    }
}

fn condition<'a>(dp: &'a Value, kind: &str) -> Option<&'a str> {
    dp["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)?["status"]
        .as_str()
}

/// The status the whole loop should produce: Pending, connected, current spec observed.
fn fully_observed(dp: &Value) -> bool {
    let spec_hash = value_hash(&dp["spec"]);
    dp["status"]["phase"] == "Pending"
        && condition(dp, "AgentConnected") == Some("True")
        && condition(dp, "SpecObserved") == Some("True")
        && dp["status"]["observedSpecHash"] == spec_hash.as_str()
}

#[tokio::test]
async fn creation_and_spec_edits_are_observed_within_a_second() {
    let stack = Stack::start().await;
    let device = "tor1-01";
    let mut agent = stack.agent_binary(device);
    agent
        .wait_for_log("new desired document", Duration::from_secs(10))
        .await;

    let created = Instant::now();
    stack
        .create_process("logger-tor1-01", device, &["v1"])
        .await;
    let dp = wait_for(
        Duration::from_secs(1),
        "status of the new DeviceProcess",
        || async {
            let dp = stack.get("logger-tor1-01").await;
            fully_observed(&dp).then_some(dp)
        },
    )
    .await;
    eprintln!("created -> observed in {:?}", created.elapsed());
    let first_hash = dp["status"]["observedSpecHash"].clone();

    let edited = Instant::now();
    stack.set_args("logger-tor1-01", &["v2"]).await;
    let dp = wait_for(
        Duration::from_secs(1),
        "status after the spec edit",
        || async {
            let dp = stack.get("logger-tor1-01").await;
            (fully_observed(&dp) && dp["status"]["observedSpecHash"] != first_hash).then_some(dp)
        },
    )
    .await;
    eprintln!("edited -> observed in {:?}", edited.elapsed());
    assert_eq!(
        dp["status"]["observedGeneration"],
        dp["metadata"]["generation"]
    );
    // The Event follows the status patch that it explains.
    wait_until(
        Duration::from_secs(5),
        "two SpecObserved Events",
        || async { stack.events("logger-tor1-01", "SpecObserved").await == 2 },
    )
    .await;

    // Steady state: heartbeats keep coming, Kubernetes sees no writes.
    let writes = stack.status_patches().await;
    let all_writes = stack.ns.writes(None).await;
    let heartbeats = agent.logs().len();
    let reports = stack.reports_served().await;
    wait_until(
        Duration::from_secs(3 * HEARTBEAT_SECONDS + 5),
        "three more heartbeats served",
        || async { stack.reports_served().await >= reports + 3.0 },
    )
    .await;
    assert_eq!(
        stack.status_patches().await,
        writes,
        "heartbeats must not write status"
    );
    assert_eq!(
        stack.ns.writes(None).await,
        all_writes,
        "heartbeats must not write anything: {:?}",
        stack.ns.requests().await
    );
    assert_eq!(
        agent.logs().len(),
        heartbeats,
        "the agent logs nothing in steady state"
    );
    assert_eq!(stack.events("logger-tor1-01", "SpecObserved").await, 2);
    assert!(agent.is_running());
}

#[tokio::test]
async fn a_gateway_outage_costs_bounded_requests_and_the_agent_recovers() {
    let mut stack = Stack::start().await;
    let device = "tor2-01";
    stack
        .create_process("logger-tor2-01", device, &["v1"])
        .await;

    let metrics = Arc::new(AgentMetrics::default());
    let mut config = AgentConfig::new(device, stack.gateway_url().parse().expect("url"));
    config.device_token = Some(device_token(SECRET.as_bytes(), device));
    // With the default 30 s cap recovery could take that long; 8 s keeps the test short while
    // the waits still grow well past the heartbeat interval.
    config.backoff.cap = Duration::from_secs(8);
    let agent = Agent::new(
        config,
        apollo_agent::http_client().expect("client"),
        metrics.clone(),
    )
    .expect("agent");
    let cancel = CancellationToken::new();
    let _stop = cancel.clone().drop_guard();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { agent.run(cancel).await }
    });
    wait_until(
        Duration::from_secs(5),
        "observed before the outage",
        || async { fully_observed(&stack.get("logger-tor2-01").await) },
    )
    .await;

    stack.stop_gateway().await;
    let before = metrics.snapshot();
    // The outage itself: ten seconds without a gateway.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = metrics.snapshot();
    let attempts = during.total_requests() - before.total_requests();
    // Two loops backing off from 500 ms to the 8 s cap with full jitter make about a dozen
    // attempts in 10 s; retrying at the heartbeat and poll intervals would be about 20, a hot
    // loop thousands.
    assert!(
        (2..=24).contains(&attempts),
        "{attempts} requests during a 10 s outage"
    );
    assert!(during.backoffs > before.backoffs);

    stack.start_gateway().await;
    let restarted = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "a report acknowledged again",
        || {
            let reports = metrics.snapshot().report.ok;
            async move { reports > during.report.ok }
        },
    )
    .await;
    eprintln!(
        "reporting {:?} after the gateway returned",
        restarted.elapsed()
    );
    wait_until(Duration::from_secs(5), "connected again", || async {
        fully_observed(&stack.get("logger-tor2-01").await)
    })
    .await;
    // The desired loop recovered by itself too: a spec edit reaches the agent (a held long poll
    // counts as a request only once answered, so the edit is the proof).
    let observed = stack.get("logger-tor2-01").await["status"]["observedSpecHash"].clone();
    stack.set_args("logger-tor2-01", &["v2"]).await;
    wait_until(Duration::from_secs(10), "the edit observed", || async {
        let dp = stack.get("logger-tor2-01").await;
        fully_observed(&dp) && dp["status"]["observedSpecHash"] != observed
    })
    .await;
    eprintln!(
        "edit observed {:?} after the gateway returned",
        restarted.elapsed()
    );
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("agent stops")
        .expect("no panic");
}

#[tokio::test]
async fn a_stopped_agent_goes_stale_and_a_restarted_one_reconnects_without_spec_changes() {
    let stack = Stack::start().await;
    let device = "tor3-01";
    let name = "logger-tor3-01";
    stack.create_process(name, device, &["v1"]).await;
    let mut agent = stack.agent_binary(device);
    wait_until(Duration::from_secs(5), "observed", || async {
        fully_observed(&stack.get(name).await)
    })
    .await;
    let observed_hash = stack.get(name).await["status"]["observedSpecHash"].clone();

    // Events follow the status patch that they explain: wait for the first connect's.
    let connected_events = wait_for(
        Duration::from_secs(5),
        "an AgentConnected Event",
        || async {
            let n = stack.events(name, "AgentConnected").await;
            (n >= 1).then_some(n)
        },
    )
    .await;
    assert_eq!(connected_events, 1);
    let stopped = Instant::now();
    let status = agent
        .terminate(Duration::from_secs(1))
        .await
        .expect("agent exits on SIGTERM");
    assert!(status.success());
    let stale_window = Duration::from_secs(HEARTBEAT_SECONDS * STALE_MULTIPLIER as u64);
    wait_until(
        stale_window + Duration::from_secs(3),
        "AgentConnected=False",
        || async { condition(&stack.get(name).await, "AgentConnected") == Some("False") },
    )
    .await;
    // The last heartbeat was at most one interval before the stop.
    assert!(stopped.elapsed() >= stale_window - Duration::from_secs(HEARTBEAT_SECONDS));
    wait_until(
        Duration::from_secs(5),
        "one AgentDisconnected Event",
        || async { stack.events(name, "AgentDisconnected").await == 1 },
    )
    .await;

    // Unchanged desired state: only the heartbeat (connect/report) can bring it back.
    let mut agent = stack.agent_binary(device);
    wait_until(
        Duration::from_secs(3),
        "AgentConnected=True again",
        || async { fully_observed(&stack.get(name).await) },
    )
    .await;
    let dp = stack.get(name).await;
    assert_eq!(dp["status"]["observedSpecHash"], observed_hash);
    // The reconnect is one disconnected->connected transition: exactly one more Event.
    wait_until(
        Duration::from_secs(5),
        "one more AgentConnected Event",
        || async { stack.events(name, "AgentConnected").await == connected_events + 1 },
    )
    .await;
    assert_eq!(stack.events(name, "AgentDisconnected").await, 1);
    assert_eq!(
        stack.events(name, "AgentConnected").await,
        connected_events + 1
    );
    assert!(agent.is_running());
}

/// Issue 13, defect 11: 200 DeviceProcesses with long names encode to more than the gateway's
/// 64 KiB report limit while staying under its 256-observation limit. Split by count alone, every
/// heartbeat was refused with 413 and nothing was ever observed; split by encoded bytes, every
/// one is observed and the gateway refuses nothing.
#[tokio::test]
async fn two_hundred_long_named_processes_are_reported_in_requests_under_the_byte_limit() {
    let stack = Stack::start().await;
    let device = "tor4-01";
    let names: Vec<String> = (0..200)
        .map(|i| {
            let mut name = format!("long-{i:03}-");
            name.extend(std::iter::repeat_n('x', 240 - name.len()));
            name
        })
        .collect();
    for batch in names.chunks(20) {
        let creates: Vec<_> = batch
            .iter()
            .map(|name| stack.create_process(name, device, &["v1"]))
            .collect();
        for create in creates {
            create.await;
        }
    }
    let mut agent = stack.agent_binary(device);
    let list_url = stack.url("");
    wait_until(
        Duration::from_secs(60),
        "all 200 DeviceProcesses observed",
        || async {
            let list: Value = send_ok(stack.admin.get(&list_url), "list")
                .await
                .json()
                .await
                .expect("json");
            list["items"]
                .as_array()
                .is_some_and(|items| items.iter().filter(|dp| fully_observed(dp)).count() == 200)
        },
    )
    .await;
    let refused = metrics::scrape(
        &stack.http,
        &stack.admin_metrics_url(),
        "apollo_gateway_http_requests_total",
        &[r#"code="413""#],
    )
    .await;
    assert_eq!(refused, 0.0, "the gateway refused reports as too large");
    assert!(agent.is_running());
    agent.terminate(Duration::from_secs(10)).await;
}

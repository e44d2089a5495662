//! A gateway stack for integration tests: the real Kubernetes control plane (shared by the tests
//! of a binary; each test works in a namespace of its own with Apollo's CRDs and the RBAC of
//! `deploy/rbac/`), a real redis-server, and the real `apollo-gateway` binary running under the
//! gateway's own ServiceAccount, directly or through a fault proxy.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use apollo_crds::conditions::{AGENT_CONNECTED, SPEC_OBSERVED, TRUE};
use apollo_crds::{DeviceProcess, DeviceProcessSpec};
use apollo_protocol::token::device_token;
use apollo_test_support::{
    events_about, free_addr, metrics, wait_for, wait_until, Component, ControlPlane, Fault,
    FaultProxy, Proc, RedisServer, TestNamespace,
};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;
use tokio::task::JoinHandle;

pub const SECRET: &str = "test-secret";
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Gateway flags for a test.
pub struct Options {
    pub heartbeat_seconds: u64,
    pub stale_multiplier: u32,
    pub sweep_seconds: &'static str,
    pub debounce_seconds: &'static str,
    pub resync_seconds: &'static str,
    /// `--kube-writes-per-second`.
    pub writes_per_second: &'static str,
    pub use_redis: bool,
    pub auth_secret: bool,
    /// Run the gateway through a [`FaultProxy`] (implied by `faults`).
    pub proxy: bool,
    /// Faults the proxy serves from before the gateway starts.
    pub faults: Vec<Fault>,
    /// `--namespace` of the gateway (default: the test's own namespace).
    pub watch_namespace: Option<String>,
    /// No `--namespace` at all: the gateway watches every namespace (only on a private control
    /// plane, or it would act on other tests' objects).
    pub all_namespaces: bool,
    /// `--lease-namespace` of the gateway (default: the test's own namespace).
    pub lease_namespace: Option<String>,
    /// `--shard-lease-seconds` (long by default: no renewal lands in a test's write counts).
    pub shard_lease_seconds: &'static str,
    /// `--agent-backoff-max` (0s: reception is judged over one stale window).
    pub agent_backoff_max: &'static str,
    pub extra: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            heartbeat_seconds: 1,
            stale_multiplier: 2,
            sweep_seconds: "0.1",
            debounce_seconds: "0.2",
            resync_seconds: "3600",
            writes_per_second: "1000",
            use_redis: true,
            auth_secret: true,
            proxy: false,
            faults: Vec::new(),
            watch_namespace: None,
            all_namespaces: false,
            lease_namespace: None,
            shard_lease_seconds: "600",
            agent_backoff_max: "0s",
            extra: Vec::new(),
        }
    }
}

pub struct Stack {
    /// The test's namespace: admin client, the gateway's identity, audit-log request counts.
    pub ns: TestNamespace,
    /// Between the gateway and the apiserver, when the options asked for it.
    pub proxy: Option<FaultProxy>,
    pub redis: RedisServer,
    pub gateway: Proc,
    pub device_url: String,
    pub admin_url: String,
    pub client: kube::Client,
    pub http: reqwest::Client,
    _secret_dir: tempfile::TempDir,
    secret_file: PathBuf,
    /// How the gateway was started, to start it again ([`Stack::restart_gateway`]).
    gateway_args: Vec<String>,
    kubeconfig: PathBuf,
}

fn spawn_gateway(args: &[String], kubeconfig: &std::path::Path) -> Proc {
    let port = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_default();
    Proc::builder(gateway_binary())
        .name(format!("gateway-{port}"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("POD_NAMESPACE")
        .env("RUST_LOG", "info,apollo_gateway=debug")
        .spawn()
}

/// The gateway binary under test: this build's, or `APOLLO_GATEWAY_BIN` (e.g. an older build, to
/// show that a test fails before the fix it comes with).
pub fn gateway_binary() -> String {
    std::env::var("APOLLO_GATEWAY_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_apollo-gateway").to_owned())
}

pub fn hash_of(dp: &DeviceProcess) -> String {
    apollo_crds::spec_hash(&dp.spec)
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let stack = Self::spawn_with(options).await;
        stack.wait_ready().await;
        stack
    }

    /// Starts everything without waiting for the gateway to be ready.
    pub async fn spawn_with(options: Options) -> Self {
        Self::spawn_on(ControlPlane::shared().await, options).await
    }

    /// Starts everything against `control_plane` (e.g. a private one a test restarts) and waits
    /// until the gateway is ready.
    pub async fn start_on(control_plane: &ControlPlane, options: Options) -> Self {
        let stack = Self::spawn_on(control_plane, options).await;
        stack.wait_ready().await;
        stack
    }

    /// Starts everything against `control_plane` without waiting for the gateway to be ready.
    pub async fn spawn_on(control_plane: &ControlPlane, options: Options) -> Self {
        let ns = TestNamespace::create(control_plane, "gw").await;
        let redis = RedisServer::start().await;
        let client = ns.client();
        let proxy = if options.proxy || !options.faults.is_empty() {
            let proxy = FaultProxy::start(control_plane).await;
            proxy.set_faults(options.faults);
            Some(proxy)
        } else {
            None
        };
        // The gateway runs as its own ServiceAccount, with exactly the RBAC of deploy/rbac/.
        let kubeconfig = match &proxy {
            Some(proxy) => ns.kubeconfig_via(Component::Gateway, proxy).await,
            None => ns.kubeconfig_for(Component::Gateway).await,
        };
        let secret_dir = tempfile::tempdir().expect("tempdir");
        let secret_file = secret_dir.path().join("secret");
        std::fs::write(&secret_file, format!("{SECRET}\n")).expect("write secret");
        let device = free_addr();
        let admin = free_addr();
        let mut args: Vec<String> = vec![
            "--listen".into(),
            device.to_string(),
            "--admin-listen".into(),
            admin.to_string(),
            "--heartbeat-interval-seconds".into(),
            options.heartbeat_seconds.to_string(),
            "--stale-multiplier".into(),
            options.stale_multiplier.to_string(),
            "--sweep-interval-seconds".into(),
            options.sweep_seconds.into(),
            "--status-debounce-seconds".into(),
            options.debounce_seconds.into(),
            "--resync-interval-seconds".into(),
            options.resync_seconds.into(),
            "--kube-writes-per-second".into(),
            options.writes_per_second.into(),
            // These tests exercise the sweep itself; the start-up grace has its own e2e test.
            "--sweep-grace-seconds".into(),
            "0".into(),
            "--lease-namespace".into(),
            options
                .lease_namespace
                .unwrap_or_else(|| ns.name().to_owned()),
            // One replica holds its shard for the whole test: no Lease renewal (a write every
            // third of the duration) lands in a test's count of Kubernetes writes.
            "--shard-lease-seconds".into(),
            options.shard_lease_seconds.into(),
            // Stand-in agents here retry at once: reception needs only a stale window.
            "--agent-backoff-max".into(),
            options.agent_backoff_max.into(),
        ];
        // Tests run concurrently on one control plane: each gateway sees its own namespace.
        if !options.all_namespaces {
            args.push("--namespace".into());
            args.push(
                options
                    .watch_namespace
                    .unwrap_or_else(|| ns.name().to_owned()),
            );
        }
        if options.auth_secret {
            args.push("--auth-secret-file".into());
            args.push(secret_file.display().to_string());
        }
        if options.use_redis {
            args.push("--redis-url".into());
            args.push(redis.url());
        }
        args.extend(options.extra);
        let gateway = spawn_gateway(&args, &kubeconfig);
        Self {
            ns,
            proxy,
            redis,
            gateway,
            device_url: format!("http://{device}"),
            admin_url: format!("http://{admin}"),
            client,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(90))
                .build()
                .expect("http client"),
            _secret_dir: secret_dir,
            secret_file,
            gateway_args: args,
            kubeconfig,
        }
    }

    /// Starts the gateway again with the same flags (and `extra`), after the old process is
    /// gone (killed or terminated by the test); waits until it is ready.
    pub async fn restart_gateway(&mut self, extra: &[&str]) {
        self.restart_gateway_with(&[], extra).await;
    }

    /// Like [`Stack::restart_gateway`], with the values of some flags replaced.
    pub async fn restart_gateway_with(&mut self, replace: &[(&str, &str)], extra: &[&str]) {
        self.gateway.kill();
        let mut args = self.gateway_args.clone();
        for (flag, value) in replace {
            let at = args
                .iter()
                .position(|a| a == flag)
                .unwrap_or_else(|| panic!("{flag} is not among the gateway's flags"));
            args[at + 1] = (*value).to_owned();
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        self.gateway = spawn_gateway(&args, &self.kubeconfig);
        self.gateway_args = args;
        self.wait_ready().await;
    }

    /// Starts another replica, `--ordinal ordinal`, with the same flags, Redis and namespace,
    /// talking to the apiserver directly (not through the proxy); waits until it is ready.
    pub async fn start_peer(&self, ordinal: u32) -> Peer {
        let device = free_addr();
        let admin = free_addr();
        let mut args = self.gateway_args.clone();
        for (flag, value) in [("--listen", device), ("--admin-listen", admin)] {
            let at = args.iter().position(|a| a == flag).expect("flag");
            args[at + 1] = value.to_string();
        }
        if let Some(at) = args.iter().position(|a| a == "--ordinal") {
            args.drain(at..at + 2);
        }
        args.extend(["--ordinal".to_owned(), ordinal.to_string()]);
        let kubeconfig = self.ns.kubeconfig_for(Component::Gateway).await;
        let peer = Peer {
            gateway: spawn_gateway(&args, &kubeconfig),
            admin_url: format!("http://{admin}"),
            http: self.http.clone(),
        };
        wait_until(DEADLINE, "peer /readyz answers 200", || async {
            let url = format!("{}/readyz", peer.admin_url);
            matches!(peer.http.get(url).send().await, Ok(r) if r.status() == 200)
        })
        .await;
        peer
    }

    /// Status code of `/readyz`, 0 when the admin endpoint does not answer.
    pub async fn readyz(&self) -> u16 {
        self.http
            .get(format!("{}/readyz", self.admin_url))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    pub async fn wait_ready(&self) {
        wait_until(DEADLINE, "gateway /readyz answers 200", || async {
            self.readyz().await == 200
        })
        .await;
    }

    pub fn token(&self, device: &str) -> String {
        device_token(SECRET.as_bytes(), device)
    }

    /// The test's namespace.
    pub fn namespace(&self) -> &str {
        self.ns.name()
    }

    /// The fault proxy (the options asked for one).
    pub fn proxy(&self) -> &FaultProxy {
        self.proxy
            .as_ref()
            .expect("the stack runs the gateway through a fault proxy")
    }

    pub fn processes(&self) -> Api<DeviceProcess> {
        self.ns.api()
    }

    pub async fn create(&self, name: &str, device: &str, url: &str) -> DeviceProcess {
        let spec: DeviceProcessSpec = serde_json::from_value(json!({
            "deviceRef": {"name": device},
            "artifact": {"type": "oci", "url": url},
            "execution": {"backend": "container", "args": ["run"]}
        }))
        .expect("spec");
        self.processes()
            .create(&PostParams::default(), &DeviceProcess::new(name, spec))
            .await
            .expect("create DeviceProcess")
    }

    /// Changes the spec (bumps generation); returns the new object.
    pub async fn change_spec(&self, name: &str, url: &str) -> DeviceProcess {
        self.processes()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"artifact": {"url": url}}})),
            )
            .await
            .expect("patch spec")
    }

    pub async fn get(&self, name: &str) -> DeviceProcess {
        self.processes().get(name).await.expect("get DeviceProcess")
    }

    pub fn desired_url(&self, device: &str) -> String {
        format!("{}/v1/devices/{device}/desired", self.device_url)
    }

    /// `GET desired` of `device` with its token, conditional on `etag`, held up to `wait` seconds.
    pub async fn desired(
        &self,
        device: &str,
        etag: Option<&str>,
        wait: Option<u64>,
    ) -> reqwest::Response {
        self.desired_request(device, etag, wait)
            .send()
            .await
            .expect("GET desired")
    }

    /// Starts a long poll of `device` (`GET desired` matching `etag`, held up to `wait_seconds`)
    /// in a task; the task returns when the answer came and the answer.
    pub fn spawn_long_poll(
        &self,
        device: &str,
        etag: &str,
        wait_seconds: u64,
    ) -> JoinHandle<(Instant, reqwest::Response)> {
        let request = self.desired_request(device, Some(etag), Some(wait_seconds));
        tokio::spawn(async move {
            let response = request.send().await.expect("long poll");
            (Instant::now(), response)
        })
    }

    fn desired_request(
        &self,
        device: &str,
        etag: Option<&str>,
        wait: Option<u64>,
    ) -> reqwest::RequestBuilder {
        let mut url = self.desired_url(device);
        if let Some(wait) = wait {
            url.push_str(&format!("?waitSeconds={wait}"));
        }
        let mut request = self
            .http
            .get(url)
            .header("x-device-token", self.token(device));
        if let Some(etag) = etag {
            request = request.header("if-none-match", etag);
        }
        request
    }

    pub async fn etag_of(&self, device: &str) -> String {
        let response = self.desired(device, None, None).await;
        assert_eq!(response.status(), 200);
        header(&response, "etag")
    }

    pub async fn report(&self, device: &str, observations: &[(&str, &str)]) -> reqwest::Response {
        let body = json!({
            "agentVersion": "test/1.0",
            "timestamp": jiff::Timestamp::now().to_string(),
            "heartbeat": true,
            "observations": observations.iter().map(|(name, hash)| json!({
                "namespace": self.namespace(), "name": name, "observedSpecHash": hash
            })).collect::<Vec<_>>(),
        });
        self.post(
            device,
            "report",
            &body.to_string(),
            Some(&self.token(device)),
        )
        .await
    }

    pub async fn post(
        &self,
        device: &str,
        what: &str,
        body: &str,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/v1/devices/{device}/{what}", self.device_url))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(token) = token {
            request = request.header("x-device-token", token);
        }
        request.send().await.expect("POST")
    }

    /// Whether the state store holds a report of `device` (a last-seen time or observations).
    pub fn recorded(&self, device: &str) -> bool {
        let tag = apollo_protocol::shard::slot_tag(apollo_protocol::shard::slot(device));
        let seen = self
            .redis
            .command(&["HEXISTS", &format!("apollo:{tag}:device:{device}"), "seen"])
            .expect("HEXISTS");
        let observed = self
            .redis
            .command(&["EXISTS", &format!("apollo:{tag}:observed:{device}")])
            .expect("EXISTS");
        seen != ":0\r\n" || observed != ":0\r\n"
    }

    /// Events about DeviceProcess `name` with `reason`.
    pub async fn events(&self, name: &str, reason: &str) -> Vec<Event> {
        events_about(&self.ns.api(), name, None, reason).await
    }

    /// Events with `reason` about the shard Lease this (single) gateway holds.
    pub async fn lease_events(&self, reason: &str) -> Vec<Event> {
        events_about(
            &Api::namespaced(self.client.clone(), self.namespace()),
            "apollo-gateway-shard-0",
            Some("Lease"),
            reason,
        )
        .await
    }

    /// Status patches of DeviceProcesses the apiserver served to the gateway since the last
    /// reset (audit log; a request the fault proxy answered never reached it).
    pub async fn status_patches(&self) -> u64 {
        self.ns
            .count("patch", "deviceprocesses", Some("status"))
            .await
    }

    /// Sum of the samples of `metric` carrying every label pair of `label_filters` (e.g.
    /// `code="304"`), 0 when there is none.
    pub async fn metric(&self, metric: &str, label_filters: &[&str]) -> f64 {
        let url = format!("{}/metrics", self.admin_url);
        metrics::scrape(&self.http, &url, metric, label_filters).await
    }

    /// Waits up to `deadline` until the counter `metric` has grown by `n` from its value now.
    pub async fn wait_metric_growth(&self, metric: &str, n: f64, deadline: Duration, what: &str) {
        let start = self.metric(metric, &[]).await;
        wait_until(deadline, what, || async {
            self.metric(metric, &[]).await >= start + n
        })
        .await;
    }

    /// Waits until the sweep has run `n` more times (proof that time passed with sweeps active).
    pub async fn wait_sweeps(&self, n: f64) {
        let sweeps = "apollo_gateway_stale_sweeps_total";
        self.wait_metric_growth(sweeps, n, DEADLINE, "more stale sweeps")
            .await;
    }

    /// Waits until `device`'s document lists `n` items; returns its ETag.
    pub async fn wait_for_items(&self, device: &str, n: usize) -> String {
        wait_for(DEADLINE, "desired document has the items", || async {
            let response = self.desired(device, None, None).await;
            let etag = header(&response, "etag");
            let body: serde_json::Value = response.json().await.ok()?;
            (body["items"].as_array()?.len() == n).then_some(etag)
        })
        .await
    }

    /// Reports `device`'s observation of the current spec of each of `names` and waits until
    /// every status shows it connected and observed.
    pub async fn connect_and_converge(&self, device: &str, names: &[&str]) {
        let mut observations = Vec::new();
        for name in names {
            observations.push((*name, hash_of(&self.get(name).await)));
        }
        let refs: Vec<(&str, &str)> = observations.iter().map(|(n, h)| (*n, h.as_str())).collect();
        assert_eq!(self.report(device, &refs).await.status(), 200);
        for name in names {
            self.wait_status(name, "connected and observed", |dp| {
                is_condition(dp, AGENT_CONNECTED, TRUE) && is_condition(dp, SPEC_OBSERVED, TRUE)
            })
            .await;
        }
    }

    /// Waits until `name`'s status satisfies `check`.
    pub async fn wait_status(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&DeviceProcess) -> bool,
    ) -> DeviceProcess {
        wait_for(DEADLINE, what, || async {
            let dp = self.get(name).await;
            check(&dp).then_some(dp)
        })
        .await
    }
}

/// Another gateway replica of a [`Stack`] ([`Stack::start_peer`]).
pub struct Peer {
    pub gateway: Proc,
    pub admin_url: String,
    http: reqwest::Client,
}

impl Peer {
    /// Like [`Stack::metric`], on this replica.
    pub async fn metric(&self, metric: &str, label_filters: &[&str]) -> f64 {
        let url = format!("{}/metrics", self.admin_url);
        metrics::scrape(&self.http, &url, metric, label_filters).await
    }
}

pub fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

pub fn condition(dp: &DeviceProcess, type_: &str) -> Option<(String, String)> {
    dp.status
        .as_ref()
        .and_then(|s| apollo_crds::conditions::find(&s.conditions, type_))
        .map(|c| (c.status.clone(), c.reason.clone()))
}

pub fn is_condition(dp: &DeviceProcess, type_: &str, status: &str) -> bool {
    condition(dp, type_).is_some_and(|(s, _)| s == status)
}

//! Starting and stopping the whole stack.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use apollo_test_support::{free_port, Component, ControlPlane, Proc, RedisServer, TestNamespace};
use tokio_util::sync::CancellationToken;

use crate::jaeger::{Jaeger, JaegerPorts};
use crate::node::{self, GatewayLauncher, Gateways};
use crate::samples;

/// Loopback ports of the stack's fixed components.
#[derive(Clone, Debug)]
pub struct Ports {
    /// Router: what agents talk to.
    pub router: u16,
    /// Router /healthz, /readyz, /metrics.
    pub router_admin: u16,
    /// Controller /healthz, /readyz, /metrics.
    pub controller_admin: u16,
    /// apollo-dev's own control endpoint (stop/start agents).
    pub control: u16,
    /// `(device API, admin)` port of gateway 0 (gateway i adds i); None: ephemeral.
    pub gateway_base: Option<(u16, u16)>,
    /// Jaeger's ports, when the stack runs one.
    pub jaeger: JaegerPorts,
}

impl Ports {
    /// Fresh ephemeral ports (tests).
    pub fn ephemeral() -> Self {
        Self {
            router: free_port(),
            router_admin: free_port(),
            controller_admin: free_port(),
            control: free_port(),
            gateway_base: None,
            jaeger: JaegerPorts::ephemeral(),
        }
    }

    /// The fixed ports the README documents (local development).
    pub fn dev() -> Self {
        Self {
            router: 8080,
            router_admin: 9080,
            controller_admin: 9070,
            control: 9079,
            gateway_base: Some((8081, 9081)),
            jaeger: JaegerPorts::standard(),
        }
    }
}

/// Which Kubernetes the stack runs on: always the real control plane.
#[derive(Clone, Debug)]
pub enum Kubernetes {
    /// The control plane shared by the tests of this test binary; the stack (its components,
    /// their identities, the gateway StatefulSet and the objects) lives in a namespace of its own
    /// and every component is limited to it (`--namespace`).
    Shared,
    /// A control plane of its own, files in `dir` (apollo-dev): Apollo's components, identities,
    /// Leases and the gateway StatefulSet in `apollo-system` (as `kubectl apply -k deploy/` puts
    /// them), watching every namespace; the sample objects in `default`.
    Own {
        /// Certificates, kubeconfigs, logs, audit log, etcd data.
        dir: PathBuf,
    },
}

/// Apollo's namespace when the stack has a control plane of its own.
pub const SYSTEM_NAMESPACE: &str = "apollo-system";

/// What to start.
#[derive(Clone, Debug)]
pub struct StackConfig {
    /// Logs and the HMAC key go here.
    pub work_dir: PathBuf,
    /// Directory holding the built binaries.
    pub bin_dir: PathBuf,
    /// The control plane.
    pub kubernetes: Kubernetes,
    /// Initial gateway replicas.
    pub gateways: u32,
    /// Devices that get a NetworkSwitch and an agent.
    pub devices: Vec<String>,
    /// Whether to start an agent per device.
    pub run_agents: bool,
    /// Whether to install the sample switches and deployment.
    pub install_samples: bool,
    /// Gateway heartbeat interval (seconds).
    pub heartbeat_interval_seconds: u64,
    /// Gateway stale multiplier.
    pub stale_multiplier: u32,
    /// Gateway sweep interval (seconds).
    pub sweep_interval_seconds: u64,
    /// Ports.
    pub ports: Ports,
    /// Extra flags for every gateway (e.g. shorter shard leases in tests).
    pub gateway_extra_args: Vec<String>,
    /// Long-poll wait of the agent processes (seconds).
    pub agent_poll_wait_seconds: u64,
    /// Environment for the servers (controller, gateways, router) on top of this process's
    /// `OTEL_*` variables.
    pub server_env: Vec<(String, String)>,
    /// Extra environment of the gateway with a given ordinal, whenever it is (re)started.
    pub gateway_ordinal_env: BTreeMap<u32, Vec<(String, String)>>,
    /// Run a Jaeger and export every component's spans (agents included) to it.
    pub jaeger: bool,
}

impl StackConfig {
    /// The seed demo: 3 gateways, agents for tor1-01 and tor1-02, Jaeger, own control plane.
    pub fn demo(work_dir: PathBuf, bin_dir: PathBuf) -> Self {
        Self {
            kubernetes: Kubernetes::Own {
                dir: work_dir.join("control-plane"),
            },
            work_dir,
            bin_dir,
            gateways: 3,
            devices: vec!["tor1-01".into(), "tor1-02".into()],
            run_agents: true,
            install_samples: true,
            heartbeat_interval_seconds: 5,
            stale_multiplier: 3,
            sweep_interval_seconds: 1,
            ports: Ports::dev(),
            gateway_extra_args: Vec::new(),
            // Short enough that the demo's "200 once, then 304s" shows within seconds.
            agent_poll_wait_seconds: 5,
            server_env: Vec::new(),
            gateway_ordinal_env: BTreeMap::new(),
            jaeger: true,
        }
    }

    /// A stack for one test: the shared control plane, ephemeral ports, no samples, no agents, no
    /// Jaeger (tests turn on what they need).
    pub fn test(work_dir: PathBuf, bin_dir: PathBuf) -> Self {
        Self {
            kubernetes: Kubernetes::Shared,
            devices: Vec::new(),
            run_agents: false,
            install_samples: false,
            ports: Ports::ephemeral(),
            jaeger: false,
            ..Self::demo(work_dir, bin_dir)
        }
    }
}

enum ControlPlaneHandle {
    Shared(&'static ControlPlane),
    Owned(ControlPlane),
}

impl std::ops::Deref for ControlPlaneHandle {
    type Target = ControlPlane;

    fn deref(&self) -> &ControlPlane {
        match self {
            ControlPlaneHandle::Shared(cp) => cp,
            ControlPlaneHandle::Owned(cp) => cp,
        }
    }
}

/// The running stack. Dropping it kills every process; [`Stack::shutdown`] stops them gracefully.
pub struct Stack {
    cfg: StackConfig,
    redis: RedisServer,
    key: Vec<u8>,
    controller: Option<Proc>,
    router: Option<Proc>,
    agents: Mutex<BTreeMap<String, Proc>>,
    gateways: Arc<Gateways>,
    node: Option<tokio::task::JoinHandle<()>>,
    shutdown: CancellationToken,
    client: kube::Client,
    jaeger: Option<Jaeger>,
    /// Where Apollo's components and their identities live.
    system: TestNamespace,
    /// Where the sample objects and test fleets live.
    namespace: String,
    /// Last: the control plane outlives every process that talks to it.
    control_plane: ControlPlaneHandle,
}

/// `OTEL_*` variables of this process, passed on to the stack's servers.
pub fn otel_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("OTEL_"))
        .collect()
}

fn bin(cfg: &StackConfig, name: &str) -> anyhow::Result<PathBuf> {
    let p = cfg.bin_dir.join(name);
    if !p.is_file() {
        bail!(
            "{} not found; build the workspace first (cargo build --workspace --bins)",
            p.display()
        );
    }
    Ok(p)
}

async fn wait_http_ok(
    url: &str,
    deadline: Duration,
    what: &str,
    proc: &mut Proc,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let start = Instant::now();
    loop {
        if http
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        if let Some(status) = proc.try_wait() {
            bail!(
                "{what} exited ({status}); its log: {}",
                proc.log_path().display()
            );
        }
        if start.elapsed() > deadline {
            bail!(
                "{what} not ready within {deadline:?} ({url}); its log: {}",
                proc.log_path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Stack {
    /// Starts everything and waits until the gateways and the router are ready.
    pub async fn start(cfg: StackConfig) -> anyhow::Result<Self> {
        let logs = cfg.work_dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;

        // Kubernetes: the real control plane, and Apollo's namespace with the RBAC of deploy/rbac.
        let (control_plane, system, namespace, scoped) = match &cfg.kubernetes {
            Kubernetes::Shared => {
                let cp = ControlPlane::shared().await;
                let ns = TestNamespace::create(cp, "e2e").await;
                let name = ns.name().to_owned();
                (ControlPlaneHandle::Shared(cp), ns, name, true)
            }
            Kubernetes::Own { dir } => {
                // A fresh cluster every time (certificates and kubeconfigs are kept).
                let _ = std::fs::remove_dir_all(dir.join("etcd"));
                let cp = ControlPlane::start_in_dir(dir).await;
                let ns =
                    TestNamespace::system(&cp, SYSTEM_NAMESPACE, &cfg.work_dir.join("identities"))
                        .await;
                (
                    ControlPlaneHandle::Owned(cp),
                    ns,
                    "default".to_owned(),
                    false,
                )
            }
        };
        let client = system.client();
        node::register_node(&client).await?;
        let system_ns = system.name().to_owned();
        // In a shared control plane every component keeps to the stack's namespace.
        let scope: Vec<String> = if scoped {
            vec![format!("--namespace={system_ns}")]
        } else {
            Vec::new()
        };

        let jaeger = if cfg.jaeger {
            Some(Jaeger::start(&cfg.work_dir.join("jaeger"), cfg.ports.jaeger).await?)
        } else {
            None
        };
        let mut server_env = cfg.server_env.clone();
        if let Some(j) = &jaeger {
            server_env.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), j.otlp_endpoint()));
        }

        let redis = RedisServer::start().await;

        // The device HMAC key, as the gateway's Secret would hold it.
        let key: Vec<u8> = {
            use rand::RngCore;
            let mut raw = [0u8; 32];
            rand::rng().fill_bytes(&mut raw);
            hex::encode(raw).into_bytes()
        };
        let secret_file = cfg.work_dir.join("device-hmac.key");
        std::fs::write(&secret_file, &key).context("write the HMAC key")?;

        let mut controller = Proc::builder(bin(&cfg, "apollo-controller")?)
            .name("controller")
            .log_file(logs.join("controller.log"))
            .env_remove("KUBECONFIG")
            .arg("--kubeconfig")
            .arg(system.kubeconfig_for(Component::Controller).await)
            .args([
                "--admin-listen",
                &format!("127.0.0.1:{}", cfg.ports.controller_admin),
            ])
            .args(["--lease-namespace", &system_ns])
            .args(&scope)
            .envs(otel_env())
            .envs(server_env.clone())
            .spawn();
        wait_http_ok(
            &format!("http://127.0.0.1:{}/healthz", cfg.ports.controller_admin),
            Duration::from_secs(20),
            "controller",
            &mut controller,
        )
        .await?;

        let shutdown = CancellationToken::new();
        let gateways = Arc::new(Gateways::new(GatewayLauncher {
            bin: bin(&cfg, "apollo-gateway")?,
            redis_url: redis.url(),
            kubeconfig: system.kubeconfig_for(Component::Gateway).await,
            secret_file,
            extra_args: vec![
                format!(
                    "--heartbeat-interval-seconds={}",
                    cfg.heartbeat_interval_seconds
                ),
                format!("--stale-multiplier={}", cfg.stale_multiplier),
                format!("--sweep-interval-seconds={}", cfg.sweep_interval_seconds),
                format!("--lease-namespace={system_ns}"),
                // The demo's "200 once, then 304s" is read from this log.
                "--access-log".to_owned(),
            ]
            .into_iter()
            .chain(scope.iter().cloned())
            .chain(cfg.gateway_extra_args.iter().cloned())
            .collect(),
            log_dir: logs.clone(),
            base_ports: cfg.ports.gateway_base,
            env: server_env.clone(),
            ordinal_env: cfg.gateway_ordinal_env.clone(),
        }));
        samples::install_gateway_statefulset(&client, &system_ns, cfg.gateways).await?;
        let node = tokio::spawn(node::run(
            client.clone(),
            system_ns.clone(),
            gateways.clone(),
            shutdown.clone(),
        ));

        let mut router = Proc::builder(bin(&cfg, "apollo-router")?)
            .name("router")
            .log_file(logs.join("router.log"))
            .args(["--listen", &format!("127.0.0.1:{}", cfg.ports.router)])
            .args([
                "--admin-listen",
                &format!("127.0.0.1:{}", cfg.ports.router_admin),
            ])
            .args(["--redis-url", &redis.url()])
            .envs(otel_env())
            .envs(server_env.clone())
            .spawn();

        let mut stack = Self {
            cfg,
            redis,
            key,
            controller: Some(controller),
            router: None,
            agents: Mutex::new(BTreeMap::new()),
            gateways,
            node: Some(node),
            shutdown,
            client,
            jaeger,
            system,
            namespace,
            control_plane,
        };
        stack.cfg.server_env = server_env;
        stack
            .wait_gateways_ready(stack.cfg.gateways, Duration::from_secs(60))
            .await?;
        wait_http_ok(
            &format!("http://127.0.0.1:{}/readyz", stack.cfg.ports.router_admin),
            Duration::from_secs(20),
            "router",
            &mut router,
        )
        .await?;
        stack.router = Some(router);
        stack
            .wait_gateways_ready(stack.cfg.gateways, Duration::from_secs(30))
            .await?;

        if stack.cfg.install_samples {
            samples::install_samples(&stack.client, &stack.namespace, &stack.cfg.devices).await?;
        }
        if stack.cfg.run_agents {
            for device in stack.cfg.devices.clone() {
                stack.start_agent(&device)?;
            }
        }
        Ok(stack)
    }

    /// Waits until `n` gateway processes run and answer /readyz.
    pub async fn wait_gateways_ready(&self, n: u32, deadline: Duration) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()?;
        let start = Instant::now();
        loop {
            let ordinals = self.gateways.ordinals();
            let mut ready = 0;
            for o in &ordinals {
                if let Some(admin) = self.gateways.admin_addr(*o) {
                    if http
                        .get(format!("http://{admin}/readyz"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                    {
                        ready += 1;
                    }
                }
            }
            // And the router (once it runs) routes to exactly those replicas.
            let routed =
                match &self.router {
                    Some(_) => {
                        use apollo_test_support::metrics;
                        let url = format!("{}/metrics", self.router_admin_url());
                        metrics::fetch(&http, &url).await.ok().and_then(|text| {
                            metrics::value(&text, "apollo_router_alive_replicas", &[])
                        }) == Some(f64::from(n))
                    }
                    None => true,
                };
            if ordinals.len() == n as usize && ready == n && routed {
                return Ok(());
            }
            if start.elapsed() > deadline {
                bail!(
                    "{ready} of {n} gateways ready after {deadline:?} (running: {ordinals:?}); logs in {}",
                    self.cfg.work_dir.join("logs").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The device token of `device`.
    pub fn token(&self, device: &str) -> String {
        apollo_protocol::token::device_token(&self.key, device)
    }

    /// Starts (or restarts) the agent of `device` against the router. Its token is also written to
    /// `<work dir>/tokens/<device>` for curl.
    pub fn start_agent(&self, device: &str) -> anyhow::Result<()> {
        let tokens = self.cfg.work_dir.join("tokens");
        std::fs::create_dir_all(&tokens)?;
        std::fs::write(tokens.join(device), self.token(device))?;
        let proc = Proc::builder(bin(&self.cfg, "apollo-agent")?)
            .name(format!("agent-{device}"))
            .log_file(
                self.cfg
                    .work_dir
                    .join("logs")
                    .join(format!("agent-{device}.log")),
            )
            .env("APOLLO_DEVICE_NAME", device)
            .env("APOLLO_GATEWAY_URL", self.router_url())
            .env("APOLLO_DEVICE_TOKEN", self.token(device))
            .env(
                "APOLLO_POLL_WAIT_SECONDS",
                self.cfg.agent_poll_wait_seconds.to_string(),
            )
            .envs(self.cfg.server_env.clone())
            .spawn();
        let previous = self
            .agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(device.to_owned(), proc);
        drop(previous);
        Ok(())
    }

    /// Stops the agent of `device` (SIGTERM). Returns whether one was running.
    pub async fn stop_agent(&self, device: &str) -> bool {
        let taken = self
            .agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(device);
        match taken {
            Some(mut p) => {
                p.terminate(Duration::from_secs(5)).await;
                true
            }
            None => false,
        }
    }

    /// Devices whose agent is running.
    pub fn running_agents(&self) -> Vec<String> {
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Output of the agent of `device`.
    pub fn agent_logs(&self, device: &str) -> Option<String> {
        self.agents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
            .map(Proc::logs)
    }

    /// `http://127.0.0.1:<router port>`.
    pub fn router_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.cfg.ports.router)
    }

    /// Router admin base URL.
    pub fn router_admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.cfg.ports.router_admin)
    }

    /// Controller admin base URL.
    pub fn controller_admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.cfg.ports.controller_admin)
    }

    /// The control plane the stack runs on.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// `https://127.0.0.1:<port>` of kube-apiserver.
    pub fn apiserver_url(&self) -> &str {
        self.control_plane.apiserver_url()
    }

    /// The admin kubeconfig (what a person uses with kubectl).
    pub fn kubeconfig(&self) -> PathBuf {
        self.control_plane.admin_kubeconfig()
    }

    /// Apollo's namespace: component identities, request counts by them, the gateway
    /// StatefulSet and its pods, the shard and leader Leases.
    pub fn system(&self) -> &TestNamespace {
        &self.system
    }

    /// Where the sample objects and test fleets live.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Runs the real kubectl as the admin (no namespace added).
    pub async fn kubectl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        apollo_test_support::kubectl(
            &self.kubeconfig(),
            &self.cfg.work_dir.join("kubectl-cache"),
            args,
        )
        .await
    }

    /// The Jaeger every component exports to, when the stack runs one.
    pub fn jaeger(&self) -> Option<&Jaeger> {
        self.jaeger.as_ref()
    }

    /// Redis URL.
    pub fn redis_url(&self) -> String {
        self.redis.url()
    }

    /// The Redis server (restart it in tests).
    pub fn redis(&mut self) -> &mut RedisServer {
        &mut self.redis
    }

    /// An admin kube client.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The gateway processes.
    pub fn gateways(&self) -> &Arc<Gateways> {
        &self.gateways
    }

    /// The configuration the stack was started with.
    pub fn config(&self) -> &StackConfig {
        &self.cfg
    }

    /// Where logs go.
    pub fn log_dir(&self) -> PathBuf {
        self.cfg.work_dir.join("logs")
    }

    /// Where the control plane keeps its logs.
    pub fn control_plane_dir(&self) -> &Path {
        self.control_plane.dir()
    }

    /// Stops the router (SIGKILL) and starts it again on the same port.
    pub async fn restart_router(&mut self) -> anyhow::Result<()> {
        if let Some(mut r) = self.router.take() {
            r.kill();
        }
        let mut router = Proc::builder(bin(&self.cfg, "apollo-router")?)
            .name("router")
            .log_file(self.log_dir().join("router.log"))
            .args(["--listen", &format!("127.0.0.1:{}", self.cfg.ports.router)])
            .args([
                "--admin-listen",
                &format!("127.0.0.1:{}", self.cfg.ports.router_admin),
            ])
            .args(["--redis-url", &self.redis.url()])
            .envs(otel_env())
            .envs(self.cfg.server_env.clone())
            .spawn();
        wait_http_ok(
            &format!("{}/readyz", self.router_admin_url()),
            Duration::from_secs(20),
            "router",
            &mut router,
        )
        .await?;
        self.router = Some(router);
        Ok(())
    }

    /// Graceful stop: agents, router, gateways (deregistering), controller, then the rest.
    pub async fn shutdown(mut self) {
        let agents: Vec<Proc> =
            std::mem::take(&mut *self.agents.lock().unwrap_or_else(|e| e.into_inner()))
                .into_values()
                .collect();
        for mut a in agents {
            a.terminate(Duration::from_secs(5)).await;
        }
        if let Some(mut r) = self.router.take() {
            r.terminate(Duration::from_secs(10)).await;
        }
        self.shutdown.cancel();
        if let Some(n) = self.node.take() {
            let _ = n.await;
        }
        self.gateways.stop_all().await;
        if let Some(mut c) = self.controller.take() {
            c.terminate(Duration::from_secs(10)).await;
        }
        self.redis.stop();
        // The control plane (if it is the stack's own) stops when the stack is dropped.
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(n) = self.node.take() {
            n.abort();
        }
        self.gateways.kill_all();
    }
}

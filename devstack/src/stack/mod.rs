//! Starting and stopping the whole stack: the control plane and Apollo's namespace, Redis, the
//! HMAC key, the controller, the gateway StatefulSet, the router and agents ([`config`] says what
//! to start, [`processes`] supervises the processes).

mod config;
mod processes;
mod redis;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use apollo_test_support::{Component, ControlPlane, Proc, RedisServer, TestNamespace};

use self::redis::StackRedis;
use tokio_util::sync::CancellationToken;

use crate::jaeger::Jaeger;
use crate::node::{self, GatewayLauncher, Gateways};
use crate::prometheus::{self, Prometheus};
use crate::samples;

pub use self::redis::RedisChoice;
pub use config::{Kubernetes, Ports, StackConfig, SYSTEM_NAMESPACE};
pub use processes::otel_env;
use processes::{bin, wait_http_ok};

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
    redis: StackRedis,
    key: Vec<u8>,
    controller: Option<Proc>,
    router: Option<Proc>,
    agents: Mutex<BTreeMap<String, Proc>>,
    gateways: Arc<Gateways>,
    node: Option<tokio::task::JoinHandle<()>>,
    shutdown: CancellationToken,
    client: kube::Client,
    jaeger: Option<Jaeger>,
    prometheus: Option<Prometheus>,
    /// Where Apollo's components and their identities live.
    system: TestNamespace,
    /// Where the sample objects and test fleets live.
    namespace: String,
    /// Last: the control plane outlives every process that talks to it.
    control_plane: ControlPlaneHandle,
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

        let redis = StackRedis::start(&cfg.redis).await;

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
                format!("--heartbeat-interval={}s", cfg.heartbeat_interval_seconds),
                format!("--stale-multiplier={}", cfg.stale_multiplier),
                format!("--sweep-interval={}s", cfg.sweep_interval_seconds),
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
            prometheus: None,
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

        if let Some(interval) = stack.cfg.prometheus {
            let scrape = prometheus::Scrape {
                interval,
                namespace: stack.system.name().to_owned(),
                controller: format!("127.0.0.1:{}", stack.cfg.ports.controller_admin),
                router: format!("127.0.0.1:{}", stack.cfg.ports.router_admin),
                gateways: stack.gateways.clone(),
            };
            let dir = stack.cfg.work_dir.join("prometheus");
            stack.prometheus =
                Some(Prometheus::start(&dir, stack.cfg.ports.prometheus, scrape).await?);
        }
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

    /// The Prometheus scraping every component, when the stack runs one.
    pub fn prometheus(&self) -> Option<&Prometheus> {
        self.prometheus.as_ref()
    }

    /// Redis URL (the gateways' and the router's `--redis-url`).
    pub fn redis_url(&self) -> String {
        self.redis.url()
    }

    /// The Redis server (restart it in tests). Panics unless the stack runs a redis-server of
    /// its own ([`RedisChoice::Server`], the default).
    pub fn redis(&mut self) -> &mut RedisServer {
        self.redis
            .server()
            .expect("the stack runs a redis-server of its own (RedisChoice::Server)")
    }

    /// The Redis Cluster, when the stack runs one of its own ([`RedisChoice::Cluster`]): fail
    /// its masters over in tests.
    pub fn redis_cluster(&mut self) -> Option<&mut apollo_test_support::RedisCluster> {
        self.redis.cluster()
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

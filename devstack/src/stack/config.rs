//! What the stack starts: its ports, its control plane and the components' settings.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use apollo_test_support::free_port;

use crate::jaeger::JaegerPorts;

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
    /// Prometheus' HTTP port (UI and API), when the stack runs one.
    pub prometheus: u16,
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
            prometheus: free_port(),
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
            prometheus: 9090,
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
    /// Run a Prometheus scraping every component at this interval, with deploy/monitoring's alert
    /// rules ([`crate::prometheus`]). apollo-dev turns it on; off in [`StackConfig::demo`] so
    /// that loadtest measures Apollo alone.
    pub prometheus: Option<Duration>,
    /// The Redis of the gateways and the router: a redis-server of the stack's own (default), a
    /// Redis Cluster of its own, or one already running.
    pub redis: super::RedisChoice,
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
            prometheus: None,
            redis: super::RedisChoice::Server,
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

//! Supervision of the stack's processes: binaries, readiness waits, agents and the router.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use apollo_test_support::Proc;

use super::{Stack, StackConfig};

/// `OTEL_*` variables of this process, passed on to the stack's servers.
pub fn otel_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("OTEL_"))
        .collect()
}

pub(super) fn bin(cfg: &StackConfig, name: &str) -> anyhow::Result<PathBuf> {
    let p = cfg.bin_dir.join(name);
    if !p.is_file() {
        bail!(
            "{} not found; build the workspace first (cargo build --workspace --bins)",
            p.display()
        );
    }
    Ok(p)
}

pub(super) async fn wait_http_ok(
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
}

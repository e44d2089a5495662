//! A real Redis Cluster on 127.0.0.1: N redis-server processes with `--cluster-enabled yes` on
//! ephemeral ports, joined by `redis-cli --cluster create`.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::Proc;
use crate::redis::{resp_command, which};

/// How long a node may be unreachable before the others fail it over (`cluster-node-timeout`)
/// in a cluster with replicas: short, so that a failover in a test takes seconds, yet long enough
/// that a node starved of CPU on a busy machine is not failed over by mistake.
pub const NODE_TIMEOUT: Duration = Duration::from_millis(2_000);
/// The same without replicas: nothing can fail over, and a node marked failed would only take
/// the cluster down (`cluster_state:fail`) until it answers again.
pub const NODE_TIMEOUT_WITHOUT_REPLICAS: Duration = Duration::from_millis(10_000);

/// One node of a [`RedisCluster`].
pub struct ClusterNode {
    port: u16,
    bus_port: u16,
    node_timeout: Duration,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl ClusterNode {
    /// The port it serves clients on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sends one command and returns the raw RESP reply (None when unreachable).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        resp_command(self.port, args)
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    fn spawn(&mut self) {
        let proc = Proc::builder(which("redis-server"))
            .name(format!("redis-cluster-{}", self.port))
            .args(["--port", &self.port.to_string()])
            .args(["--cluster-port", &self.bus_port.to_string()])
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args([
                "--cluster-node-timeout",
                &self.node_timeout.as_millis().to_string(),
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .spawn();
        self.proc = Some(proc);
    }

    /// The node's view of itself: its id and whether it is a master.
    fn myself(&self) -> Option<(String, bool)> {
        let nodes = self.command(&["CLUSTER", "NODES"])?;
        nodes.lines().find(|l| l.contains("myself")).map(|line| {
            let mut fields = line.split_whitespace();
            let id = fields.next().unwrap_or_default().to_owned();
            let flags = fields.nth(1).unwrap_or_default();
            (id, flags.split(',').any(|f| f == "master"))
        })
    }

    /// Whether the node considers itself a master right now.
    pub fn is_master(&self) -> bool {
        self.myself().is_some_and(|(_, master)| master)
    }

    /// This node's id in the cluster.
    pub fn id(&self) -> Option<String> {
        self.myself().map(|(id, _)| id)
    }

    /// Whether this node says `cluster_state:ok`.
    pub fn cluster_ok(&self) -> bool {
        self.command(&["CLUSTER", "INFO"])
            .is_some_and(|info| info.contains("cluster_state:ok"))
    }
}

/// A Redis Cluster of `masters` masters with `replicas_per_master` replicas each, every node a
/// real redis-server on 127.0.0.1; every process is killed on drop.
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster (`redis-cli --cluster create ... --cluster-yes`) and
    /// waits until every node says `cluster_state:ok` and agrees on the masters.
    pub async fn start(masters: usize, replicas_per_master: usize) -> Self {
        assert!(
            masters >= 3,
            "redis-cli --cluster create needs 3 masters or more"
        );
        let count = masters * (1 + replicas_per_master);
        let mut nodes: Vec<ClusterNode> = (0..count)
            .map(|_| ClusterNode {
                port: crate::free_port(),
                bus_port: crate::free_port(),
                node_timeout: if replicas_per_master == 0 {
                    NODE_TIMEOUT_WITHOUT_REPLICAS
                } else {
                    NODE_TIMEOUT
                },
                dir: tempfile::Builder::new()
                    .prefix("apollo-redis-cluster-")
                    .tempdir()
                    .expect("create a redis data dir"),
                proc: None,
            })
            .collect();
        for node in &mut nodes {
            node.spawn();
        }
        let cluster = Self { nodes };
        cluster
            .wait("every node answers PING", Duration::from_secs(10), |n| {
                n.command(&["PING"]).is_some_and(|r| r.starts_with("+PONG"))
            })
            .await;
        let addrs: Vec<String> = cluster.nodes.iter().map(ClusterNode::addr).collect();
        let cli = which("redis-cli");
        let created = tokio::task::spawn_blocking(move || {
            Command::new(cli)
                .args(["--cluster", "create"])
                .args(&addrs)
                .args([
                    "--cluster-replicas",
                    &replicas_per_master.to_string(),
                    "--cluster-yes",
                ])
                .output()
        })
        .await
        .expect("join redis-cli")
        .expect("run redis-cli --cluster create");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        cluster
            .wait(
                "cluster_state:ok on every node",
                Duration::from_secs(30),
                ClusterNode::cluster_ok,
            )
            .await;
        let expected_masters = masters;
        let deadline = Instant::now() + Duration::from_secs(30);
        while cluster.masters().len() != expected_masters || !cluster.replicas_synced() {
            assert!(
                Instant::now() < deadline,
                "the cluster did not settle on {expected_masters} masters with synced replicas"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cluster
    }

    async fn wait(&self, what: &str, within: Duration, ok: impl Fn(&ClusterNode) -> bool) {
        let deadline = Instant::now() + within;
        while !self.nodes.iter().filter(|n| n.proc.is_some()).all(&ok) {
            assert!(
                Instant::now() < deadline,
                "redis cluster: not {what} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every replica reports its link to the master up (`master_link_status:up`).
    fn replicas_synced(&self) -> bool {
        self.nodes
            .iter()
            .filter(|n| n.proc.is_some() && !n.is_master())
            .all(|n| {
                n.command(&["INFO", "replication"])
                    .is_some_and(|i| i.contains("master_link_status:up"))
            })
    }

    /// `redis+cluster://127.0.0.1:<p1>,127.0.0.1:<p2>,.../` over every node.
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self.nodes.iter().map(ClusterNode::addr).collect();
        format!("redis+cluster://{}/", addrs.join(","))
    }

    /// The same nodes as a list of `redis://` URLs.
    pub fn url_list(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://{}/", n.addr()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node, masters and replicas.
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// Indices (into [`RedisCluster::nodes`]) of the running nodes that are masters now.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].proc.is_some() && self.nodes[*i].is_master())
            .collect()
    }

    /// Index of the node serving `key` as master now (asked of `CLUSTER KEYSLOT` and the slot map
    /// of a running node).
    pub fn master_of(&self, key: &str) -> usize {
        let any = self
            .nodes
            .iter()
            .find(|n| n.proc.is_some())
            .expect("a running node");
        let reply = any
            .command(&["CLUSTER", "KEYSLOT", key])
            .expect("CLUSTER KEYSLOT");
        let slot: u16 = reply
            .trim()
            .trim_start_matches(':')
            .parse()
            .expect("a slot number");
        let nodes = any.command(&["CLUSTER", "NODES"]).expect("CLUSTER NODES");
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].split(',').any(|f| f == "master") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                let bounds = (lo.parse::<u16>(), hi.parse::<u16>());
                matches!(bounds, (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if serves {
                let port = fields[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse::<u16>().ok());
                if let Some(i) = self.nodes.iter().position(|n| Some(n.port) == port) {
                    return i;
                }
            }
        }
        panic!("no master serves slot {slot} of {key:?}:\n{nodes}");
    }

    /// Index of a replica of master `master`.
    pub fn replica_of(&self, master: usize) -> usize {
        let id = self.nodes[master].id().expect("master id");
        (0..self.nodes.len())
            .find(|i| {
                self.nodes[*i]
                    .command(&["CLUSTER", "NODES"])
                    .and_then(|nodes| {
                        nodes
                            .lines()
                            .find(|l| l.contains("myself"))
                            .map(|l| l.split_whitespace().nth(3) == Some(id.as_str()))
                    })
                    .unwrap_or(false)
            })
            .unwrap_or_else(|| panic!("master {master} has no replica"))
    }

    /// A planned failover: `CLUSTER FAILOVER` on replica `replica`, which waits until it has
    /// caught up with its master's replication stream before the roles switch; returns once it
    /// is master and the cluster is ok again. Redis gives a manual failover 5 s to complete and
    /// drops it otherwise (a CPU-starved node on a busy machine can miss that): it is asked
    /// again then, as an operator would.
    pub async fn planned_failover(&self, replica: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let reply = self.nodes[replica]
                .command(&["CLUSTER", "FAILOVER"])
                .expect("CLUSTER FAILOVER");
            assert!(reply.starts_with("+OK"), "CLUSTER FAILOVER: {reply}");
            let attempt = Instant::now() + Duration::from_secs(8);
            while Instant::now() < attempt && !self.nodes[replica].is_master() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if self.nodes[replica].is_master() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {replica} was not promoted by CLUSTER FAILOVER within 60s"
            );
        }
        self.wait_promoted(replica).await;
    }

    /// Kills master `master` (SIGKILL) and waits until its replica `replica` has been promoted by
    /// the other masters and the cluster is ok again.
    pub async fn kill_and_fail_over(&mut self, master: usize, replica: usize) {
        self.kill(master);
        self.wait_promoted(replica).await;
    }

    /// Kills node `node` (SIGKILL); its data is gone, its cluster config (`nodes.conf`) stays.
    pub fn kill(&mut self, node: usize) {
        if let Some(mut p) = self.nodes[node].proc.take() {
            p.kill();
        }
    }

    /// Starts a killed node again on its port with its cluster config: a master whose slots were
    /// failed over meanwhile rejoins as a replica of its successor. Returns once it is a replica
    /// whose link to its master is up and the cluster is ok.
    pub async fn restart_as_replica(&mut self, node: usize) {
        assert!(self.nodes[node].proc.is_none(), "node {node} still runs");
        self.nodes[node].spawn();
        // A full resynchronisation from the new master: give a loaded machine time.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n = &self.nodes[node];
            let synced = n
                .command(&["INFO", "replication"])
                .is_some_and(|i| i.contains("role:slave") && i.contains("master_link_status:up"));
            if synced && n.cluster_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} did not rejoin as a synced replica within 60s:\n{}\n{}",
                n.command(&["INFO", "replication"]).unwrap_or_default(),
                n.command(&["CLUSTER", "NODES"]).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_promoted(&self, replica: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(self.nodes[replica].is_master() && self.nodes[replica].cluster_ok()) {
            assert!(
                Instant::now() < deadline,
                "node {replica} was not promoted within 30s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.wait(
            "cluster_state:ok after the failover",
            Duration::from_secs(30),
            ClusterNode::cluster_ok,
        )
        .await;
    }

    /// Sum over running nodes of `field` of `INFO commandstats` for `command`
    /// (e.g. `("evalsha", "calls")`).
    pub fn command_stat(&self, command: &str, field: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:");
        self.nodes
            .iter()
            .filter(|n| n.proc.is_some())
            .filter_map(|n| n.command(&["INFO", "commandstats"]))
            .flat_map(|info| {
                info.lines()
                    .filter(|l| l.starts_with(&prefix))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter_map(|line| {
                line[prefix.len()..].split(',').find_map(|kv| {
                    kv.strip_prefix(&format!("{field}="))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })
            })
            .sum()
    }

    /// `CONFIG RESETSTAT` on every running node (command counts start again at zero).
    pub fn reset_stats(&self) {
        for n in self.nodes.iter().filter(|n| n.proc.is_some()) {
            let reply = n.command(&["CONFIG", "RESETSTAT"]).unwrap_or_default();
            assert!(reply.starts_with("+OK"), "CONFIG RESETSTAT: {reply}");
        }
    }

    /// Kills every node.
    pub fn stop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut p) = n.proc.take() {
                p.kill();
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_serves_every_slot_and_fails_over() {
        let mut cluster = RedisCluster::start(3, 1).await;
        assert_eq!(cluster.masters().len(), 3);
        let master = cluster.master_of("k");
        let node = &cluster.nodes()[master];
        assert!(node
            .command(&["SET", "k", "v"])
            .is_some_and(|r| r.starts_with("+OK")));
        // A planned failover keeps the write.
        let replica = cluster.replica_of(master);
        cluster.planned_failover(replica).await;
        assert_eq!(cluster.master_of("k"), replica);
        let got = cluster.nodes()[replica]
            .command(&["GET", "k"])
            .expect("GET");
        assert!(got.contains("\r\nv\r\n"), "{got:?}");
        // The new master dies; the old one, its replica now, takes over again with the write.
        cluster.kill_and_fail_over(replica, master).await;
        assert_eq!(cluster.master_of("k"), master);
        assert_eq!(cluster.masters().len(), 3);
        let got = cluster.nodes()[master].command(&["GET", "k"]).expect("GET");
        assert!(got.contains("\r\nv\r\n"), "{got:?}");
        // And the dead one comes back as its replica.
        cluster.restart_as_replica(replica).await;
        assert!(!cluster.nodes()[replica].is_master());
    }
}

//! How the simulated agents reach the router: the file-descriptor limit, source addresses and
//! connection multiplexing.
//!
//! A process on this machine may hold at most 20,000 file descriptors (the hard limit; even root
//! cannot raise it here). An agent speaking HTTP/1.1 holds one connection for its long poll and a
//! second while a report overlaps it, so one loadtest process and one router could carry fewer
//! than 10,000 agents that way. Two ways past that: several loadtest processes and several routers,
//! or multiplexing. loadtest multiplexes (`--agents-per-connection N`): each group of N agents
//! shares one HTTP/2 connection (prior knowledge, as the router already speaks to the gateways),
//! every agent still being its own task with its own requests, streams, token and timers. 100,000
//! agents at 1,000 per connection are 100 connections; the router forwards each stream on its own
//! HTTP/2 connections to the gateways. What this does not simulate is a kernel socket per device:
//! the per-connection cost of HTTP/1.1 agents is measured separately, below the limit
//! (`--agents-per-connection 0`).
//!
//! Either way the client sockets are spread over source addresses 127.0.0.2 .. 127.0.0.254, so no
//! single (source, destination) pair runs out of ephemeral ports (28,000 per pair here).

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::Context;

/// Source addresses used: 127.0.0.2 ..= 127.0.0.254.
const SOURCE_ADDRESSES: u32 = 253;

/// The `i`-th source address (wrapping).
pub fn source_address(i: usize) -> IpAddr {
    let last = 2 + (i as u32 % SOURCE_ADDRESSES);
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last as u8))
}

/// Raises this process's soft file-descriptor limit to its hard limit (children started later,
/// the local stack's router and gateways among them, inherit it). Returns `(soft, hard)` after.
pub fn raise_fd_limit() -> anyhow::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit")?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    Ok((soft, hard))
}

/// HTTP clients of the agents: `client_of(i)` is the one agent `i` uses.
pub struct Clients {
    clients: Vec<reqwest::Client>,
    agents_per_connection: usize,
}

fn builder(source: IpAddr) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .tcp_keepalive(Duration::from_secs(30))
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .local_address(source)
        .user_agent(concat!("apollo-loadtest/", env!("CARGO_PKG_VERSION")))
}

impl Clients {
    /// Clients for `agents` agents. `agents_per_connection` 0: HTTP/1.1, a connection pool per
    /// source address (each agent ends up with its own connections); N: HTTP/2, one connection
    /// (one client) per N agents.
    pub fn new(agents: usize, agents_per_connection: usize) -> anyhow::Result<Self> {
        let clients = if agents_per_connection == 0 {
            let pools = agents.div_ceil(5_000).clamp(1, SOURCE_ADDRESSES as usize);
            (0..pools)
                .map(|i| builder(source_address(i)).http1_only().build())
                .collect::<Result<Vec<_>, _>>()
        } else {
            let connections = agents.div_ceil(agents_per_connection).max(1);
            (0..connections)
                .map(|i| {
                    builder(source_address(i))
                        .http2_prior_knowledge()
                        .http2_keep_alive_interval(Duration::from_secs(20))
                        .http2_keep_alive_timeout(Duration::from_secs(10))
                        .http2_keep_alive_while_idle(true)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()
        }
        .context("build the agents' HTTP clients")?;
        Ok(Self {
            clients,
            agents_per_connection,
        })
    }

    /// The client of agent `i`.
    pub fn client_of(&self, i: usize) -> reqwest::Client {
        let k = match i.checked_div(self.agents_per_connection) {
            None => i % self.clients.len(),
            Some(group) => group.min(self.clients.len() - 1),
        };
        self.clients[k].clone()
    }

    /// Clients (HTTP/2: connections) in use.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether there are none (never: at least one is built).
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_stay_in_127_0_0_2_to_254() {
        assert_eq!(source_address(0).to_string(), "127.0.0.2");
        assert_eq!(source_address(252).to_string(), "127.0.0.254");
        assert_eq!(source_address(253).to_string(), "127.0.0.2");
    }

    #[test]
    fn agents_are_grouped_per_connection() {
        let c = Clients::new(2_500, 1_000).expect("clients");
        assert_eq!(c.len(), 3);
        let h1 = Clients::new(12_000, 0).expect("clients");
        assert_eq!(h1.len(), 3);
    }

    #[test]
    fn the_soft_fd_limit_reaches_the_hard_one() {
        let (soft, hard) = raise_fd_limit().expect("rlimit");
        assert_eq!(soft, hard);
    }
}

//! Shared test support: starts real processes on ephemeral loopback ports and waits for
//! conditions with deadlines.
//!
//! - [`Proc`]: a child process with its output captured to a log file; killed on drop, and its
//!   log tail printed when the test is failing.
//! - [`binary`]: path of a workspace binary built by cargo.
//! - [`RedisServer`]: a real `redis-server` on an ephemeral port, no persistence.
//! - [`RedisCluster`]: a real Redis Cluster (masters, replicas) of redis-servers on ephemeral
//!   ports, created with `redis-cli --cluster create`; planned and unplanned failovers.
//! - [`ControlPlane`]: the real etcd + kube-apiserver + kube-controller-manager
//!   (`scripts/control-plane.sh`), shared by the tests of a binary or private to one test.
//! - [`TestNamespace`]: a namespace of one's own with Apollo's CRDs, the RBAC of `deploy/rbac/`,
//!   ServiceAccount kubeconfigs per [`Component`] and request counts from the audit log.
//! - [`FaultProxy`]: errors, delays and cut connections between a component and the apiserver.
//! - [`kubectl`]: the real kubectl against a kubeconfig, with a private cache dir.
//! - [`wait_until`] / [`wait_for`]: poll a condition until it holds or a deadline passes.
//! - [`events_about`]: the Kubernetes Events with a reason about one object.
//! - [`metrics`]: look up samples in what an admin `/metrics` endpoint answers.
//! - [`send_ok`]: send an HTTP request that must succeed, with a readable panic when it does not.
//! - [`skewed_clock_env`]: start a process whose wall clock is off (libfaketime).
//!
//! Nothing here sleeps to "let things settle": every wait has a condition and a deadline.
#![forbid(unsafe_code)]

mod clock;
mod events;
mod http;
pub mod kube;
pub mod metrics;
mod process;
mod redis;
mod redis_cluster;
mod wait;

pub use clock::skewed_clock_env;
pub use events::events_about;
pub use http::send_ok;
pub use kube::{
    kubectl, kubectl_program, ApiRequest, Component, ControlPlane, ControlPlaneOptions, Fault,
    FaultProxy, TestNamespace,
};
pub use process::{binary, Proc, ProcBuilder};
pub use redis::RedisServer;
pub use redis_cluster::{ClusterNode, RedisCluster, NODE_TIMEOUT as REDIS_CLUSTER_NODE_TIMEOUT};
pub use wait::{wait_for, wait_until};

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

/// A TCP port on 127.0.0.1 that was free a moment ago and has not been handed out before by this
/// process (so two servers started by one test never get the same port).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port on 127.0.0.1");
        let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

//! The real `apollo-router` binary following the gateway membership in a real Redis Cluster
//! (redis-servers in cluster mode, three masters with a replica each): `--redis-url` in the
//! cluster form, and a failover of the master holding the membership does not lose the router.

use std::net::SocketAddr;
use std::time::Duration;

use apollo_protocol::membership::{MEMBERS_KEY, REGISTER_SCRIPT};
use apollo_protocol::shard::shard_for_device;
use apollo_runtime::redis::{Eval, RedisTarget, Timeouts};
use apollo_test_support::{free_port, metrics, wait_until, Proc, RedisCluster};
use axum::http::HeaderMap;
use tokio::task::JoinHandle;

/// A stand-in gateway replica: answers with its ordinal, registered with a heartbeat through the
/// shared connection code (so it finds the membership's master in the cluster too).
struct Replica {
    server: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
}

impl Replica {
    async fn start(ordinal: u32, redis_url: &str) -> Self {
        let app = axum::Router::new().fallback(move || async move {
            let mut headers = HeaderMap::new();
            headers.insert(
                "x-apollo-gateway",
                ordinal.to_string().parse().expect("header"),
            );
            (headers, "{}")
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let heartbeat = tokio::spawn(heartbeat(redis_url.to_owned(), ordinal, addr));
        Self { server, heartbeat }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.server.abort();
        self.heartbeat.abort();
    }
}

async fn heartbeat(redis_url: String, ordinal: u32, addr: SocketAddr) {
    let target = RedisTarget::parse(&redis_url).expect("url");
    let timeouts = Timeouts {
        connect: Duration::from_secs(1),
        response: Duration::from_secs(1),
    };
    let mut conn = target.connect_lazy(timeouts).expect("connection");
    let mut call = Eval::new(REGISTER_SCRIPT);
    call.key(MEMBERS_KEY).arg(ordinal).arg(addr.to_string());
    loop {
        let _: Result<_, _> =
            tokio::time::timeout(Duration::from_secs(1), call.invoke::<u64>(&mut conn)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

struct Router {
    _proc: Proc,
    url: String,
    admin: String,
}

async fn start_router(redis_url: &str) -> Router {
    let port = free_port();
    let admin_port = free_port();
    let mut proc = Proc::builder(env!("CARGO_BIN_EXE_apollo-router"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .args(["--redis-url", redis_url])
        .args(["--membership-refresh", "100ms"])
        .spawn();
    proc.wait_for_log("apollo-router listening", Duration::from_secs(10))
        .await;
    Router {
        _proc: proc,
        url: format!("http://127.0.0.1:{port}"),
        admin: format!("http://127.0.0.1:{admin_port}"),
    }
}

async fn alive(client: &reqwest::Client, router: &Router) -> Option<f64> {
    let text = metrics::fetch(client, &format!("{}/metrics", router.admin))
        .await
        .ok()?;
    metrics::value(&text, "apollo_router_alive_replicas", &[])
}

async fn served_by(client: &reqwest::Client, router: &Router, device: &str) -> Option<u32> {
    let resp = client
        .get(format!("{}/v1/devices/{device}/desired", router.url))
        .send()
        .await
        .ok()?;
    resp.headers()
        .get("x-apollo-gateway")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[tokio::test]
async fn the_router_follows_the_membership_in_a_cluster_through_a_failover() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let url = cluster.url();
    let replicas = [Replica::start(0, &url).await, Replica::start(1, &url).await];
    // The list form of the URL, for the router.
    let router = start_router(&cluster.url_list()).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    wait_until(
        Duration::from_secs(10),
        "the router sees both replicas",
        || async { alive(&client, &router).await == Some(2.0) },
    )
    .await;
    for i in 0..20 {
        let device = format!("tor-{i}");
        assert_eq!(
            served_by(&client, &router, &device).await,
            Some(shard_for_device(&device, 2)),
            "{device}"
        );
    }
    // The master holding the membership dies; its replica takes over with the registrations.
    let master = cluster.master_of(MEMBERS_KEY);
    let promoted = cluster.replica_of(master);
    cluster.kill_and_fail_over(master, promoted).await;
    // A third replica joins after the failover: the router still follows the membership.
    let third = Replica::start(2, &url).await;
    wait_until(
        Duration::from_secs(20),
        "the router sees the replica that joined after the failover",
        || async { alive(&client, &router).await == Some(3.0) },
    )
    .await;
    for i in 0..20 {
        let device = format!("tor-{i}");
        assert_eq!(
            served_by(&client, &router, &device).await,
            Some(shard_for_device(&device, 3)),
            "{device}"
        );
    }
    drop(third);
    drop(replicas);
}

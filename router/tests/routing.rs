//! The real `apollo-router` binary against a real redis-server and stand-in gateway replicas
//! (small h2c servers on loopback that say which ordinal answered and echo what they received).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use apollo_protocol::membership::{MEMBERS_KEY, REGISTER_SCRIPT};
use apollo_protocol::shard::shard_for_device;
use apollo_protocol::NOT_READY_HEADER;
use apollo_test_support::{free_port, metrics, wait_until, Proc, RedisServer};
use axum::extract::{Query, Request};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::task::JoinHandle;

/// A stand-in gateway replica registered in Redis with a heartbeat.
struct Replica {
    ordinal: u32,
    server: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
}

impl Replica {
    async fn start(ordinal: u32, redis_url: &str) -> Self {
        let app = axum::Router::new().fallback(move |q, req| echo(ordinal, q, req));
        Self::serve(ordinal, redis_url, app).await
    }

    /// A replica registered and alive whose watch cache has not synced: every request gets the
    /// gateway's "not ready" 503.
    async fn start_not_ready(ordinal: u32, redis_url: &str) -> Self {
        let app = axum::Router::new().fallback(move || async move {
            let mut headers = HeaderMap::new();
            headers.insert(NOT_READY_HEADER, "1".parse().expect("header"));
            headers.insert("retry-after", "1".parse().expect("header"));
            headers.insert(
                "x-apollo-gateway",
                ordinal.to_string().parse().expect("header"),
            );
            let body = serde_json::json!({"error": {"code": "not_ready", "message": "loading"}});
            (StatusCode::SERVICE_UNAVAILABLE, headers, axum::Json(body)).into_response()
        });
        Self::serve(ordinal, redis_url, app).await
    }

    async fn serve(ordinal: u32, redis_url: &str, app: axum::Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let heartbeat = tokio::spawn(heartbeat(redis_url.to_owned(), ordinal, addr));
        Self {
            ordinal,
            server,
            heartbeat,
        }
    }

    /// Like kill -9: the socket closes and the heartbeat stops, but the registration stays.
    fn crash(&self) {
        self.server.abort();
        self.heartbeat.abort();
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.crash();
    }
}

async fn start_replicas(ordinals: std::ops::Range<u32>, redis_url: &str) -> Vec<Replica> {
    let mut out = Vec::new();
    for i in ordinals {
        out.push(Replica::start(i, redis_url).await);
    }
    out
}

async fn heartbeat(redis_url: String, ordinal: u32, addr: SocketAddr) {
    let script = redis::Script::new(REGISTER_SCRIPT);
    loop {
        if let Ok(client) = redis::Client::open(redis_url.as_str()) {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                loop {
                    let r: redis::RedisResult<u64> = script
                        .key(MEMBERS_KEY)
                        .arg(ordinal)
                        .arg(addr.to_string())
                        .invoke_async(&mut conn)
                        .await;
                    if r.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn echo(ordinal: u32, Query(q): Query<HashMap<String, String>>, req: Request) -> Response {
    let wait = q
        .get("waitSeconds")
        .and_then(|w| w.parse::<u64>().ok())
        .unwrap_or(0);
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-apollo-gateway",
        ordinal.to_string().parse().expect("header"),
    );
    headers.insert("etag", "\"e1\"".parse().expect("header"));
    if wait > 0 {
        tokio::time::sleep(Duration::from_secs(wait)).await;
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    let seen: HashMap<String, String> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    let doc = serde_json::json!({
        "ordinal": ordinal,
        "path": parts.uri.path(),
        "method": parts.method.as_str(),
        "version": format!("{:?}", parts.version),
        "headers": seen,
        "bodyLen": body.len(),
    });
    (StatusCode::OK, headers, axum::Json(doc)).into_response()
}

struct Router {
    proc: Proc,
    url: String,
    admin: String,
}

async fn start_router(redis_url: &str) -> Router {
    let port = free_port();
    let admin_port = free_port();
    // APOLLO_ROUTER_BIN: an older build, to show a test fails before its fix.
    let bin = std::env::var("APOLLO_ROUTER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_apollo-router").to_owned());
    let mut proc = Proc::builder(bin)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .args(["--redis-url", redis_url])
        .args(["--membership-refresh-ms", "100"])
        .spawn();
    proc.wait_for_log("apollo-router listening", Duration::from_secs(10))
        .await;
    Router {
        proc,
        url: format!("http://127.0.0.1:{port}"),
        admin: format!("http://127.0.0.1:{admin_port}"),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Value of the response header `name`, if present and readable as text.
fn header<'r>(resp: &'r reqwest::Response, name: &str) -> Option<&'r str> {
    resp.headers().get(name)?.to_str().ok()
}

/// The `error.code` of a JSON error body (`{"error": {"code": ...}}`).
async fn error_code(resp: reqwest::Response) -> serde_json::Value {
    let body: serde_json::Value = resp.json().await.expect("json error body");
    body["error"]["code"].clone()
}

async fn served_by(client: &reqwest::Client, router: &Router, device: &str) -> Option<u32> {
    let resp = client
        .get(format!("{}/v1/devices/{device}/desired", router.url))
        .send()
        .await
        .ok()?;
    header(&resp, "x-apollo-gateway")?.parse().ok()
}

async fn wait_ready(client: &reqwest::Client, router: &Router, alive: usize) {
    let metrics_url = format!("{}/metrics", router.admin);
    wait_until(
        Duration::from_secs(10),
        "router sees the replicas alive",
        || async {
            let Ok(text) = metrics::fetch(client, &metrics_url).await else {
                return false;
            };
            metrics::value(&text, "apollo_router_alive_replicas", &[]) == Some(alive as f64)
        },
    )
    .await;
}

/// A redis-server, stand-in replicas registered in it and one router that sees them all alive.
struct Fixture {
    redis: RedisServer,
    replicas: Vec<Replica>,
    router: Router,
    client: reqwest::Client,
}

/// Starts a [`Fixture`] with `replicas` replicas (ordinals `0..replicas`) and waits until the
/// router counts them all alive.
async fn fixture(replicas: u32) -> Fixture {
    let redis = RedisServer::start().await;
    let replicas = start_replicas(0..replicas, &redis.url()).await;
    let router = start_router(&redis.url()).await;
    let client = http();
    wait_ready(&client, &router, replicas.len()).await;
    Fixture {
        redis,
        replicas,
        router,
        client,
    }
}

#[tokio::test]
async fn routes_each_device_to_its_shard_and_passes_headers_both_ways() {
    let Fixture {
        redis: _redis,
        replicas,
        router,
        client,
    } = fixture(3).await;

    let mut per_replica = [0u32; 3];
    for i in 0..60 {
        let device = format!("dev-{i:03}");
        let got = served_by(&client, &router, &device).await.expect("routed");
        assert_eq!(got, shard_for_device(&device, 3), "{device}");
        assert_eq!(
            served_by(&client, &router, &device).await,
            Some(got),
            "sticky"
        );
        per_replica[got as usize] += 1;
    }
    assert!(per_replica.iter().all(|&n| n > 5), "{per_replica:?}");

    let resp = client
        .post(format!("{}/v1/devices/tor1-01/report", router.url))
        .header("x-device-token", "tok")
        .header("if-none-match", "\"abc\"")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .header("connection", "keep-alive")
        .body(vec![b'x'; 1000])
        .send()
        .await
        .expect("report");
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "etag"), Some("\"e1\""));
    let seen: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(seen["version"], "HTTP/2.0", "upstream speaks h2c");
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["bodyLen"], 1000);
    assert_eq!(seen["headers"]["x-device-token"], "tok");
    assert_eq!(seen["headers"]["if-none-match"], "\"abc\"");
    assert!(seen["headers"]["traceparent"]
        .as_str()
        .is_some_and(|t| t.starts_with("00-0af7")));
    assert!(seen["headers"].get("connection").is_none());
    assert!(seen["headers"]["x-forwarded-for"]
        .as_str()
        .is_some_and(|f| f.contains("127.0.0.1")));
    drop(replicas);
    drop(router);
}

#[tokio::test]
async fn long_polls_pass_through_without_a_router_timeout() {
    let Fixture {
        redis: _redis,
        replicas: _replicas,
        router,
        client,
    } = fixture(2).await;
    let started = Instant::now();
    let resp = client
        .get(format!(
            "{}/v1/devices/tor1-01/desired?waitSeconds=3",
            router.url
        ))
        .header("if-none-match", "\"e1\"")
        .send()
        .await
        .unwrap_or_else(|e| panic!("long poll: {e:?}\n{}", router.proc.logs()));
    assert_eq!(resp.status(), 304);
    assert_eq!(header(&resp, "etag"), Some("\"e1\""));
    assert!(started.elapsed() >= Duration::from_secs(3));
}

#[tokio::test]
async fn a_crashed_replica_s_devices_go_to_one_deterministic_fallback() {
    let redis = RedisServer::start().await;
    let replicas: Vec<Replica> = start_replicas(0..3, &redis.url()).await;
    // Two routers side by side must agree on every fallback.
    let a = start_router(&redis.url()).await;
    let b = start_router(&redis.url()).await;
    let client = http();
    wait_ready(&client, &a, 3).await;
    wait_ready(&client, &b, 3).await;

    let devices: Vec<String> = (0..90)
        .map(|i| format!("dev-{i:03}"))
        .filter(|d| shard_for_device(d, 3) == 1)
        .collect();
    assert!(!devices.is_empty());
    replicas[1].crash();

    // Immediately (before the membership marks it dead) requests are retried on a fallback.
    for d in &devices {
        let via_a = served_by(&client, &a, d)
            .await
            .expect("served by a fallback");
        assert_ne!(via_a, 1);
        let via_b = served_by(&client, &b, d)
            .await
            .expect("served by a fallback");
        assert_eq!(via_a, via_b, "routers disagree on the fallback of {d}");
    }
    // Devices of live replicas do not move.
    for i in 0..30 {
        let d = format!("other-{i}");
        let owner = shard_for_device(&d, 3);
        if owner != 1 {
            assert_eq!(served_by(&client, &a, &d).await, Some(owner));
        }
    }
    // Once the heartbeat is stale the view says so, and N stays 3 (no reshuffle).
    wait_ready(&client, &a, 2).await;
    let text = metrics::fetch(&client, &format!("{}/metrics", a.admin))
        .await
        .expect("metrics");
    let replicas = metrics::value(&text, "apollo_router_replicas", &[]);
    assert_eq!(replicas, Some(3.0), "{text}");
    let fallbacks = metrics::value(&text, "apollo_router_fallbacks_total", &[]).unwrap_or(0.0);
    assert!(fallbacks >= devices.len() as f64, "{fallbacks}");
}

/// Issue 13, defect 3: a replica alive in the membership but not ready (restarted, its watch cache
/// still loading) answers 503 "not ready"; the router passes it over for the fallback instead of
/// handing the 503 to the agent. With no other replica, the agent gets that 503, not a 502.
#[tokio::test]
async fn a_replica_that_answers_not_ready_is_passed_over_for_the_fallback() {
    let redis = RedisServer::start().await;
    let ready = Replica::start(0, &redis.url()).await;
    let not_ready = Replica::start_not_ready(1, &redis.url()).await;
    let router = start_router(&redis.url()).await;
    let client = http();
    wait_ready(&client, &router, 2).await;
    let devices: Vec<String> = (0..40)
        .map(|i| format!("dev-{i:03}"))
        .filter(|d| shard_for_device(d, 2) == 1)
        .collect();
    assert!(!devices.is_empty());
    for d in &devices {
        assert_eq!(served_by(&client, &router, d).await, Some(0), "{d}");
    }
    drop(ready);
    // Alone, the replica's own answer reaches the agent.
    wait_ready(&client, &router, 1).await;
    let resp = client
        .get(format!("{}/v1/devices/{}/desired", router.url, devices[0]))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, NOT_READY_HEADER), Some("1"));
    assert_eq!(error_code(resp).await, "not_ready");
    drop(not_ready);
}

#[tokio::test]
async fn membership_changes_are_followed_within_a_second() {
    let Fixture {
        redis,
        mut replicas,
        router,
        client,
    } = fixture(3).await;
    let movers: Vec<String> = (0..200)
        .map(|i| format!("dev-{i:03}"))
        .filter(|d| shard_for_device(d, 4) == 3)
        .collect();
    replicas.push(Replica::start(3, &redis.url()).await);
    let started = Instant::now();
    wait_until(
        Duration::from_secs(3),
        "a device moves to the new replica",
        || async { served_by(&client, &router, &movers[0]).await == Some(3) },
    )
    .await;
    // "Within about a second": a 100 ms refresh here, plus slack for a loaded CI machine.
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    for d in &movers {
        assert_eq!(served_by(&client, &router, d).await, Some(3));
    }
    assert!(replicas.iter().all(|r| r.ordinal < 4));
}

#[tokio::test]
async fn no_replica_alive_is_503_with_retry_after() {
    let redis = RedisServer::start().await;
    let router = start_router(&redis.url()).await;
    let client = http();
    let resp = client
        .get(format!("{}/v1/devices/tor1-01/desired", router.url))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "retry-after"), Some("1"));
    assert_eq!(error_code(resp).await, "no_gateway");
    let ready = client
        .get(format!("{}/readyz", router.admin))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);
}

#[tokio::test]
async fn bad_input_is_refused_clearly() {
    let Fixture {
        redis: _redis,
        replicas: _replicas,
        router,
        client,
    } = fixture(1).await;
    let resp = client
        .get(format!("{}/v1/other", router.url))
        .send()
        .await
        .expect("req");
    assert_eq!(resp.status(), 404);
    assert_eq!(error_code(resp).await, "not_found");
    let resp = client
        .post(format!("{}/v1/devices/tor1-01/report", router.url))
        .body(vec![b'x'; apollo_protocol::MAX_REPORT_BYTES + 1])
        .send()
        .await
        .expect("req");
    assert_eq!(resp.status(), 413);
    assert_eq!(error_code(resp).await, "payload_too_large");
}

#[tokio::test]
async fn redis_restart_keeps_routing_and_port_in_use_fails_fast() {
    let Fixture {
        mut redis,
        replicas: _replicas,
        mut router,
        client,
    } = fixture(2).await;
    redis.stop();
    for i in 0..10 {
        let d = format!("dev-{i}");
        assert_eq!(
            served_by(&client, &router, &d).await,
            Some(shard_for_device(&d, 2))
        );
    }
    redis.restart().await;
    wait_ready(&client, &router, 2).await;

    // A second router on the same port exits non-zero at once, naming the address.
    let taken = router.url.trim_start_matches("http://").to_owned();
    let mut second = Proc::builder(env!("CARGO_BIN_EXE_apollo-router"))
        .args([
            "--listen",
            &taken,
            "--admin-listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .args(["--redis-url", &redis.url()])
        .spawn();
    let status = second
        .wait_exit(Duration::from_secs(2))
        .await
        .expect("exits within 2 s");
    assert!(!status.success());
    assert!(second.logs().contains(&taken), "{}", second.logs());
    assert!(router.proc.is_running());
}

//! The real `apollo-router` binary as a public entry point (issue 13, defect 8): raw client
//! sockets that send half a request line, half a body, nothing at all, a body on a GET, huge heads
//! or too many connections, against a real redis-server and a stand-in gateway replica (an h2c
//! server on loopback that counts what reaches it).
//!
//! `APOLLO_ROUTER_BIN` runs these against another build of the router (to show them failing on
//! an older one); the limits are given through their `APOLLO_*` variables, which an older build
//! simply ignores.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apollo_protocol::membership::{MEMBERS_KEY, REGISTER_SCRIPT};
use apollo_test_support::{free_port, metrics, wait_until, Proc, RedisServer};
use axum::http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// A stand-in gateway replica (ordinal 0) that counts the requests reaching it.
struct Replica {
    seen: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn replica(redis_url: &str) -> Replica {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            (StatusCode::OK, format!("{{\"bodyLen\":{}}}", body.len()))
        }
    });
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let heartbeat = tokio::spawn(heartbeat(redis_url.to_owned(), addr));
    Replica {
        seen,
        tasks: vec![server, heartbeat],
    }
}

async fn heartbeat(redis_url: String, addr: SocketAddr) {
    let script = redis::Script::new(REGISTER_SCRIPT);
    loop {
        if let Ok(client) = redis::Client::open(redis_url.as_str()) {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                while script
                    .key(MEMBERS_KEY)
                    .arg(0)
                    .arg(addr.to_string())
                    .invoke_async::<u64>(&mut conn)
                    .await
                    .is_ok()
                {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Stack {
    _redis: RedisServer,
    replica: Replica,
    _router: Proc,
    addr: SocketAddr,
    admin: String,
}

/// Redis, one replica and the router, started with `limits` (`APOLLO_*` variables), ready.
async fn stack(limits: &[(&str, &str)]) -> Stack {
    let redis = RedisServer::start().await;
    let replica = replica(&redis.url()).await;
    let port = free_port();
    let admin_port = free_port();
    let bin = std::env::var("APOLLO_ROUTER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_apollo-router").to_owned());
    let mut router = Proc::builder(bin)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .args(["--redis-url", &redis.url()])
        .args(["--membership-refresh-ms", "100"])
        .envs(limits.iter().copied())
        .spawn();
    router
        .wait_for_log("apollo-router listening", Duration::from_secs(10))
        .await;
    let admin = format!("http://127.0.0.1:{admin_port}");
    let client = reqwest::Client::new();
    wait_until(
        Duration::from_secs(10),
        "router sees the replica",
        || async {
            metrics::fetch(&client, &format!("{admin}/metrics"))
                .await
                .ok()
                .and_then(|text| metrics::value(&text, "apollo_router_alive_replicas", &[]))
                == Some(1.0)
        },
    )
    .await;
    Stack {
        _redis: redis,
        replica,
        _router: router,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        admin,
    }
}

/// How a raw connection ended up after `deadline`.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The router closed it (EOF or reset) after sending these bytes.
    Closed(String),
    /// Still open with these bytes received.
    Open(String),
}

/// Reads from `conn` until it closes or `deadline` passes.
async fn read_until_closed(conn: &mut TcpStream, deadline: Duration) -> (Outcome, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, conn.read(&mut buf)).await {
            Err(_) => return (Outcome::Open(lossy(&got)), start.elapsed()),
            Ok(Ok(0)) | Ok(Err(_)) => return (Outcome::Closed(lossy(&got)), start.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Sends `request` on a new connection and reads the whole answer (the request closes it).
async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    conn.write_all(request).await.expect("write");
    let (outcome, _) = read_until_closed(&mut conn, Duration::from_secs(10)).await;
    match outcome {
        Outcome::Closed(text) | Outcome::Open(text) => text,
    }
}

#[tokio::test]
async fn half_a_request_line_is_closed_after_the_header_read_timeout() {
    let stack = stack(&[("APOLLO_HEADER_READ_TIMEOUT", "500ms")]).await;
    let mut conn = TcpStream::connect(stack.addr).await.expect("connect");
    conn.write_all(b"GET /v1/devi").await.expect("write");
    let (outcome, after) = read_until_closed(&mut conn, Duration::from_secs(5)).await;
    assert_eq!(outcome, Outcome::Closed(String::new()), "after {after:?}");
    assert!(
        after >= Duration::from_millis(400),
        "closed too early: {after:?}"
    );

    // A connection that never sends a byte is closed by the same clock.
    let mut silent = TcpStream::connect(stack.addr).await.expect("connect");
    let (outcome, _) = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert_eq!(outcome, Outcome::Closed(String::new()));

    // A head that trickles in, one byte at a time, is still bounded by the same 500 ms.
    let mut trickle = TcpStream::connect(stack.addr).await.expect("connect");
    let start = Instant::now();
    let mut closed = false;
    for b in b"GET /v1/devices/d1/desired HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaa" {
        if trickle.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !closed {
        let (outcome, _) = read_until_closed(&mut trickle, Duration::from_secs(5)).await;
        assert_eq!(outcome, Outcome::Closed(String::new()));
    }
    assert!(start.elapsed() < Duration::from_secs(6));
    assert_eq!(stack.replica.seen.load(Ordering::SeqCst), 0);
    let text = metrics::fetch(&reqwest::Client::new(), &format!("{}/metrics", stack.admin))
        .await
        .expect("metrics");
    assert!(
        metrics::value(
            &text,
            "apollo_router_connections_closed_total",
            &[r#"reason="HeaderTimeout""#]
        ) >= Some(3.0),
        "{text}"
    );
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout_on_both_protocols() {
    let stack = stack(&[("APOLLO_IDLE_TIMEOUT", "1s")]).await;

    // HTTP/1.1: one request answered, then the kept-alive connection sits idle.
    let mut h1 = TcpStream::connect(stack.addr).await.expect("connect");
    h1.write_all(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let (outcome, after) = read_until_closed(&mut h1, Duration::from_secs(5)).await;
    let Outcome::Closed(text) = outcome else {
        panic!("idle HTTP/1.1 connection still open: {outcome:?}");
    };
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(
        after >= Duration::from_millis(800),
        "closed too early: {after:?}"
    );

    // h2c with prior knowledge: the preface and an empty SETTINGS frame, then nothing. The
    // router's SETTINGS (and ack) come first, then a GOAWAY and the close.
    let mut h2 = TcpStream::connect(stack.addr).await.expect("connect");
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match h2.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle h2c connection still open");
    assert!(
        frame_types(&got).contains(&GOAWAY),
        "no GOAWAY before the close: {got:?}"
    );
}

const GOAWAY: u8 = 0x7;

/// Types of the HTTP/2 frames in `bytes` (9-byte headers: length, type, flags, stream).
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

#[tokio::test]
async fn a_body_that_stalls_gets_408() {
    let stack = stack(&[("APOLLO_BODY_READ_TIMEOUT", "500ms")]).await;
    let mut conn = TcpStream::connect(stack.addr).await.expect("connect");
    conn.write_all(
        b"POST /v1/devices/d1/report HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"observed\":",
    )
    .await
    .expect("write");
    let (outcome, _) = read_until_closed(&mut conn, Duration::from_secs(5)).await;
    let text = match outcome {
        Outcome::Closed(text) | Outcome::Open(text) => text,
    };
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert!(text.contains("request_timeout"), "{text}");
    assert_eq!(stack.replica.seen.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_get_or_head_with_a_body_is_400_and_never_reaches_the_gateway() {
    let stack = stack(&[]).await;
    let cases: [&[u8]; 4] = [
        b"GET /v1/devices/d1/desired HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
          Content-Length: 5\r\n\r\nhello",
        b"GET /v1/devices/d1/desired HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HEAD /v1/devices/d1/desired HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
          Content-Length: 2\r\n\r\n{}",
        // An empty chunked body announces one all the same.
        b"GET /v1/devices/d1/desired HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    for request in cases {
        let text = exchange(stack.addr, request).await;
        assert!(
            text.starts_with("HTTP/1.1 400"),
            "{}: {text}",
            lossy(request)
        );
        if !request.starts_with(b"HEAD") {
            assert!(text.contains("body_not_allowed"), "{text}");
        }
    }
    assert_eq!(stack.replica.seen.load(Ordering::SeqCst), 0);

    // A GET with `Content-Length: 0` is fine, and the same connection pool still serves.
    let text = exchange(
        stack.addr,
        b"GET /v1/devices/d1/desired HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
          Content-Length: 0\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"bodyLen\":0"), "{text}");
    // A POST's body goes through with its length.
    let text = exchange(
        stack.addr,
        b"POST /v1/devices/d1/report HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
          Content-Length: 2\r\n\r\n{}",
    )
    .await;
    assert!(text.contains("\"bodyLen\":2"), "{text}");
    assert_eq!(stack.replica.seen.load(Ordering::SeqCst), 2);
}

/// Over one h2c connection (how a proxy in front would talk to the router): a burst of GETs
/// carrying bodies is refused by the router itself, the replica sees none of them, and the same
/// connection then serves a legitimate GET.
#[tokio::test]
async fn a_burst_of_gets_with_bodies_over_h2c_never_reaches_the_gateway() {
    let stack = stack(&[]).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let url = format!("http://{}/v1/devices/d1/desired", stack.addr);
    let refused = futures::future::join_all((0..50).map(|_| h2.get(&url).body("{}").send())).await;
    for resp in refused {
        let resp = resp.expect("an answer");
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        let body: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["code"], "body_not_allowed");
    }
    assert_eq!(stack.replica.seen.load(Ordering::SeqCst), 0);
    let resp = h2.get(&url).send().await.expect("legitimate GET");
    assert_eq!(resp.status(), 200);
    assert_eq!(stack.replica.seen.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_on_accept_until_one_frees() {
    let stack = stack(&[("APOLLO_MAX_CONNECTIONS", "2")]).await;
    let _a = TcpStream::connect(stack.addr).await.expect("connect");
    let b = TcpStream::connect(stack.addr).await.expect("connect");
    // The accept loop takes connections in order: by the time the third is accepted the first
    // two hold both slots.
    let mut third = TcpStream::connect(stack.addr).await.expect("connect");
    third
        .write_all(b"GET /v1/devices/d1/desired HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok();
    let (outcome, _) = read_until_closed(&mut third, Duration::from_secs(5)).await;
    assert_eq!(outcome, Outcome::Closed(String::new()));

    drop(b);
    wait_until(
        Duration::from_secs(5),
        "a freed slot serves again",
        || async {
            exchange(
                stack.addr,
                b"GET /v1/devices/d1/desired HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await
            .starts_with("HTTP/1.1 200")
        },
    )
    .await;
    let metrics_url = format!("{}/metrics", stack.admin);
    let text = metrics::fetch(&reqwest::Client::new(), &metrics_url)
        .await
        .expect("metrics");
    assert!(
        metrics::value(&text, "apollo_router_connections_refused_total", &[]) >= Some(1.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_head_larger_than_the_limit_is_431() {
    let stack = stack(&[("APOLLO_MAX_HEADER_BYTES", "16384")]).await;
    let mut request =
        b"GET /v1/devices/d1/desired HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 64 * 1024));
    request.extend_from_slice(b"\r\n\r\n");
    let text = exchange(stack.addr, &request).await;
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(stack.replica.seen.load(Ordering::SeqCst), 0);
}

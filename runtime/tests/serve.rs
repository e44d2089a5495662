//! The accept loop over real sockets: both protocols on one port, peer addresses, graceful drain.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use apollo_runtime::{serve, ServeOptions};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use tokio::net::TcpListener;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;

type ResponseFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<http::Response<Full<Bytes>>, Infallible>> + Send>,
>;

/// Answers `<version> <peer>`; `/slow` says it started on `started`, then answers after `slow`.
fn echo(
    peer: SocketAddr,
    slow: Duration,
    started: UnboundedSender<()>,
) -> impl hyper::service::Service<
    http::Request<Incoming>,
    Response = http::Response<Full<Bytes>>,
    Error = Infallible,
    Future = ResponseFuture,
> + Send
       + 'static {
    hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let started = started.clone();
        Box::pin(async move {
            if req.uri().path() == "/slow" {
                let _ = started.send(());
                tokio::time::sleep(slow).await;
            }
            let body = format!("{:?} {peer}", req.version());
            Ok(http::Response::new(Full::new(Bytes::from(body))))
        }) as ResponseFuture
    })
}

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    slow_started: UnboundedReceiver<()>,
}

impl Server {
    /// Waits until a `/slow` request is being handled.
    async fn slow_request_started(&mut self) {
        tokio::time::timeout(Duration::from_secs(10), self.slow_started.recv())
            .await
            .expect("the slow request reached the handler")
            .expect("handler alive");
    }
}

async fn start(slow: Duration, drain: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let (started, slow_started) = unbounded_channel();
    let options = ServeOptions {
        drain,
        ..ServeOptions::default()
    };
    let task = tokio::spawn(serve(
        listener,
        move |peer| echo(peer, slow, started.clone()),
        options,
        shutdown.clone(),
    ));
    Server {
        addr,
        shutdown,
        task,
        slow_started,
    }
}

#[tokio::test]
async fn http1_and_h2c_share_the_port_and_handlers_see_the_peer() {
    let server = start(Duration::ZERO, Duration::from_secs(5)).await;
    let url = format!("http://{}/", server.addr);

    let h1 = reqwest::Client::builder()
        .http1_only()
        .build()
        .expect("client");
    let text = h1
        .get(&url)
        .send()
        .await
        .expect("h1")
        .text()
        .await
        .expect("body");
    assert!(text.starts_with("HTTP/1.1 127.0.0.1:"), "{text}");

    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let text = h2
        .get(&url)
        .send()
        .await
        .expect("h2c")
        .text()
        .await
        .expect("body");
    assert!(text.starts_with("HTTP/2.0 127.0.0.1:"), "{text}");
    assert_ne!(
        text,
        format!("HTTP/2.0 {}", server.addr),
        "peer, not our own address"
    );

    server.shutdown.cancel();
    server.task.await.expect("serve ends");
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_an_in_flight_request_finish() {
    let mut server = start(Duration::from_millis(600), Duration::from_secs(10)).await;
    let url = format!("http://{}/slow", server.addr);
    let client = reqwest::Client::new();
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.get(url).send().await?.text().await }
    });
    server.slow_request_started().await;
    server.shutdown.cancel();

    let text = in_flight
        .await
        .expect("join")
        .expect("in-flight request completes");
    assert!(text.starts_with("HTTP/1.1"), "{text}");
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .expect("serve returns once the last connection closed")
        .expect("no panic");
    assert!(
        tokio::net::TcpStream::connect(server.addr).await.is_err(),
        "listener closed after shutdown"
    );
}

#[tokio::test]
async fn a_request_that_outlives_the_drain_period_is_cut_off() {
    let mut server = start(Duration::from_secs(60), Duration::from_millis(300)).await;
    let url = format!("http://{}/slow", server.addr);
    let in_flight = tokio::spawn(async move { reqwest::get(url).await?.text().await });
    server.slow_request_started().await;
    let cancelled = Instant::now();
    server.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .expect("serve returns after the drain period, not after the 60 s request")
        .expect("no panic");
    assert!(
        cancelled.elapsed() >= Duration::from_millis(300),
        "drained for the whole period"
    );
    let cut = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("the client sees the connection close, not a 60 s wait")
        .expect("join");
    assert!(cut.is_err(), "request was cut off: {cut:?}");
}

/// A server with a short header-read timeout and an 8 KiB head limit.
async fn start_strict() -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let (started, _slow_started) = unbounded_channel();
    let options = ServeOptions {
        header_read_timeout: Duration::from_millis(300),
        max_header_bytes: 8192,
        ..ServeOptions::default()
    };
    tokio::spawn(serve(
        listener,
        move |peer| echo(peer, Duration::ZERO, started.clone()),
        options,
        shutdown.clone(),
    ));
    (addr, shutdown)
}

/// Reads until the server closes the connection (or `deadline`); returns what it sent.
async fn read_to_close(stream: &mut tokio::net::TcpStream, deadline: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    match tokio::time::timeout(deadline, stream.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

/// Issue 13 (found by the bad-input table on the gateway's own port): half a request line used to
/// hold a connection open forever, and a 128 KiB header was read and served.
#[tokio::test]
async fn half_a_request_head_is_cut_off_and_a_huge_head_gets_431() {
    use tokio::io::AsyncWriteExt;
    let (addr, shutdown) = start_strict().await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(b"GET / HT").await.expect("write");
    let started = Instant::now();
    let answer = read_to_close(&mut slow, Duration::from_secs(10)).await;
    assert!(answer.is_some(), "still open after 10 s");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let mut huge = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    huge.write_all(head.as_bytes()).await.expect("write");
    let answer = read_to_close(&mut huge, Duration::from_secs(10))
        .await
        .expect("answered and closed");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // A well-formed request is still served.
    let mut ok = tokio::net::TcpStream::connect(addr).await.expect("connect");
    ok.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let answer = read_to_close(&mut ok, Duration::from_secs(10))
        .await
        .expect("answered");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    shutdown.cancel();
}

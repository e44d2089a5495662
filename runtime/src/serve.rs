//! The HTTP accept loop.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How [`serve`] runs its connections.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Most concurrent HTTP/2 streams per connection. A router multiplexes the long polls of many
    /// agents over one connection to a gateway, so hyper's default (200) would queue them.
    pub max_concurrent_streams: u32,
    /// After shutdown, how long open connections get to finish before they are dropped.
    pub drain: Duration,
    /// HTTP/1.1: how long a client has to send a request's head (from the connection's start or
    /// the previous response); past it the connection is closed. A client that sends half a
    /// request line must not hold a connection forever.
    pub header_read_timeout: Duration,
    /// HTTP/1.1: the largest request head read (bigger ones get 431). HTTP/2 has its own limit
    /// (16 KiB header list).
    pub max_header_bytes: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_concurrent_streams: 10_000,
            drain: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
        }
    }
}

/// Pause after a failed `accept` (out of file descriptors and the like) instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves HTTP/1.1 and HTTP/2 cleartext (prior knowledge) on `listener` until `shutdown`, then
/// stops accepting, asks open connections to close (HTTP/2 GOAWAY, HTTP/1.1 close after the
/// current response) and waits up to `options.drain` for them.
///
/// `make_service` builds the service of each connection from the peer's address, so a handler
/// can know who it is talking to.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    make_service: M,
    options: ServeOptions,
    shutdown: CancellationToken,
) where
    M: Fn(SocketAddr) -> S,
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        // hyper's floor is 8 KiB.
        .max_buf_size(options.max_header_bytes.max(8192));
    builder
        .http2()
        .max_concurrent_streams(options.max_concurrent_streams)
        // A router multiplexes thousands of agents' requests on one connection: h2's rapid-reset
        // guard (20 reset streams pending accept) would close it for all of them at once.
        .max_pending_accept_reset_streams(4096)
        // h2 also closes a connection once it has itself reset 1,024 streams over the
        // connection's whole life (e.g. frames that arrive for a stream the peer cancelled and
        // h2 has forgotten). A router's connection reaches that with ordinary cancellations
        // under load, and the GOAWAY fails every agent multiplexed on it. The count has no time
        // window, so any bound is a matter of time: none. (The rapid-reset guard above, resets
        // the peer sends, stays bounded.)
        .max_local_error_reset_streams(None);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    // Owns every connection task, so connections still open after the drain period are closed
    // when this returns instead of outliving the server.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // Small request/response exchanges: do not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), make_service(peer))
            .into_owned();
        let conn = graceful.watch(conn);
        connections.spawn(async move {
            // Peers that reset or time out are routine; there is nobody to report them to.
            let _ = conn.await;
        });
        // Reap the connections that have ended so the set holds only live ones.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(options.drain) => {
            tracing::warn!(
                drain = ?options.drain,
                open = connections.len(),
                "connections still open after the drain period; closing them"
            );
        }
    }
    connections.shutdown().await;
}

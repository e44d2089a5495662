//! The router's accept loop: HTTP/1.1 and h2c like [`apollo_runtime::serve`], plus what a public
//! entry point needs and the shared loop does not have — a header-read timeout, an idle timeout, a
//! cap on header size and a cap on open connections.
//!
//! Hyper's own HTTP/1.1 header timer starts when it begins waiting for a request head, which is
//! also while a keep-alive connection sits idle between requests, so it cannot tell a slow client
//! from an idle one. Each connection is watched here instead:
//!
//! - **header read** (HTTP/1.1): from the connection's accept, or from the first byte of the next
//!   request on a kept-alive connection, until its head is complete. Past it the connection is
//!   closed.
//! - **idle** (both protocols): no request in flight for this long (HTTP/2 pings and settings do
//!   not count). The connection is shut down gracefully: HTTP/2 GOAWAY, HTTP/1.1 close.
//! - **connections**: past `max_connections` open connections a new one is closed at once, so a
//!   flood of slow clients cannot take every file descriptor.
//!
//! The body-read timeout is the proxy's (it buffers bodies, see [`crate::proxy`]).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::{ConnectionClose, Metrics};
use crate::proxy::Proxy;
use crate::PeerAddr;

/// Limits of the public listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// HTTP/1.1: longest time from the first byte of a request (or the accept) to its full head.
    pub header_read_timeout: Duration,
    /// Longest time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Most connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// Largest request head (HTTP/1.1 buffer, HTTP/2 header list), in bytes.
    pub max_header_bytes: usize,
    /// Most concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// On shutdown, how long open connections get to finish.
    pub drain: Duration,
}

/// The h2c connection preface starts so; an HTTP/1.1 request line never does.
const H2_PREFACE_START: &[u8] = b"PRI ";
/// How long a connection closed for idleness gets to close gracefully: an HTTP/2 peer must ack
/// the GOAWAY's ping first.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed accept (out of file descriptors) instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// What the watcher of one connection knows about it. Instants are milliseconds since `origin`.
struct ConnState {
    origin: Instant,
    in_flight: AtomicUsize,
    /// When the head now being read started; `u64::MAX` when none is.
    head_started: AtomicU64,
    /// When the last request finished (or the accept).
    idle_since: AtomicU64,
    /// Decided from the first bytes: HTTP/2 has no header-read timeout here.
    h2: AtomicBool,
    saw_bytes: AtomicBool,
    /// Wakes the watcher when a head starts or a request ends, so its deadline moves.
    changed: Notify,
}

const NONE: u64 = u64::MAX;

impl ConnState {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            in_flight: AtomicUsize::new(0),
            // A fresh connection is waiting for its first head.
            head_started: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            saw_bytes: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, millis: u64) -> Instant {
        self.origin + Duration::from_millis(millis)
    }

    fn on_bytes(&self, first: &[u8]) {
        if !self.saw_bytes.swap(true, Ordering::AcqRel) {
            let n = first.len().min(H2_PREFACE_START.len());
            if first[..n] == H2_PREFACE_START[..n] {
                self.h2.store(true, Ordering::Release);
                self.head_started.store(NONE, Ordering::Release);
                self.changed.notify_one();
            }
            return;
        }
        if self.in_flight.load(Ordering::Acquire) == 0
            && !self.h2.load(Ordering::Acquire)
            && self
                .head_started
                .compare_exchange(NONE, self.now(), Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(NONE, Ordering::Release);
    }

    fn request_finished(&self) {
        self.idle_since.store(self.now(), Ordering::Release);
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_one();
    }

    /// What to do now, or when to look again.
    fn verdict(&self, limits: &Limits) -> Verdict {
        let now = Instant::now();
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Verdict::LookAt(now + limits.idle_timeout);
        }
        let head = self.head_started.load(Ordering::Acquire);
        if head != NONE && !self.h2.load(Ordering::Acquire) {
            let deadline = self.at(head) + limits.header_read_timeout;
            return if now >= deadline {
                Verdict::Close(ConnectionClose::HeaderTimeout)
            } else {
                Verdict::LookAt(deadline)
            };
        }
        let deadline = self.at(self.idle_since.load(Ordering::Acquire)) + limits.idle_timeout;
        if now >= deadline {
            Verdict::Close(ConnectionClose::Idle)
        } else {
            Verdict::LookAt(deadline)
        }
    }
}

enum Verdict {
    Close(ConnectionClose),
    LookAt(Instant),
}

/// A TCP stream that tells its [`ConnState`] when bytes arrive.
struct Watched {
    stream: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            let read = &buf.filled()[before..];
            if !read.is_empty() {
                this.state.on_bytes(read);
            }
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Serves `proxy` on `listener` until `shutdown`, then stops accepting, asks open connections to
/// close and gives them `limits.drain` to finish.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(limits.max_header_bytes.max(8192))
        .header_read_timeout(None);
    builder
        .http2()
        .max_concurrent_streams(limits.max_concurrent_streams)
        // h2's rapid-reset guard (20 by default) closes the whole connection when that many
        // streams the client reset are still waiting to be accepted: with thousands of agents
        // multiplexed on one connection, a burst of client timeouts dropped all of them at once
        // (loadtest at ~30,000 agents). Higher, but still bounded.
        .max_pending_accept_reset_streams(1024)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
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
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            tracing::debug!(%peer, max = limits.max_connections, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let proxy = proxy.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            metrics.connections_open.inc();
            connection(stream, peer, &builder, proxy, &metrics, limits, shutdown).await;
            metrics.connections_open.dec();
            drop(permit);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            drain = ?limits.drain,
            open = connections.len(),
            "connections still open after the drain period; closing them"
        );
    }
    connections.shutdown().await;
}

/// Serves one connection, closing it when a limit says so.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    builder: &auto::Builder<TokioExecutor>,
    proxy: Arc<Proxy>,
    metrics: &Metrics,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let state = Arc::new(ConnState::new());
    let io = TokioIo::new(Watched {
        stream,
        state: state.clone(),
    });
    let service_state = state.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(PeerAddr(peer));
        let proxy = proxy.clone();
        let state = service_state.clone();
        state.request_started();
        async move {
            let _finished = Finished(state);
            Ok::<_, Infallible>(proxy.handle(req).await)
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let look_at = match state.verdict(&limits) {
            Verdict::LookAt(at) => at,
            Verdict::Close(_) if closing => Instant::now() + limits.drain,
            Verdict::Close(ConnectionClose::HeaderTimeout) => {
                metrics.count_close(ConnectionClose::HeaderTimeout);
                tracing::debug!(%peer, timeout = ?limits.header_read_timeout, "request head not complete in time; closing");
                return;
            }
            Verdict::Close(reason) => {
                metrics.count_close(reason);
                closing = true;
                conn.as_mut().graceful_shutdown();
                Instant::now() + IDLE_CLOSE_GRACE
            }
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            () = tokio::time::sleep_until(look_at) => {
                if closing {
                    // Graceful close did not finish within the drain period.
                    return;
                }
            }
            () = state.changed.notified() => {}
            () = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Marks a request finished when its handler returns or is dropped.
struct Finished(Arc<ConnState>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

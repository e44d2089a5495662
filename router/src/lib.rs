//! `apollo-router`: a stateless L7 reverse proxy that pins each device to one gateway replica.
//!
//! For `/v1/devices/{device}/...` it computes `slot(device)`, then `shard(slot, N)` over the gateway
//! membership read from Redis (see [`apollo_protocol::membership`]), and forwards the request there
//! over HTTP/2 cleartext (prior knowledge), so the long polls of many agents share a few upstream
//! connections. When the owner is not alive, or the connection to it fails, the request goes to a
//! deterministic fallback (every router picks the same one) and is retried there once. Only when no
//! replica is alive does it answer 503 with Retry-After.
//!
//! Several routers can run side by side: they share nothing but the membership in Redis.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod error;
pub mod listen;
pub mod membership;
pub mod metrics;
pub mod proxy;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::Args;
pub use error::Error;

/// Binds both listeners (failing at once if either address is taken), then serves until
/// `shutdown` is cancelled. In-flight requests (long polls included) are given `args.drain()` to
/// finish.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), Error> {
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: args.listen,
            source,
        })?;
    let admin_listener = TcpListener::bind(args.admin.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: args.admin.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(Error::LocalAddr)?;
    let admin_local = admin_listener.local_addr().map_err(Error::LocalAddr)?;

    let mut registry = prometheus_client::registry::Registry::with_prefix("apollo_router");
    let metrics = Arc::new(metrics::Metrics::new(&mut registry));
    let membership = membership::Membership::spawn(
        &args.redis_url,
        args.membership_refresh(),
        metrics.clone(),
        shutdown.clone(),
    )?;
    let proxy = Arc::new(proxy::Proxy::new(
        membership.clone(),
        metrics.clone(),
        args.upstream_connect_timeout(),
        args.fallback_hold(),
        args.body_read_timeout,
    ));
    let admin = admin::router(membership, Arc::new(registry));

    info!(listen = %local, admin = %admin_local, redis = %redact(&args.redis_url), "apollo-router listening");

    let admin_task = tokio::spawn(apollo_runtime::shell::admin::serve(
        admin_listener,
        admin,
        shutdown.clone(),
    ));
    listen::serve(listener, proxy, metrics, args.limits(), shutdown.clone()).await;
    let _ = admin_task.await;
    info!("apollo-router stopped");
    Ok(())
}

/// Address of the client that sent a request (inserted as a request extension).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// Hides a password in a Redis URL for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_credentials() {
        assert_eq!(super::redact("redis://:pw@h:1/"), "redis://***@h:1/");
        assert_eq!(super::redact("redis://h:1/"), "redis://h:1/");
    }
}

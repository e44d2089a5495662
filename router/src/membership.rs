//! Follows the gateway membership in Redis.
//!
//! A background task re-reads the whole membership (one Lua call: Redis' clock plus the members
//! hash; in a Redis Cluster, on the master of that hash's slot) every refresh period and publishes a new [`View`] when it changed. When Redis is
//! unreachable the last view is kept: gateways do not vanish because Redis blipped, and requests
//! to a replica that really died fail fast and go to the fallback anyway.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apollo_protocol::membership::{View, MEMBERS_KEY, READ_SCRIPT};
use apollo_runtime::redis::{Eval, RedisConnection, RedisTarget, Timeouts};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::Error;
use crate::metrics::Metrics;

/// The membership as last read.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Who is a member and who is alive.
    pub view: View,
    /// When Redis last answered (None: never since start).
    pub refreshed_at: Option<Instant>,
}

/// Handle on the membership follower.
#[derive(Clone)]
pub struct Membership {
    rx: watch::Receiver<Arc<Snapshot>>,
}

const REDIS_CALL_TIMEOUT: Duration = Duration::from_secs(1);

impl Membership {
    /// Starts following the membership in the Redis at `url` (a single Redis or a Redis Cluster,
    /// see [`apollo_runtime::redis`]). Fails only on a malformed URL; an unreachable Redis is
    /// retried in the background.
    pub fn spawn(
        url: &str,
        refresh: Duration,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        let target = RedisTarget::parse(url).map_err(Error::RedisUrl)?;
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        tokio::spawn(follow(target, refresh, tx, metrics, shutdown));
        Ok(Self { rx })
    }

    /// A fixed membership, for tests of the proxy.
    pub fn fixed(view: View) -> Self {
        let (_tx, rx) = watch::channel(Arc::new(Snapshot {
            view,
            refreshed_at: Some(Instant::now()),
        }));
        Self { rx }
    }

    /// The latest snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }
}

async fn follow(
    target: RedisTarget,
    refresh: Duration,
    tx: watch::Sender<Arc<Snapshot>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut script = Eval::new(READ_SCRIPT);
    script.key(MEMBERS_KEY);
    // A fresh connection after every failure (it connects on first use).
    let mut conn: Option<RedisConnection> = None;
    let mut failing_since: Option<Instant> = None;
    let mut ticker = tokio::time::interval(refresh);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if conn.is_none() {
            let timeouts = Timeouts {
                connect: REDIS_CALL_TIMEOUT,
                response: REDIS_CALL_TIMEOUT,
            };
            match target.connect_lazy(timeouts) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    note_failure(&mut failing_since, &metrics, &e.to_string());
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let reply = tokio::time::timeout(REDIS_CALL_TIMEOUT, script.invoke::<Vec<String>>(c)).await;
        let fields = match reply {
            Ok(Ok(fields)) => fields,
            Ok(Err(e)) => {
                conn = None;
                note_failure(&mut failing_since, &metrics, &e.to_string());
                continue;
            }
            Err(_) => {
                conn = None;
                note_failure(&mut failing_since, &metrics, "membership read timed out");
                continue;
            }
        };
        if let Some(since) = failing_since.take() {
            info!(after = ?since.elapsed(), "membership readable again");
        }
        let Some((now, rest)) = fields.split_first() else {
            continue;
        };
        let now_ms = now.parse::<u64>().unwrap_or_default();
        let view = View::from_registrations(
            rest.chunks_exact(2)
                .map(|kv| (kv[0].as_str(), kv[1].as_str())),
            now_ms,
        );
        let previous = tx.borrow().view.clone();
        if previous != view {
            metrics.membership_changes.inc();
            metrics.replicas.set(i64::from(view.replicas));
            metrics.alive.set(view.alive.len() as i64);
            info!(
                replicas = view.replicas,
                alive = ?view.alive.keys().collect::<Vec<_>>(),
                members = ?view.members,
                "gateway membership changed"
            );
        }
        tx.send_replace(Arc::new(Snapshot {
            view,
            refreshed_at: Some(Instant::now()),
        }));
    }
}

fn note_failure(failing_since: &mut Option<Instant>, metrics: &Metrics, error: &str) {
    metrics.membership_errors.inc();
    if failing_since.is_none() {
        *failing_since = Some(Instant::now());
        warn!(%error, "cannot read the gateway membership from Redis; keeping the last view");
    }
}

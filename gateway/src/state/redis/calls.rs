//! How the Redis store calls Redis: every call bounded in time, scripts as `EVALSHA` (or `EVAL`
//! once where a node lacks them), deciding scripts pipelined with `WAIT` when the URL asks for it.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use apollo_runtime::redis::{is_noscript, Eval, RedisConnection, WaitReplicas};
use redis::FromRedisValue;

use super::{RedisStore, CALL_TIMEOUT};
use crate::error::Error;

/// Least time between two warnings about writes fewer replicas acknowledged than asked.
const UNREPLICATED_WARN_EVERY_MS: i64 = 10_000;

/// Deciding writes fewer replicas acknowledged than `wait-replicas` asked for.
#[derive(Default)]
pub(super) struct Unreplicated {
    pub(super) count: prometheus_client::metrics::counter::Counter,
    pub(super) warned_ms: AtomicI64,
}

impl RedisStore {
    /// Runs a script call in one round trip: with `decides` and `wait-replicas`, pipelined with
    /// `WAIT` (see the module documentation); `EVAL` once if the node lacks the script.
    pub(super) async fn eval<T: FromRedisValue>(
        &self,
        op: &'static str,
        call: &Eval,
        decides: bool,
    ) -> Result<T, Error> {
        let wait = self.wait.filter(|_| decides);
        let mut connection = self.connection.clone();
        match self
            .eval_once(op, &mut connection, call.cmd(true), wait)
            .await
        {
            Err(Error::RedisCommand { source, .. }) if is_noscript(&source) => {
                self.eval_once(op, &mut connection, call.cmd(false), wait)
                    .await
            }
            other => other,
        }
    }

    async fn eval_once<T: FromRedisValue>(
        &self,
        op: &'static str,
        connection: &mut RedisConnection,
        cmd: redis::Cmd,
        wait: Option<WaitReplicas>,
    ) -> Result<T, Error> {
        let Some(wait) = wait else {
            return bounded(op, CALL_TIMEOUT, cmd.query_async(connection)).await;
        };
        let mut pipe = redis::pipe();
        pipe.add_command(cmd)
            .cmd("WAIT")
            .arg(wait.replicas)
            .arg(u64::try_from(wait.timeout.as_millis()).unwrap_or(u64::MAX));
        let (value, acknowledged): (T, u32) = bounded(
            op,
            CALL_TIMEOUT + wait.timeout,
            pipe.query_async(connection),
        )
        .await?;
        if acknowledged < wait.replicas {
            self.note_unreplicated(op, acknowledged, wait);
        }
        Ok(value)
    }

    fn note_unreplicated(&self, op: &'static str, acknowledged: u32, wait: WaitReplicas) {
        let count = self.unreplicated.count.inc() + 1;
        let now = crate::state::wall_clock_ms();
        let last = self.unreplicated.warned_ms.load(Ordering::Relaxed);
        if now - last >= UNREPLICATED_WARN_EVERY_MS
            && self
                .unreplicated
                .warned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                op,
                acknowledged,
                asked = wait.replicas,
                timeout = ?wait.timeout,
                total = count,
                "a state-store decision was acknowledged by fewer Redis replicas than \
                 wait-replicas asks; an unplanned failover now could lose it (it would be \
                 decided again)"
            );
        }
    }
}

/// `call`, bounded by `within`, its errors as the store's.
pub(super) async fn bounded<T>(
    op: &'static str,
    within: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout(within, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(Error::RedisCommand { op, source }),
        Err(_) => Err(Error::RedisTimeout { op }),
    }
}

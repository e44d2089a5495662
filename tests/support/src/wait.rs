use std::future::Future;
use std::time::{Duration, Instant};

const POLL_EVERY: Duration = Duration::from_millis(25);

/// Polls `condition` until it returns true; panics naming `what` if `deadline` passes first.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(deadline, what, || {
        let fut = condition();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `probe` until it returns `Some(value)` and returns that value; panics naming `what` if
/// `deadline` passes first.
pub async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let calls = AtomicU32::new(0);
        let n = wait_for(Duration::from_secs(5), "third call", || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move { (n >= 3).then_some(n) }
        })
        .await;
        assert_eq!(n, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after 100ms waiting for: never")]
    async fn panics_with_what_after_the_deadline() {
        wait_until(Duration::from_millis(100), "never", || async { false }).await;
    }
}

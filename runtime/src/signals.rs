//! The shutdown signal.

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on the first SIGTERM or SIGINT: the process's one shutdown source.
///
/// The handlers are installed before this returns, so a signal that arrives right after start-up
/// is not lost; failing to install them is a start-up error for the caller to report, not a
/// process that silently ignores SIGTERM. Must be called inside a Tokio runtime. The task ends on
/// its own when `shutdown` is cancelled some other way.
pub fn cancel_on_signals(shutdown: CancellationToken) -> std::io::Result<JoinHandle<()>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
            () = shutdown.cancelled() => return,
        };
        tracing::info!(signal = name, "shutting down");
        shutdown.cancel();
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn sigterm_cancels_the_token_once_and_the_task_ends() {
        let shutdown = CancellationToken::new();
        let task = cancel_on_signals(shutdown.clone()).expect("handlers");
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).expect("raise");
        tokio::time::timeout(Duration::from_secs(5), shutdown.cancelled())
            .await
            .expect("SIGTERM cancels the token");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("task ends")
            .expect("task did not panic");
    }

    #[tokio::test]
    async fn task_ends_when_shutdown_comes_from_elsewhere() {
        let shutdown = CancellationToken::new();
        let task = cancel_on_signals(shutdown.clone()).expect("handlers");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("task ends")
            .expect("task did not panic");
    }
}

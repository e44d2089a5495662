//! The agent's two loops: a desired-state long poll and a report loop with its own heartbeat
//! timer. They run concurrently inside one future (no spawned tasks), so an [`Agent`] costs one
//! task in whatever runtime drives it, and the loadtest harness can run thousands of them.

use std::sync::Arc;
use std::time::Duration;

use apollo_protocol::wire::{DesiredDocument, ObjectRef, Observation, Report, ReportAck};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::backoff::{heartbeat_delay, Backoff};
use crate::client::{DesiredResponse, GatewayClient};
use crate::config::AgentConfig;
use crate::desired::{
    all_observations, changed_observations, heartbeat_interval_from_gateway, next_poll_delay,
    record_acknowledged, retained_etag, Acknowledged, PollResult,
};
use crate::metrics::AgentMetrics;
use crate::split::report_ranges;
use crate::AgentError;

type SharedDocument = Option<Arc<DesiredDocument>>;

/// One device agent.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    gateway: GatewayClient,
    metrics: Arc<AgentMetrics>,
    /// What the last warning about ignored observations named (sorted `namespace/name`).
    last_ignored: std::sync::Mutex<Vec<String>>,
}

/// Sleep for `duration` unless cancelled first; returns false when cancelled.
async fn sleep_or_cancel(duration: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        () = tokio::time::sleep(duration) => true,
    }
}

/// Run `future` unless cancelled first; `None` when cancelled (the request is dropped mid-flight).
async fn unless_cancelled<T>(
    cancel: &CancellationToken,
    future: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        () = cancel.cancelled() => None,
        value = future => Some(value),
    }
}

/// Why the report loop is about to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    NewDocument,
    Heartbeat,
}

impl Agent {
    /// An agent using `http` (shared by as many agents as the caller likes) and counting into
    /// `metrics` (likewise shareable).
    pub fn new(
        config: AgentConfig,
        http: reqwest::Client,
        metrics: Arc<AgentMetrics>,
    ) -> Result<Self, AgentError> {
        let gateway = GatewayClient::new(
            http,
            &config.gateway_url,
            &config.device_name,
            config.device_token.as_deref(),
            config.request_timeout,
            metrics.clone(),
        )?
        .with_traceparent_source(config.traceparent_source);
        Ok(Self {
            config,
            gateway,
            metrics,
            last_ignored: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The configuration this agent runs with.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// Run until `cancel` fires; every wait and request ends as soon as it does.
    pub async fn run(&self, cancel: CancellationToken) {
        let span = tracing::info_span!("agent", device = %self.config.device_name);
        async {
            if self.config.device_token.is_none() {
                warn!("no device token configured; only a gateway run with --insecure-no-auth will accept this agent");
            }
            let (documents, latest) = watch::channel::<SharedDocument>(None);
            tokio::join!(
                self.poll_loop(documents, &cancel),
                self.report_loop(latest, &cancel)
            );
            debug!("agent stopped");
        }
        .instrument(span)
        .await;
    }

    async fn poll_loop(
        &self,
        documents: watch::Sender<SharedDocument>,
        cancel: &CancellationToken,
    ) {
        let mut etag: Option<String> = None;
        let mut current: SharedDocument = None;
        let mut backoff = Backoff::new(self.config.backoff);
        loop {
            let started = Instant::now();
            // Boxed: `unless_cancelled` would otherwise hold the request's state machine twice
            // (its argument and its select), in every agent, in flight or not.
            let fetch = Box::pin(
                self.gateway
                    .fetch_desired(etag.as_deref(), self.config.poll_wait),
            );
            let Some(result) = unless_cancelled(cancel, fetch).await else {
                return;
            };
            let delay = match result {
                Ok(response) => {
                    if backoff.reset() {
                        info!("desired-state polling recovered");
                    }
                    let (received_etag, document) = match response {
                        DesiredResponse::NotModified { etag } => (etag, None),
                        DesiredResponse::Document { document, etag } => (etag, Some(document)),
                    };
                    etag = retained_etag(etag, received_etag.as_deref());
                    let poll_result = match document {
                        Some(document) if current.as_deref() != Some(&document) => {
                            info!(
                                etag = etag.as_deref().unwrap_or(""),
                                items = document.items.len(),
                                heartbeat_interval_seconds = document.heartbeat_interval_seconds,
                                "new desired document"
                            );
                            self.metrics.record_new_document();
                            let document = Arc::new(document);
                            current = Some(document.clone());
                            // Only fails when the report loop is gone, i.e. we are shutting down.
                            let _ = documents.send(Some(document));
                            PollResult::Changed
                        }
                        _ => PollResult::Unchanged,
                    };
                    next_poll_delay(
                        poll_result,
                        started.elapsed(),
                        self.config.min_poll_interval,
                    )
                }
                Err(error) => self.backoff_after("desired-state poll", &mut backoff, &error),
            };
            if !sleep_or_cancel(delay, cancel).await {
                return;
            }
        }
    }

    async fn report_loop(
        &self,
        mut latest: watch::Receiver<SharedDocument>,
        cancel: &CancellationToken,
    ) {
        let mut backoff = Backoff::new(self.config.backoff);
        let mut interval = self.config.initial_heartbeat_interval;

        // Connect first: it is the cheapest way to tell the gateway we are alive before any
        // document has arrived.
        loop {
            // Boxed, as the report below: a request is in flight for milliseconds out of every
            // heartbeat interval, and inline it would size every idle agent's state machine.
            let connect = Box::pin(self.gateway.connect(&self.config.agent_version));
            let Some(result) = unless_cancelled(cancel, connect).await else {
                return;
            };
            match result {
                Ok(ack) => {
                    backoff.reset();
                    interval =
                        heartbeat_interval_from_gateway(ack.heartbeat_interval_seconds, interval);
                    info!(
                        heartbeat_interval_seconds = interval.as_secs(),
                        "connected to gateway"
                    );
                    break;
                }
                Err(error) => {
                    let delay = self.backoff_after("connect", &mut backoff, &error);
                    if !sleep_or_cancel(delay, cancel).await {
                        return;
                    }
                }
            }
        }

        let mut acknowledged = Acknowledged::new();
        let mut next_heartbeat = Instant::now() + heartbeat_delay(interval, &mut rand::rng());
        loop {
            let trigger = tokio::select! {
                () = cancel.cancelled() => return,
                changed = latest.changed() => match changed {
                    Ok(()) => Trigger::NewDocument,
                    // The poll loop only ends on cancellation.
                    Err(_) => return,
                },
                () = tokio::time::sleep_until(next_heartbeat) => Trigger::Heartbeat,
            };
            let document = latest.borrow_and_update().clone();
            if let Some(d) = &document {
                let announced =
                    heartbeat_interval_from_gateway(d.heartbeat_interval_seconds, interval);
                if announced != interval {
                    interval = announced;
                    // A shorter interval must take effect now, not after the old one ran out.
                    next_heartbeat = next_heartbeat
                        .min(Instant::now() + heartbeat_delay(interval, &mut rand::rng()));
                }
            }
            let observations = match trigger {
                Trigger::NewDocument => changed_observations(document.as_deref(), &acknowledged),
                Trigger::Heartbeat => all_observations(document.as_deref()),
            };
            if trigger == Trigger::NewDocument {
                // Removed items need no report, but must be forgotten so a return is reported.
                record_acknowledged(&mut acknowledged, &[], document.as_deref());
                if observations.is_empty() {
                    continue;
                }
            }
            let Some(ack) = self
                .report_until_acknowledged(
                    trigger,
                    observations,
                    &mut latest,
                    &mut acknowledged,
                    &mut backoff,
                    cancel,
                )
                .await
            else {
                return;
            };
            interval = heartbeat_interval_from_gateway(ack.heartbeat_interval_seconds, interval);
            next_heartbeat = Instant::now() + heartbeat_delay(interval, &mut rand::rng());
        }
    }

    /// Send a report, retrying with backoff until the gateway acknowledges it. A retry carries
    /// every current observation: after a failure the agent cannot know what was recorded.
    /// Returns `None` when cancelled.
    async fn report_until_acknowledged(
        &self,
        trigger: Trigger,
        mut observations: Vec<Observation>,
        latest: &mut watch::Receiver<SharedDocument>,
        acknowledged: &mut Acknowledged,
        backoff: &mut Backoff,
        cancel: &CancellationToken,
    ) -> Option<ReportAck> {
        let mut heartbeat = trigger == Trigger::Heartbeat;
        loop {
            let send = Box::pin(self.send_report(&observations, heartbeat));
            let result = unless_cancelled(cancel, send).await?;
            match result {
                Ok(ack) => {
                    if backoff.reset() {
                        info!("connected to gateway");
                    }
                    if trigger == Trigger::NewDocument || !observations.is_empty() {
                        debug!(
                            observations = observations.len(),
                            heartbeat, "report acknowledged"
                        );
                    }
                    let document = latest.borrow().clone();
                    let delivered = self.without_ignored(&observations, &ack.ignored);
                    record_acknowledged(acknowledged, &delivered, document.as_deref());
                    self.metrics.record_observations_reported(delivered.len());
                    return Some(ack);
                }
                Err(error) => {
                    let delay = self.backoff_after("report", backoff, &error);
                    if !sleep_or_cancel(delay, cancel).await {
                        return None;
                    }
                    observations = all_observations(latest.borrow_and_update().as_deref());
                    heartbeat = true;
                }
            }
        }
    }

    /// One report, split so no request exceeds the gateway's limits (observations and encoded
    /// bytes, see [`crate::split`]). The acknowledgement is the last request's, with the
    /// `ignored` of every request.
    async fn send_report(
        &self,
        observations: &[Observation],
        heartbeat: bool,
    ) -> Result<ReportAck, AgentError> {
        let mut report = Report {
            agent_version: self.config.agent_version.clone(),
            timestamp: jiff::Timestamp::now().to_string(),
            heartbeat,
            observations: Vec::new(),
        };
        let mut ignored = Vec::new();
        let mut last = None;
        for range in report_ranges(&report, observations) {
            report.observations = observations[range].to_vec();
            let ack = self.gateway.report(&report).await?;
            ignored.extend(ack.ignored.iter().cloned());
            last = Some(ack);
        }
        let mut ack = last.unwrap_or(ReportAck {
            ack: true,
            heartbeat_interval_seconds: 0,
            ignored: Vec::new(),
        });
        ack.ignored = ignored;
        Ok(ack)
    }

    /// The observations the gateway recorded: all sent but those its ack lists as `ignored`. The
    /// gateway ignores an observation when it does not know the DeviceProcess (deleted, or its
    /// cache is behind the one that served the document), so nothing was recorded for it: it
    /// stays unacknowledged and goes again with the next report (the next changed document, or
    /// the next heartbeat, which carries everything) instead of being taken as delivered. Logged
    /// at warn whenever the ignored set changes, at debug while it stays the same.
    fn without_ignored(&self, sent: &[Observation], ignored: &[ObjectRef]) -> Vec<Observation> {
        if ignored.is_empty() {
            self.last_ignored
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            return sent.to_vec();
        }
        let mut names: Vec<String> = ignored
            .iter()
            .map(|o| format!("{}/{}", o.namespace, o.name))
            .collect();
        names.sort();
        names.dedup();
        let mut last = self.last_ignored.lock().unwrap_or_else(|e| e.into_inner());
        if *last != names {
            warn!(
                ignored = %names.join(", "),
                count = names.len(),
                "the gateway ignored observations of DeviceProcesses it does not know; \
                 they stay unacknowledged and go again with the next report"
            );
            *last = names;
        } else {
            debug!(
                count = names.len(),
                "the gateway still ignores observations"
            );
        }
        sent.iter()
            .filter(|o| {
                !ignored
                    .iter()
                    .any(|i| i.namespace == o.namespace && i.name == o.name)
            })
            .cloned()
            .collect()
    }

    /// Count a failure, log it when it starts a failing streak (not on every retry), and return
    /// how long to wait.
    fn backoff_after(&self, step: &str, backoff: &mut Backoff, error: &AgentError) -> Duration {
        let retry_after = error.retry_after();
        let delay = backoff.next_delay(retry_after);
        self.metrics
            .record_backoff(retry_after.is_some_and(|asked| delay >= asked));
        if backoff.failures() == 1 {
            warn!(
                error = %error.chain(),
                delay_ms = delay.as_millis() as u64,
                "{step} failed; backing off"
            );
        } else {
            debug!(
                error = %error.chain(),
                failures = backoff.failures(),
                delay_ms = delay.as_millis() as u64,
                "{step} still failing"
            );
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loadtest holds 100,000 agents' `run` futures: every byte of the state machine is
    /// 100 KB there. The requests are boxed (allocated while in flight); inline they made it
    /// 6,728 bytes, boxed 1,320 (plus the 1,360 of the long poll in flight).
    #[test]
    fn the_run_future_is_small() {
        let config = AgentConfig::new("d", "http://127.0.0.1:1".parse().expect("url"));
        let agent = Agent::new(
            config,
            reqwest::Client::new(),
            Arc::new(AgentMetrics::default()),
        )
        .expect("agent");
        let run = agent.run(CancellationToken::new());
        let size = std::mem::size_of_val(&run);
        assert!(size <= 2048, "Agent::run's future is {size} bytes");
    }
}

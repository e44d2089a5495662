//! One object's Kubernetes calls: the status patch (projected from the shared state after the
//! write budget's wait, retried after a 409 with a fresh read) and Event creation, each bounded
//! by the call timeout and counted.

/// Attempts of one status write (the first plus retries after 409 or errors).
use std::sync::Arc;

use apollo_crds::{DeviceProcess, DeviceProcessStatus};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use tracing::Instrument;

use super::retry::backoff;
use super::{build_event, now_rfc3339, StatusWriter, WriteResult, FIELD_MANAGER};
use crate::error::Error;
use crate::metrics::KubeWriteLabels;
use crate::model::{CachedProcess, ObjectKey};
use crate::state::StateStore;
use crate::status::projection::{needs_write, project, EventSpec};

/// Attempts of one status write (the first plus retries after 409 or errors).
const PATCH_ATTEMPTS: u32 = 6;
/// Attempts of one Event creation.
const EVENT_ATTEMPTS: u32 = 4;

impl StatusWriter {
    pub(super) async fn write_status(
        &self,
        mut process: Arc<CachedProcess>,
        reason: &'static str,
        urgent: bool,
    ) -> WriteResult {
        // Already right (a transition undone before its turn): no write, no budget spent.
        match self.projection(&process).await {
            Ok(None) => return WriteResult::Unchanged,
            Ok(Some(_)) => {}
            Err(error) => return WriteResult::Failed(error),
        }
        let mut attempt = 0;
        loop {
            self.acquire(urgent).await;
            // The shared state is read again after the wait and before every attempt: a report
            // recorded meanwhile (by any replica) must not be overwritten by what was read before.
            let desired = match self.projection(&process).await {
                Ok(None) => return WriteResult::Unchanged,
                Ok(Some(desired)) => desired,
                Err(error) => return WriteResult::Failed(error),
            };
            let error = match self.patch_status(&process, &desired).await {
                Ok(written) => {
                    self.count_kube("status_patch", reason, "ok");
                    self.cache.observe_write(&written);
                    return WriteResult::Written;
                }
                Err(error) if error.is_not_found() => {
                    self.count_kube("status_patch", reason, "not_found");
                    return WriteResult::Gone;
                }
                Err(error) => error,
            };
            let conflict = error.is_conflict();
            self.count_kube("status_patch", reason, outcome_label(&error));
            attempt += 1;
            // Only a conflict is worth another immediate try; a refusal or throttling goes back
            // to the queue with the object's own back-off.
            if !conflict || attempt >= PATCH_ATTEMPTS {
                return WriteResult::Failed(error);
            }
            tokio::time::sleep(backoff(attempt)).await;
            // Someone else wrote the object: re-read it and project again.
            match self.get(&process.key).await {
                Ok(fresh) => {
                    self.cache.observe_write(&fresh);
                    match CachedProcess::from_object(&fresh) {
                        Some(fresh) if fresh.device == process.device => process = Arc::new(fresh),
                        // Rebound to another device: its record is not the one we read.
                        _ => return WriteResult::Failed(error),
                    }
                }
                Err(e) if e.is_not_found() => return WriteResult::Gone,
                Err(e) => tracing::debug!(error = %e, "re-read after conflict failed"),
            }
        }
    }

    pub(super) async fn acquire(&self, urgent: bool) {
        if urgent {
            self.limiter.acquire_urgent().await;
        } else {
            self.limiter.acquire().await;
        }
    }

    /// The status `process` should show now, from the shared state; None when it already does.
    async fn projection(
        &self,
        process: &CachedProcess,
    ) -> Result<Option<DeviceProcessStatus>, Error> {
        let record = self.store.device(&process.device).await?;
        let observed = record.observed.get(&process.key).map(String::as_str);
        let desired = project(process, record.connection, observed, &now_rfc3339());
        Ok(needs_write(process.status.as_ref(), &desired).then_some(desired))
    }

    fn count_kube(&self, kind: &'static str, reason: &'static str, outcome: &'static str) {
        self.metrics
            .kube_writes
            .get_or_create(&KubeWriteLabels {
                kind,
                reason,
                outcome,
            })
            .inc();
    }

    async fn patch_status(
        &self,
        process: &CachedProcess,
        status: &DeviceProcessStatus,
    ) -> Result<DeviceProcess, Error> {
        let api: Api<DeviceProcess> = Api::namespaced(self.client.clone(), &process.key.namespace);
        let mut body = serde_json::json!({ "status": status });
        if let Some(rv) = &process.resource_version {
            // A merge patch carrying resourceVersion is an optimistic lock: 409 if it moved.
            body["metadata"] = serde_json::json!({ "resourceVersion": rv });
        }
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        self.bounded(
            "patch status",
            &process.key,
            api.patch_status(&process.key.name, &params, &Patch::Merge(&body)),
        )
        .await
    }

    async fn get(&self, key: &ObjectKey) -> Result<DeviceProcess, Error> {
        let api: Api<DeviceProcess> = Api::namespaced(self.client.clone(), &key.namespace);
        self.bounded("get", key, api.get(&key.name)).await
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        key: &ObjectKey,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Error> {
        let span = tracing::info_span!("kube.request", otel.kind = "client", op, object = %key);
        match tokio::time::timeout(self.config.call_timeout, call)
            .instrument(span)
            .await
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(Error::KubeCall {
                op,
                object: key.to_string(),
                source: Box::new(source),
            }),
            Err(_) => Err(Error::KubeTimeout {
                op,
                object: key.to_string(),
            }),
        }
    }

    /// Publishes one Event, retrying transient failures a few times. An Event that already
    /// exists (409: a replay, or an earlier attempt that timed out on our side) counts as
    /// published; one the apiserver refuses (400/422, or 403) is given up with a warning, since
    /// sending it again cannot succeed and must not hold the status back.
    pub(super) async fn publish_event(
        &self,
        process: &CachedProcess,
        spec: &EventSpec,
        unique_suffix: Option<&str>,
        urgent: bool,
    ) -> Result<(), Error> {
        let key = &process.key;
        let event = build_event(process, spec, &self.config.instance, unique_suffix);
        let api: Api<Event> = Api::namespaced(self.client.clone(), &key.namespace);
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.acquire(urgent).await;
            let error = match self
                .bounded(
                    "create event",
                    key,
                    api.create(&PostParams::default(), &event),
                )
                .await
            {
                Ok(_) => {
                    self.count_kube("event", spec.reason, "ok");
                    return Ok(());
                }
                Err(error) if error.is_conflict() => {
                    self.count_kube("event", spec.reason, "exists");
                    return Ok(());
                }
                Err(error) => error,
            };
            self.count_kube("event", spec.reason, outcome_label(&error));
            if error.is_invalid() || error.is_forbidden() {
                tracing::warn!(object = %key, reason = spec.reason, %error, "Event refused; not published");
                return Ok(());
            }
            if attempt >= EVENT_ATTEMPTS || error.is_throttled() {
                return Err(error);
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
    }
}

fn outcome_label(error: &Error) -> &'static str {
    match error {
        e if e.is_conflict() => "conflict",
        e if e.is_not_found() => "not_found",
        e if e.is_invalid() => "invalid",
        Error::KubeTimeout { .. } => "timeout",
        _ => "error",
    }
}

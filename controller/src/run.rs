//! Wiring: client, watch caches, controller, leader election, admin endpoints and shutdown.

use std::collections::BTreeSet;
use std::sync::Arc;

use apollo_crds::{DeviceProcess, DeviceProcessDeployment, NetworkSwitch, LABEL_DEPLOYMENT};
use futures::{Stream, StreamExt, TryStreamExt};
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::events::EventRecorder;
use crate::lease::{Elector, Leadership, LeaseConfig};
use crate::metrics::Metrics;
use crate::reconcile::{error_policy, reconcile, Context, ReconcileConfig};
use crate::selector::Selector;
use crate::{admin, Args, Error};

/// Name under which Events are reported.
pub const CONTROLLER_NAME: &str = "apollo-controller";

/// Identity for the Lease: `$POD_NAME` or the hostname, plus a per-process suffix.
pub fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "apollo-controller".to_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{host}_{:x}{:08x}", std::process::id(), nanos)
}

async fn client(args: &Args) -> Result<Client, Error> {
    let config = args
        .kube
        .config()
        .await
        .map_err(|e| Error::LoadConfig(e.to_string()))?;
    Client::try_from(config).map_err(Error::BuildClient)
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Deployments a switch event concerns: those in its namespace whose selector matches it now, and
/// those that still have a child on it (the switch may just have stopped matching or been deleted).
pub fn deployments_for_switch(
    switch: &NetworkSwitch,
    deployments: &Store<DeviceProcessDeployment>,
    children: &Store<DeviceProcess>,
) -> Vec<ObjectRef<DeviceProcessDeployment>> {
    let Some(namespace) = switch.namespace() else {
        return Vec::new();
    };
    let device = switch.name_any();
    let mut names = BTreeSet::new();
    for deployment in deployments.state() {
        if deployment.namespace().as_deref() == Some(namespace.as_str())
            && Selector::new(&deployment.spec.selector)
                .is_ok_and(|selector| selector.matches(switch.labels()))
        {
            names.insert(deployment.name_any());
        }
    }
    for child in children.state() {
        if child.namespace().as_deref() == Some(namespace.as_str())
            && child.spec.device_ref.name == device
        {
            for owner in child.owner_references() {
                if owner.controller == Some(true) && owner.kind == "DeviceProcessDeployment" {
                    names.insert(owner.name.clone());
                }
            }
        }
    }
    names
        .into_iter()
        .map(|name| ObjectRef::new(&name).within(&namespace))
        .collect()
}

/// Watcher-stream hook that reports the first complete list (`InitDone`) of a cache.
///
/// Readiness is taken from the event stream rather than `Store::wait_until_ready`: that future
/// keeps a single waker per store, and the controller's runner already waits on the deployment
/// store, so a second waiter could silently steal (or lose) the wake-up.
fn report_sync<K>(synced: watch::Sender<bool>) -> impl FnMut(&watcher::Event<K>) {
    move |event| {
        if matches!(event, watcher::Event::InitDone) {
            synced.send_replace(true);
        }
    }
}

async fn wait_true(mut flag: watch::Receiver<bool>) -> Result<(), watch::error::RecvError> {
    flag.wait_for(|synced| *synced).await.map(|_| ())
}

/// Watcher-stream hook that forgets what the controller remembers about deleted deployments: on
/// a deletion, and after each (re)list whatever the cache no longer holds (a deletion the watch
/// missed while it was down).
fn forget_deleted(
    context: Arc<Context>,
    deployments: Store<DeviceProcessDeployment>,
) -> impl FnMut(&watcher::Event<DeviceProcessDeployment>) {
    move |event| match event {
        watcher::Event::Delete(gone) => {
            context.forget(&gone.namespace().unwrap_or_default(), &gone.name_any());
        }
        watcher::Event::InitDone => {
            let existing = deployments
                .state()
                .iter()
                .map(|d| (d.namespace().unwrap_or_default(), d.name_any()))
                .collect();
            context.retain(&existing);
        }
        _ => {}
    }
}

/// After each relist, a `Delete` for every object the cache held before it and holds no more.
///
/// kube's watcher, unlike client-go's informer (which hands out `DeletedFinalStateUnknown`),
/// reports nothing for an object deleted while its watch was down: the relist just leaves it out,
/// so nothing would wake the owner of a child deleted by hand during an apiserver restart, or the
/// deployments of a switch deleted then, before the resync. Goes right after the reflector, which
/// swaps the relisted cache in at `InitDone` (at `Init` the cache is still the old one).
fn vanished_on_relist<K, E>(
    events: impl Stream<Item = Result<watcher::Event<K>, E>>,
    cache: Store<K>,
) -> impl Stream<Item = Result<watcher::Event<K>, E>>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let mut before: Option<Vec<Arc<K>>> = None;
    events.flat_map(move |event| {
        let mut vanished = Vec::new();
        match &event {
            Ok(watcher::Event::Init) => before = Some(cache.state()),
            Ok(watcher::Event::InitDone) => {
                for old in before.take().unwrap_or_default() {
                    if cache.get(&ObjectRef::from_obj(old.as_ref())).is_none() {
                        vanished.push(Ok(watcher::Event::Delete(K::clone(&old))));
                    }
                }
                if !vanished.is_empty() {
                    tracing::info!(
                        kind = %K::kind(&()),
                        count = vanished.len(),
                        "objects deleted while the watch was down"
                    );
                }
            }
            _ => {}
        }
        futures::stream::iter(std::iter::once(event).chain(vanished))
    })
}

/// Watcher-stream hook on the children's cache: lowers the expectations as the watch shows our
/// writes (see [`crate::expectations::Expectations::observe`]).
fn observe_children(context: Arc<Context>) -> impl FnMut(&watcher::Event<DeviceProcess>) {
    move |event| {
        if let watcher::Event::Apply(child) | watcher::Event::Delete(child) = event {
            tracing::debug!(
                event = if matches!(event, watcher::Event::Apply(_)) { "apply" } else { "delete" },
                child = %child.name_any(),
                namespace = child.namespace().unwrap_or_default(),
                resource_version = child.resource_version().unwrap_or_default(),
                "child watch event"
            );
        }
        context.expectations.observe(event);
    }
}

/// One item each time leadership is gained.
fn leadership_gained(mut changes: watch::Receiver<bool>) -> impl Stream<Item = ()> + Send {
    changes.mark_unchanged();
    futures::stream::unfold(changes, |mut changes| async move {
        loop {
            changes.changed().await.ok()?;
            if *changes.borrow_and_update() {
                return Some(((), changes));
            }
        }
    })
}

/// Run the controller until `shutdown` is cancelled; then finish in-flight reconciles, release the
/// lease and stop serving.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<(), Error> {
    let client = client(&args).await?;
    let namespace = args.namespace.as_deref();
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let lease_namespace = args
        .lease_namespace
        .clone()
        .or_else(|| args.namespace.clone())
        .unwrap_or_else(|| client.default_namespace().to_owned());

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let registry = Arc::new(registry);
    let leadership = Leadership::new();

    let (ready_tx, ready_rx) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(args.admin.listen)
        .await
        .map_err(|source| Error::BindAdmin {
            addr: args.admin.listen,
            source,
        })?;
    tracing::info!(addr = %args.admin.listen, "admin endpoints listening");
    let admin_server = tokio::spawn(apollo_runtime::shell::admin::serve(
        listener,
        admin::router(registry.clone(), ready_rx),
        shutdown.clone(),
    ));

    // Each cache reports its first complete list on its own channel; /readyz waits for all three.
    let (deployments_synced, deployments_synced_rx) = watch::channel(false);
    let (switches_synced, switches_synced_rx) = watch::channel(false);
    let (children_synced, children_synced_rx) = watch::channel(false);

    let (deployment_store, deployment_writer) = reflector::store::<DeviceProcessDeployment>();
    let (switch_store, switch_writer) = reflector::store::<NetworkSwitch>();
    let (child_store, child_writer) = reflector::store::<DeviceProcess>();
    let recorder = EventRecorder::new(client.clone(), CONTROLLER_NAME, &identity);
    let context = Arc::new(Context::new(
        client.clone(),
        switch_store.clone(),
        child_store.clone(),
        leadership.clone(),
        recorder,
        metrics.clone(),
        ReconcileConfig {
            resync_period: args.resync_period,
            backoff_base: args.backoff_base,
            backoff_max: args.backoff_max,
            api_timeout: args.api_timeout,
            agent_count_interval: args.agent_count_interval,
        },
    ));
    let forget_deleted = forget_deleted(context.clone(), deployment_store.clone());

    let deployment_events = reflector::reflector(
        deployment_writer,
        watcher(api(&client, namespace), watcher::Config::default()),
    )
    .inspect_ok(report_sync(deployments_synced))
    .inspect_ok(forget_deleted)
    .default_backoff()
    .applied_objects();
    let switch_events = vanished_on_relist(
        reflector::reflector(
            switch_writer,
            watcher(api(&client, namespace), watcher::Config::default()),
        ),
        switch_store.clone(),
    )
    .inspect_ok(report_sync(switches_synced))
    .default_backoff()
    .touched_objects();
    // Only our children: the label is set on every DeviceProcess a deployment creates.
    let child_events = vanished_on_relist(
        reflector::reflector(
            child_writer,
            watcher(
                api(&client, namespace),
                watcher::Config::default().labels(LABEL_DEPLOYMENT),
            ),
        ),
        child_store.clone(),
    )
    .inspect_ok(report_sync(children_synced))
    .inspect_ok(observe_children(context.clone()))
    .default_backoff()
    .touched_objects();

    let (mapper_deployments, mapper_children) = (deployment_store.clone(), child_store.clone());
    let controller = Controller::for_stream(deployment_events, deployment_store)
        .owns_stream(child_events)
        .watches_stream(switch_events, move |switch: NetworkSwitch| {
            deployments_for_switch(&switch, &mapper_deployments, &mapper_children)
        })
        .reconcile_all_on(leadership_gained(leadership.subscribe()))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned());

    tokio::spawn(async move {
        let all_synced = futures::future::try_join3(
            wait_true(deployments_synced_rx),
            wait_true(switches_synced_rx),
            wait_true(children_synced_rx),
        )
        .await;
        if all_synced.is_ok() {
            tracing::info!("watch caches synced");
            ready_tx.send_replace(true);
        }
    });

    let elector_stop = CancellationToken::new();
    let elector = tokio::spawn(
        Elector::new(
            client.clone(),
            LeaseConfig {
                name: args.lease_name.clone(),
                namespace: lease_namespace,
                identity: identity.clone(),
                lease_duration: args.lease_duration,
                renew_deadline: args.lease_renew_deadline,
                retry_period: args.lease_retry_period,
                api_timeout: args.api_timeout,
            },
            leadership.clone(),
            metrics.clone(),
        )
        .run(elector_stop.clone()),
    );

    tracing::info!(%identity, scope = namespace.unwrap_or("<all namespaces>"), "controller starting");
    controller
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(%object, "reconciled"),
                // Reconcile failures were logged by the error policy.
                Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(error) => tracing::warn!(%error, "controller"),
            }
        })
        .await;

    // Writes have stopped: only now hand the lease to a successor.
    elector_stop.cancel();
    if let Err(error) = elector.await {
        tracing::warn!(%error, "lease elector task failed");
    }
    if let Err(error) = admin_server.await {
        tracing::warn!(%error, "admin server task failed");
    }
    tracing::info!("controller stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use apollo_crds::{
        DeviceProcessSpec, DeviceProcessTemplate, DeviceRef, NetworkSwitchSpec, TemplateMetadata,
        WorkloadSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};

    fn workload() -> WorkloadSpec {
        crate::fixtures::workload("u", &[], &[])
    }

    fn deployment(name: &str, namespace: &str, role: &str) -> DeviceProcessDeployment {
        let mut d = DeviceProcessDeployment::new(
            name,
            crate::fixtures::spec(
                LabelSelector {
                    match_labels: Some([("role".to_owned(), role.to_owned())].into()),
                    match_expressions: None,
                },
                DeviceProcessTemplate {
                    metadata: TemplateMetadata::default(),
                    spec: workload(),
                },
            ),
        );
        d.metadata.namespace = Some(namespace.into());
        d
    }

    fn child_of(owner: &str, device: &str) -> DeviceProcess {
        let w = workload();
        let mut c = DeviceProcess::new(
            &format!("{owner}-{device}"),
            DeviceProcessSpec {
                device_ref: DeviceRef {
                    name: device.into(),
                },
                artifact: w.artifact,
                execution: w.execution,
            },
        );
        c.metadata.namespace = Some("fabric".into());
        c.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "azure.com/v1alpha1".into(),
            kind: "DeviceProcessDeployment".into(),
            name: owner.into(),
            uid: format!("uid-{owner}"),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        c
    }

    #[tokio::test]
    async fn a_relist_reports_what_vanished_while_the_watch_was_down() {
        let (cache, writer) = reflector::store::<DeviceProcess>();
        let (kept, gone, new) = (
            child_of("d", "kept"),
            child_of("d", "gone"),
            child_of("d", "new"),
        );
        let events: Vec<Result<watcher::Event<DeviceProcess>, watcher::Error>> = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(kept.clone())),
            Ok(watcher::Event::InitApply(gone.clone())),
            Ok(watcher::Event::InitDone),
            // The watch broke; the relist no longer holds `gone`.
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(kept.clone())),
            Ok(watcher::Event::InitApply(new.clone())),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Delete(kept.clone())),
        ];
        let seen: Vec<String> = vanished_on_relist(
            reflector::reflector(writer, futures::stream::iter(events)),
            cache.clone(),
        )
        .map(|e| match e.expect("no error") {
            watcher::Event::Init => "init".to_owned(),
            watcher::Event::InitApply(c) => format!("list {}", c.name_any()),
            watcher::Event::InitDone => "done".to_owned(),
            watcher::Event::Apply(c) => format!("apply {}", c.name_any()),
            watcher::Event::Delete(c) => format!("delete {}", c.name_any()),
        })
        .collect()
        .await;
        assert_eq!(
            seen,
            [
                "init",
                "list d-kept",
                "list d-gone",
                "done",
                "init",
                "list d-kept",
                "list d-new",
                "done",
                "delete d-gone",
                "delete d-kept",
            ]
        );
        assert!(cache.get(&ObjectRef::from_obj(&new)).is_some());
        assert!(cache.get(&ObjectRef::from_obj(&kept)).is_none());
    }

    #[test]
    fn a_switch_maps_to_deployments_selecting_it_and_to_owners_of_its_children() {
        let (deployments, mut deployment_writer) = reflector::store::<DeviceProcessDeployment>();
        for d in [
            deployment("selects", "fabric", "tor"),
            deployment("used-to-select", "fabric", "spine"),
            deployment("unrelated", "fabric", "spine"),
            deployment("elsewhere", "lab", "tor"),
        ] {
            deployment_writer.apply_watcher_event(&watcher::Event::Apply(d));
        }
        let (children, mut child_writer) = reflector::store::<DeviceProcess>();
        child_writer
            .apply_watcher_event(&watcher::Event::Apply(child_of("used-to-select", "tor1")));
        child_writer.apply_watcher_event(&watcher::Event::Apply(child_of("unrelated", "tor2")));

        let mut switch = NetworkSwitch::new("tor1", NetworkSwitchSpec::default());
        switch.metadata.namespace = Some("fabric".into());
        switch.metadata.labels = Some([("role".to_owned(), "tor".to_owned())].into());

        let mapped: Vec<String> = deployments_for_switch(&switch, &deployments, &children)
            .into_iter()
            .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
            .collect();
        assert_eq!(mapped, ["fabric/selects", "fabric/used-to-select"]);
    }
}

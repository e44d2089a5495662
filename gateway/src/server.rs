//! Wiring: binds the listeners, builds the cache, store, writer and background tasks, serves
//! until shutdown, then drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use apollo_crds::DeviceProcess;
use apollo_runtime::ServeOptions;
use kube::Api;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::api::{device_router, DeviceApi};
use crate::cache::{run_watch, Cache};
use crate::cluster;
use crate::cluster::ownership::{self, OwnedSlots};
use crate::cluster::sweep::{Background, BreakerAlerts};
use crate::config::Settings;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::state::{RedisStore, StateStore, Store};
use crate::status::{StatusWriter, WriterConfig};

/// Desired ETags waiting to be recorded in the store.
const ETAG_RECORD_QUEUE: usize = 4096;

/// Binds `addr`; a taken port fails here, before anything else starts.
pub async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { what, addr, source })
}

/// Runs the gateway until `shutdown` is cancelled (or a server fails).
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), Error> {
    let args = &settings.args;
    let device_listener = bind(args.listen, "device API").await?;
    let admin_listener = bind(args.admin.listen, "admin").await?;
    if settings.auth.is_insecure() {
        tracing::warn!(
            "--insecure-no-auth: device requests are NOT authenticated; never run this way \
             outside development"
        );
    }
    if settings.auth.has_shared_token() {
        tracing::warn!("a shared development token is accepted for every device");
    }
    let client = args.kube.client().await.map_err(Error::KubeConfig)?;

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let store = match &args.redis_url {
        Some(url) => Store::redis(RedisStore::new(url)?, metrics.clone()),
        None => Store::memory(metrics.clone()),
    };
    store
        .reception()
        .set_slow_call(settings.args.stale_window() / 2);
    // Alone (in-memory store) this replica owns every slot. In a cluster it owns the slots of
    // the shards whose Lease it holds, published by the cluster task below.
    let (ownership_sender, ownership) = if args.redis_url.is_some() {
        ownership::fixed(OwnedSlots::none())
    } else {
        ownership::fixed(OwnedSlots::of_shards(&[settings.ordinal], args.replicas))
    };
    // Whole seconds (the flag's parser refuses fractions): agents are told it in seconds.
    let heartbeat_interval_seconds = args.heartbeat_interval().as_secs();
    let cache = Arc::new(Cache::new(heartbeat_interval_seconds, metrics.clone()));
    let writer = Arc::new(StatusWriter::new(
        cache.clone(),
        store.clone(),
        client.clone(),
        ownership.clone(),
        WriterConfig {
            debounce: args.status_debounce(),
            call_timeout: args.kube_write_timeout(),
            concurrency: args.status_writers,
            writes_per_second: args.kube_writes_per_second,
            queue_capacity: args.status_queue_capacity,
            instance: format!("apollo-gateway-{}", settings.ordinal),
        },
        metrics.clone(),
    ));
    tracing::info!(
        listen = %args.listen,
        admin = %args.admin.listen,
        store = store.backend_name(),
        ordinal = settings.ordinal,
        replicas = args.replicas,
        namespace = args.namespace.as_deref().unwrap_or("<all>"),
        stale_window = ?args.stale_window(),
        sweep_grace = ?settings.sweep_grace,
        "apollo-gateway starting"
    );

    let mut tasks = JoinSet::new();
    if let Some(redis_url) = &args.redis_url {
        tasks.spawn(cluster::run(
            cluster::ClusterConfig {
                ordinal: settings.ordinal,
                advertise_addr: settings.advertise_addr.clone(),
                redis_url: redis_url.clone(),
                lease_namespace: settings.lease_namespace.clone(),
                lease_duration: args.shard_lease(),
            },
            client.clone(),
            args.replicas,
            ownership_sender,
            store.clock().clone(),
            cluster::ClusterMetrics {
                clock_offset: metrics.clock_offset_seconds.clone(),
                shard_held: metrics.shard_held.clone(),
                standing_aside: metrics.shard_standing_aside.clone(),
            },
            {
                let cache = cache.clone();
                async move { cache.wait_synced().await }
            },
            shutdown.clone(),
        ));
    } else {
        cluster::publish_held(&metrics.shard_held, &[settings.ordinal], args.replicas);
        // Keep the fixed ownership's sender alive for the life of the process.
        tasks.spawn(async move {
            let _keep = ownership_sender;
            std::future::pending::<()>().await
        });
    }
    let api: Api<DeviceProcess> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    {
        let writer = writer.clone();
        let store = store.clone();
        tasks.spawn(run_watch(
            api,
            cache.clone(),
            move |changes| {
                if !changes.desired.is_empty() {
                    writer.on_spec_change(changes.desired);
                }
                if !changes.gone.is_empty() {
                    tokio::spawn(forget_gone(store.clone(), changes.gone));
                }
            },
            shutdown.clone(),
        ));
    }
    let background = Background {
        metrics: metrics.clone(),
        cache: cache.clone(),
        store: store.clone(),
        writer: writer.clone(),
        ownership: ownership.clone(),
        alerts: BreakerAlerts {
            client: Some(client.clone()),
            lease_namespace: settings.lease_namespace.clone(),
            instance: format!("apollo-gateway-{}", settings.ordinal),
        },
    };
    tasks.spawn(
        background.clone().run_sweeper(
            args.stale_window(),
            // Reports are heard again once agents in back-off have retried.
            args.stale_window()
                .max(args.agent_backoff_max + args.heartbeat_interval()),
            args.sweep_interval(),
            settings.sweep_grace,
            settings.breaker,
            shutdown.clone(),
        ),
    );
    tasks.spawn(background.clone().run_replay(
        args.pending_replay_grace(),
        args.sweep_interval().max(Duration::from_secs(1)),
        shutdown.clone(),
    ));
    tasks.spawn(background.run_resync(args.resync_interval(), shutdown.clone()));
    // Keeps a call to the store going, so that a silence of the store is told from a quiet one.
    tasks.spawn(store.clone().run_prober(shutdown.clone()));
    let (etag_records, etag_queue) = mpsc::channel(ETAG_RECORD_QUEUE);
    tasks.spawn(record_etags(store.clone(), etag_queue, shutdown.clone()));
    let writer_task = tokio::spawn(writer.clone().run(shutdown.clone()));

    let device_api = Arc::new(DeviceApi {
        cache: cache.clone(),
        store: store.clone(),
        sink: writer.clone(),
        auth: settings.auth.clone(),
        heartbeat_interval_seconds,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        etag_records,
        ordinal: settings.ordinal,
        budgets: crate::api::budget::Budgets::new(settings.budgets, metrics.clone()),
        max_report_clock_skew: args.max_report_clock_skew,
        access_log: args.access_log,
    });
    let admin = admin::router(Arc::new(registry), cache, store);
    let mut servers = JoinSet::new();
    {
        let shutdown = shutdown.clone();
        servers.spawn(async move {
            let router = device_router(device_api);
            apollo_runtime::serve(
                device_listener,
                move |_peer| hyper_util::service::TowerToHyperService::new(router.clone()),
                ServeOptions {
                    // A router multiplexes the long polls of many agents over one connection.
                    max_concurrent_streams: 100_000,
                    // Long polls end early with 304 on shutdown, so this is rarely reached.
                    drain: Duration::from_secs(10),
                    // The router's own limit (--max-header-bytes): whatever it forwards fits.
                    max_header_bytes: 16 * 1024,
                    ..ServeOptions::default()
                },
                shutdown,
            )
            .await;
            Ok(())
        });
    }
    {
        let shutdown = shutdown.clone();
        servers.spawn(async move {
            apollo_runtime::shell::admin::serve(admin_listener, admin, shutdown).await;
            Ok(())
        });
    }

    let mut result = Ok(());
    while let Some(joined) = servers.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                if result.is_ok() {
                    result = Err(error);
                }
                shutdown.cancel();
            }
            Err(join_error) => {
                tracing::error!(%join_error, "server task failed");
                shutdown.cancel();
            }
        }
    }
    shutdown.cancel();
    tracing::info!("device API stopped; flushing status writes");
    if let Err(join_error) = writer_task.await {
        tracing::error!(%join_error, "status writer failed");
    }
    while tasks.join_next().await.is_some() {}
    tracing::info!("apollo-gateway stopped");
    result
}

async fn record_etags(
    store: Store,
    mut queue: mpsc::Receiver<(String, String)>,
    shutdown: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = queue.recv() => next,
        };
        let Some((device, etag)) = next else { return };
        if let Err(error) = store.record_desired_etag(&device, &etag).await {
            tracing::debug!(%device, %error, "recording the served ETag failed");
        }
    }
}

/// Forgets what the store remembers of DeviceProcesses that are gone (deleted, or replaced by a
/// new object of the same name): a DeviceProcess created again must not inherit what the agent
/// observed of the old one. Every replica watching does it; it is idempotent.
async fn forget_gone(store: Store, gone: Vec<(String, crate::model::ObjectKey)>) {
    for (device, key) in gone {
        if let Err(error) = store.forget_observed(&device, &key).await {
            tracing::warn!(%key, %error, "could not forget a deleted DeviceProcess's observations; a DeviceProcess created again under its name may show SpecObserved until the agent reports");
        }
    }
}

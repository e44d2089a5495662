//! Steady-state reports against the Redis state store: a single redis-server, a Redis Cluster of
//! three masters, and the same cluster with a replica per master and `wait-replicas=1`, each
//! started here on loopback. Prints reports per second, latency percentiles and Redis calls per
//! report (from `INFO commandstats`).
//!
//! `cargo run --release -p apollo-gateway --example store_bench -- [REPORTS] [CONCURRENCY]`
//! (defaults 200000 and 64). Numbers: docs/benchmarks.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apollo_gateway::model::ObjectKey;
use apollo_gateway::state::{RedisStore, ReportInput, ShownBefore, StateStore};
use apollo_test_support::{RedisCluster, RedisServer};

const DEVICES: usize = 10_000;

fn input(device: &str, now_ms: i64) -> ReportInput<'_> {
    ReportInput {
        device,
        now_ms,
        agent_version: "1.0.0",
        observations: vec![(
            ObjectKey::new("ns", "p"),
            format!("sha256:{}", "a".repeat(64)),
        )],
        shown: ShownBefore::default(),
    }
}

async fn run(name: &str, url: &str, reports: usize, concurrency: usize) -> Duration {
    let store = Arc::new(RedisStore::new(url).expect("store"));
    let devices: Arc<Vec<String>> =
        Arc::new((0..DEVICES).map(|i| format!("bench-{i:05}")).collect());
    // Every device known, every script cached: what follows is the steady state.
    for d in devices.iter() {
        store
            .record_report(&input(d, 1_000))
            .await
            .expect("warm-up report");
    }
    let start = Instant::now();
    let per_task = reports / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let store = store.clone();
            let devices = devices.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_task);
                for i in 0..per_task {
                    let device = &devices[(t * per_task + i) % devices.len()];
                    let sent = Instant::now();
                    store
                        .record_report(&input(device, 2_000 + i as i64))
                        .await
                        .expect("report");
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(reports);
    for t in tasks {
        latencies.extend(t.await.expect("task"));
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(0.999).as_secs_f64() * 1e3,
        store.unreplicated_writes(),
    );
    elapsed
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let reports: usize = args.next().map_or(200_000, |a| a.parse().expect("REPORTS"));
    let concurrency: usize = args.next().map_or(64, |a| a.parse().expect("CONCURRENCY"));
    println!("{reports} steady-state reports of {DEVICES} devices, {concurrency} concurrent");
    println!("| store | reports/s | p50 ms | p99 ms | p99.9 ms | WAIT short of 1 replica |");
    println!("|---|---|---|---|---|---|");
    let single = RedisServer::start().await;
    let _ = single.command(&["CONFIG", "RESETSTAT"]);
    run("redis-server", &single.url(), reports, concurrency).await;
    drop(single);

    let cluster = RedisCluster::start(3, 0).await;
    cluster.reset_stats();
    run("cluster, 3 masters", &cluster.url(), reports, concurrency).await;
    let calls = cluster.command_stat("evalsha", "calls") as f64 / (reports + DEVICES) as f64;
    println!("(cluster: {calls:.3} EVALSHA per report)");
    drop(cluster);

    let cluster = RedisCluster::start(3, 1).await;
    cluster.reset_stats();
    let url = format!("{}?wait-replicas=1", cluster.url());
    run(
        "cluster, 3 masters + replicas, wait-replicas=1",
        &url,
        reports,
        concurrency,
    )
    .await;
    let calls = cluster.command_stat("evalsha", "calls") as f64 / (reports + DEVICES) as f64;
    let waits = cluster.command_stat("wait", "calls") as f64 / (reports + DEVICES) as f64;
    println!("(cluster + WAIT: {calls:.3} EVALSHA and {waits:.3} WAIT per report, one pipeline)");
}

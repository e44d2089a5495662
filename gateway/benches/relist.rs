//! A re-list of 100,000 DeviceProcesses into the gateway's cache (issue 13, defect 6), and what it
//! costs the requests served meanwhile: how long a reader (a request handler looking up a
//! device) waited for the index at most while the re-list was applied.
//!
//! `cargo bench -p apollo-gateway --bench relist` (numbers in docs/benchmarks.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apollo_crds::{DeviceProcess, DeviceProcessSpec};
use apollo_gateway::cache::Cache;
use apollo_gateway::metrics::Metrics;

fn dp(i: usize, rv: usize, url: &str) -> DeviceProcess {
    let spec: DeviceProcessSpec = serde_json::from_value(serde_json::json!({
        "deviceRef": {"name": format!("device-{i:06}")},
        "artifact": {"type": "oci", "url": url},
        "execution": {"backend": "container", "args": ["run"]}
    }))
    .expect("spec");
    let mut obj = DeviceProcess::new(&format!("dp-{i:06}"), spec);
    obj.metadata.namespace = Some("fleet".into());
    obj.metadata.generation = Some(1);
    obj.metadata.resource_version = Some(rv.to_string());
    obj.metadata.uid = Some(format!("uid-{i}"));
    obj
}

async fn relist(cache: &Cache, objects: &[DeviceProcess]) -> Duration {
    let started = Instant::now();
    cache.begin_relist();
    for obj in objects {
        cache.relist_apply(obj);
    }
    let changes = cache.finish_relist().await;
    std::hint::black_box(changes);
    started.elapsed()
}

fn main() {
    const N: usize = 100_000;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let cache = Arc::new(Cache::new(15, Metrics::unregistered()));
    let first: Vec<DeviceProcess> = (0..N).map(|i| dp(i, i + 1, "oci://a:1")).collect();
    let second: Vec<DeviceProcess> = (0..N).map(|i| dp(i, N + i + 1, "oci://a:2")).collect();
    runtime.block_on(async {
        let initial = relist(&cache, &first).await;
        println!("first list of {N}: {initial:?}");
        // A reader probing the index the whole time, as request handlers do.
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (cache, done) = (cache.clone(), done.clone());
            std::thread::spawn(move || {
                let mut worst = Duration::ZERO;
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    std::hint::black_box(cache.keys_for_device("device-004242"));
                    worst = worst.max(t.elapsed());
                    reads += 1;
                    // A probe per millisecond: measures waits without competing for the CPU.
                    std::thread::sleep(Duration::from_millis(1));
                }
                (worst, reads)
            })
        };
        // Every spec changed: every document rebuilt.
        let changed = relist(&cache, &second).await;
        // Nothing changed: the common re-list after a watch expired.
        let same = relist(&cache, &second).await;
        done.store(true, Ordering::Relaxed);
        let (worst, reads) = reader.join().expect("reader");
        println!("re-list of {N}, every spec changed: {changed:?}");
        println!("re-list of {N}, nothing changed: {same:?}");
        println!("concurrent reader: {reads} lookups, longest wait for the index {worst:?}");
    });
}

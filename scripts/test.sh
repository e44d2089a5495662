#!/usr/bin/env bash
# The project's test command: installs what the tests need, then format, lint and test.
# Usage: scripts/test.sh            (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib/ensure-deps.sh
ensure_redis_server
ensure_openssl
ensure_libfaketime
ensure_kubectl_present
ensure_control_plane_deps

# The real control plane and Jaeger the tests run, built once into ~/.cache/apollo (minutes cold).
source scripts/lib/go-tools.sh
echo "== Go tools: Kubernetes $KUBE_VERSION control plane (tools/kube), Jaeger (tools/jaeger)"
kube_bin_dir >/dev/null
jaeger_bin_dir >/dev/null
echo "== gofmt, go vet (tools/)"
unformatted=$(gofmt -l tools)
if [ -n "$unformatted" ]; then echo "gofmt: not formatted: $unformatted" >&2; exit 1; fi
(cd tools/kube && CGO_ENABLED=0 GOFLAGS=-buildvcs=false go vet ./...)

# Prometheus (the local stack's, and tests/e2e/tests/monitoring.rs's) and promtool, same cache.
echo "== Go tools: Prometheus and promtool (tools/prometheus)"
prometheus_bin_dir >/dev/null
echo "== alert rules: promtool check rules, promtool test rules, PrometheusRule drift (deploy/monitoring/check.sh)"
deploy/monitoring/check.sh

# A clean clone builds everything once: incremental caches would only cost disk (several GB).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
disk_report() { echo "   disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free; target: $(du -sh "${CARGO_TARGET_DIR:-target}" 2>/dev/null | cut -f1)"; }

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
# Multi-process tests start real binaries; build them first so tests never race a build.
cargo build --workspace --bins --locked
disk_report
cargo test --workspace --locked -- --test-threads="${APOLLO_TEST_THREADS:-2}"
disk_report
# Bounded fuzzing of the network-facing parsers (issue 13): cargo-fuzz targets in fuzz/ (report
# decoder, device names and paths, If-None-Match) from the committed corpus fuzz/corpus/; its own
# build in fuzz/target (minutes cold). APOLLO_FUZZ_SECONDS per target, 0 skips the step.
if [ "${APOLLO_FUZZ_SECONDS:-60}" != 0 ]; then
  echo "== fuzz: cargo-fuzz, ${APOLLO_FUZZ_SECONDS:-60}s per target (fuzz/, scripts/fuzz.sh)"
  scripts/fuzz.sh "${APOLLO_FUZZ_SECONDS:-60}"
  disk_report
fi

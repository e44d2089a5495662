#!/usr/bin/env bash
# Runs Apollo on this machine: the real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager), redis-server, Jaeger, the controller, a 3-replica gateway StatefulSet,
# the router, two agents and Prometheus (scraping them all, Apollo's alert rules loaded), all as
# processes on 127.0.0.1. Ctrl-C stops everything.
#
#   scripts/dev.sh                      start the stack (foreground)
#   scripts/dev.sh agent stop tor1-02   stop one agent of the running stack (another terminal)
#   scripts/dev.sh agent start tor1-02  start it again
#   scripts/dev.sh status               what is running
#   scripts/dev.sh up --no-jaeger       without Jaeger
#   scripts/dev.sh up --no-prometheus   without Prometheus (http://127.0.0.1:9090 otherwise)
#
# The first run builds what is missing (the Go tools take several minutes on 2 cores, the Rust
# release build a few more); later runs start in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir="${CARGO_TARGET_DIR:-target}/release"

case "${1:-up}" in
  agent|status)
    if [ -x "$bin_dir/apollo-dev" ]; then exec "$bin_dir/apollo-dev" "$@"; fi
    exec cargo run -q --release -p apollo-dev --bin apollo-dev -- "$@" ;;
esac

source scripts/lib/ensure-deps.sh
ensure_redis_server
ensure_control_plane_deps

source scripts/lib/go-tools.sh
echo "== Kubernetes $KUBE_VERSION control plane (tools/kube)"
kube_bin_dir >/dev/null
if [[ " $* " != *" --no-jaeger "* ]]; then
  echo "== Jaeger (tools/jaeger)"
  jaeger_bin_dir >/dev/null
fi
if [[ " $* " != *" --no-prometheus "* && -z "${APOLLO_DEV_NO_PROMETHEUS:-}" ]]; then
  echo "== Prometheus (tools/prometheus)"
  prometheus_bin_dir >/dev/null
fi

echo "== building Apollo (release)"
cargo build --release --locked --bins \
  -p apollo-gateway -p apollo-router -p apollo-controller -p apollo-agent -p apollo-dev

[ "${1:-}" = "up" ] && shift
exec "$bin_dir/apollo-dev" up "$@"

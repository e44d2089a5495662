#!/usr/bin/env bash
# Runs Apollo on this machine: kubesim, redis-server, the controller, a 3-replica gateway
# StatefulSet, the router and two agents, all as processes on 127.0.0.1. Ctrl-C stops everything.
#
#   scripts/dev.sh                      start the stack (foreground)
#   scripts/dev.sh agent stop tor1-02   stop one agent of the running stack (another terminal)
#   scripts/dev.sh agent start tor1-02  start it again
#   scripts/dev.sh status               what is running
#   scripts/dev.sh up --kubeconfig ~/.kube/config   use a real cluster instead of kubesim
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir="${CARGO_TARGET_DIR:-target}/release"

case "${1:-up}" in
  agent|status)
    if [ -x "$bin_dir/apollo-dev" ]; then exec "$bin_dir/apollo-dev" "$@"; fi
    exec cargo run -q --release -p apollo-e2e --bin apollo-dev -- "$@" ;;
esac

source scripts/lib/ensure-deps.sh
ensure_redis_server

echo "== building Apollo (release)"
cargo build --release --locked --bins \
  -p kubesim -p apollo-gateway -p apollo-router -p apollo-controller -p apollo-agent -p apollo-e2e

[ "${1:-}" = "up" ] && shift
exec "$bin_dir/apollo-dev" up "$@"

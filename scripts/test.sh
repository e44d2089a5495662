#!/usr/bin/env bash
# The project's test command: installs what the tests need, then format, lint and test.
# Usage: scripts/test.sh            (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib/ensure-deps.sh
ensure_redis_server
ensure_openssl
ensure_kubectl_present

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
# Multi-process tests start real binaries; build them first so tests never race a build.
cargo build --workspace --bins --locked
cargo test --workspace --locked -- --test-threads="${APOLLO_TEST_THREADS:-2}"

#!/usr/bin/env bash
# Bounded fuzzing of the parsers that face the network (fuzz/, cargo-fuzz + libFuzzer): the
# gateway's report/connect decoders, device names (gateway check, router path decoding) and
# If-None-Match matching. Each target runs for a fixed time from the committed corpus
# (fuzz/corpus/<target>, read only: new inputs go to a scratch directory); a crash fails the run
# and leaves its input in fuzz/artifacts/<target>/.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default $APOLLO_FUZZ_SECONDS or 60)
#        scripts/fuzz.sh --grow-corpus SECONDS  (keeps new inputs in fuzz/corpus/; then shrink it
#          with `cargo fuzz cmin -O --sanitizer none TARGET corpus/TARGET` in fuzz/, with
#          RUSTC_BOOTSTRAP=1 and the cache's bin/ on PATH, and commit it)
#
# No nightly toolchain here: libfuzzer-sys and cargo-fuzz pass -Z flags (sanitizer coverage),
# which the stable compiler accepts with RUSTC_BOOTSTRAP=1. cargo-fuzz itself is installed from
# crates.io into ~/.cache/apollo/cargo-fuzz when missing. No AddressSanitizer: every crate of
# ours forbids unsafe code, and ASan would double the build and halve the executions per second.
set -euo pipefail
cd "$(dirname "$0")/.."

grow=0
if [ "${1:-}" = "--grow-corpus" ]; then grow=1; shift; fi
seconds="${1:-${APOLLO_FUZZ_SECONDS:-60}}"

CARGO_FUZZ_VERSION=0.13.2
root="${XDG_CACHE_HOME:-$HOME/.cache}/apollo/cargo-fuzz"
if ! "$root/bin/cargo-fuzz" --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION"; then
  echo "   installing cargo-fuzz $CARGO_FUZZ_VERSION into $root"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --root "$root"
fi
export PATH="$root/bin:$PATH"
export RUSTC_BOOTSTRAP=1

cd fuzz
flags=(-O --sanitizer none)
cargo fuzz build "${flags[@]}"
for target in $(cargo fuzz list); do
  scratch=$(mktemp -d)
  corpora=("$scratch" "corpus/$target")
  if [ "$grow" = 1 ]; then corpora=("corpus/$target"); fi
  echo "   fuzz $target: ${seconds}s from $(ls "corpus/$target" | wc -l) corpus inputs"
  status=0
  cargo fuzz run "${flags[@]}" "$target" "${corpora[@]}" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"$scratch.log" 2>&1 || status=$?
  grep -E "^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|^#[0-9]+.*DONE" "$scratch.log" | sed 's/^/     /' || true
  rm -rf "$scratch"
  if [ "$status" != 0 ]; then
    tail -60 "$scratch.log" >&2
    echo "fuzz target $target failed (exit $status); the input is in fuzz/artifacts/$target/" >&2
    rm -f "$scratch.log"
    exit 1
  fi
  rm -f "$scratch.log"
done

# Builds the Go programs Apollo's tests and local stack run (never shipped, never committed):
# etcd, kube-apiserver and kube-controller-manager from tools/kube, Jaeger from tools/jaeger,
# Prometheus and promtool from tools/prometheus.
#
# Each module is built once into a cache outside the work tree,
#   ${APOLLO_TOOLS_CACHE:-~/.cache/apollo}/<module>-<version hash>/bin/
# keyed by the module's go.mod and go.sum, so a checkout with the same pins reuses the binaries and a
# change of pins builds afresh. Builds are serialised with flock, so two scripts (or two test
# binaries) asking at once build once.
#
#   source scripts/lib/go-tools.sh
#   kube_bin_dir        # prints the directory holding etcd, kube-apiserver, kube-controller-manager

_apollo_root() { (cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd); }

apollo_tools_cache() { echo "${APOLLO_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/apollo}"; }

# The Kubernetes version tools/kube builds; kube-apiserver reports it at /version (the kubectl
# dispatcher on these machines picks its kubectl by the server's minor version).
KUBE_VERSION=v1.34.4

_module_key() { # <module dir> -> short hash of its pins and sources
  (cd "$1" && cat go.mod go.sum $(find . -name '*.go' | sort) | sha256sum | cut -c1-12)
}

# Builds <packages...> of module <dir> into <cache>/<name>-<key>/bin unless already there.
# Prints the bin directory on stdout; progress goes to stderr.
_go_tools_build() {
  local name=$1 dir=$2 ldflags=$3; shift 3
  local root; root=$(_apollo_root)
  local mod="$root/$dir"
  command -v go >/dev/null 2>&1 || { echo "error: the Go toolchain (go) is not installed; tools/ needs Go >= 1.24" >&2; return 1; }
  local out; out="$(apollo_tools_cache)/$name-$(_module_key "$mod")"
  local bin="$out/bin"
  if [ -f "$out/.complete" ]; then echo "$bin"; return 0; fi
  mkdir -p "$out"
  (
    flock 9
    if [ -f "$out/.complete" ]; then exit 0; fi
    echo "== building $name from $dir (Go $(go env GOVERSION)); first time only, takes several minutes on 2 cores" >&2
    echo "   into $bin" >&2
    local started=$SECONDS
    mkdir -p "$bin.partial"
    local pkg
    for pkg in "$@"; do
      local t0=$SECONDS
      echo "   go build $pkg ..." >&2
      # Progress: the build prints nothing for minutes, so say it is alive every 30 s.
      ( while sleep 30; do echo "   ... still building $(basename "$pkg") ($((SECONDS - t0)) s)" >&2; done ) &
      local ticker=$!
      if ! (cd "$mod" && CGO_ENABLED=0 GOFLAGS=-buildvcs=false go build -trimpath -ldflags "$ldflags" -o "$bin.partial/" "$pkg" >&2); then
        kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null
        echo "error: building $pkg failed" >&2
        exit 1
      fi
      kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null
      echo "   built $(basename "$pkg") in $((SECONDS - t0)) s" >&2
    done
    rm -rf "$bin" && mv "$bin.partial" "$bin"
    touch "$out/.complete"
    echo "== $name built in $((SECONDS - started)) s" >&2
  ) 9>"$out/.lock" || return 1
  echo "$bin"
}

kube_bin_dir() {
  local v=$KUBE_VERSION minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local ldflags="-s -w"
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  _go_tools_build "kube-$v" tools/kube "$ldflags" \
    ./cmd/etcd k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
}

# Jaeger (v2, `cmd/jaeger`): without a config file it runs the all-in-one configuration with
# in-memory storage, OTLP on :4317 (gRPC) and :4318 (HTTP) and the UI/query API on :16686.
jaeger_bin_dir() {
  _go_tools_build jaeger tools/jaeger "-s -w" github.com/jaegertracing/jaeger/cmd/jaeger
}

# Prometheus and promtool (github.com/prometheus/prometheus v0.316.0, i.e. Prometheus 3.x): the
# local stack's metrics server and the alert-rule unit tests. Built without the embedded web UI
# assets (the HTTP API, which the tests and Grafana use, is complete without them).
# Both binaries, also in CI: tests/e2e/tests/monitoring.rs runs the server, and promtool alone is not
# materially cheaper. Measured cold on this 2-core machine under load (4 other builds, load ~10-13):
# prometheus 865 s (module downloads included) then promtool 15 s more from the warm build cache;
# promtool alone, fresh build cache, 785 s: it compiles 1364 packages, 1355 of them shared with
# prometheus' 1518 (`go list -deps`).
prometheus_bin_dir() {
  _go_tools_build prometheus tools/prometheus "-s -w" \
    github.com/prometheus/prometheus/cmd/prometheus github.com/prometheus/prometheus/cmd/promtool
}

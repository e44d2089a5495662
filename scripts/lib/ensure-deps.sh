# Shared by scripts/test.sh and scripts/dev.sh: install what the system needs when it is missing.
# Debian packages only; runs apt-get as root, or through sudo when available.

apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "error: need root (or sudo) to apt-get install $*" >&2; return 1
    fi
  fi
  echo "== installing $* (apt-get)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_redis_server() {
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
    # Debian's package starts a system instance on 6379; the project never uses it.
    (command -v systemctl >/dev/null 2>&1 && systemctl stop redis-server 2>/dev/null) || true
  fi
  command -v redis-server >/dev/null 2>&1 || { echo "error: redis-server is not installed" >&2; return 1; }
  # The Redis Cluster tests create their cluster with redis-cli (Debian: redis-tools, which
  # redis-server depends on; installed on its own should a system have only the server).
  command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools
  command -v redis-cli >/dev/null 2>&1 || { echo "error: redis-cli is not installed" >&2; return 1; }
}

ensure_openssl() {
  # The docker-compose init step computes device tokens with openssl; its test runs it too.
  command -v openssl >/dev/null 2>&1 || apt_install openssl
}

ensure_kubectl_present() {
  if ! command -v kubectl >/dev/null 2>&1; then
    echo "warning: kubectl not found; tests that drive the real kubectl will fail" >&2
  fi
}

ensure_libfaketime() {
  # An end-to-end test runs one gateway with its wall clock skewed through LD_PRELOAD libfaketime.
  if ! ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1; then
    apt_install libfaketime
  fi
}

ensure_control_plane_deps() {
  # scripts/control-plane.sh: certificates (openssl), readiness probes (curl), parent-death
  # signals (setpriv, util-linux) and the Go toolchain that builds etcd and Kubernetes.
  command -v openssl >/dev/null 2>&1 || apt_install openssl
  command -v curl >/dev/null 2>&1 || apt_install curl
  command -v setpriv >/dev/null 2>&1 || apt_install util-linux
  if ! command -v go >/dev/null 2>&1; then
    echo "error: the Go toolchain (go >= 1.24) is needed to build etcd, Kubernetes and Jaeger (tools/)" >&2
    return 1
  fi
}

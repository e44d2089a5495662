#!/usr/bin/env bash
# The real Kubernetes control plane on this machine: etcd, kube-apiserver and
# kube-controller-manager, built from Go modules (tools/kube) and run as processes on 127.0.0.1.
#
#   scripts/control-plane.sh start DIR   build if missing, start in the background, return once
#                                        /readyz answers (non-zero exit with the failing log's tail)
#   scripts/control-plane.sh stop DIR    stop exactly the processes `start` began
#   scripts/control-plane.sh run DIR     the same in the foreground; Ctrl-C / SIGTERM stops it
#   scripts/control-plane.sh status DIR  what runs, and where
#   scripts/control-plane.sh build       only build (prints the directory of the binaries)
#
# DIR receives everything: pki/ (a CA, the apiserver's serving certificate for 127.0.0.1, an admin
# client certificate in system:masters, the controller-manager's client certificate and the
# service-account signing key), admin.kubeconfig, audit.log (every request: user, verb, resource,
# namespace), logs/, etcd/ (data) and env (ports and paths, for scripts and tests).
#
# Ports are free 127.0.0.1 ports unless set: APOLLO_APISERVER_PORT, APOLLO_ETCD_PORT,
# APOLLO_ETCD_PEER_PORT, APOLLO_KCM_PORT. APOLLO_KCM_CONTROLLERS overrides the controller list;
# APOLLO_APISERVER_EXTRA_ARGS appends kube-apiserver flags (e.g. --max-requests-inflight=5).
#
# Each component runs under a supervisor that restarts it when it exits (as a kubelet restarts a
# static pod): tests restart kube-apiserver with `kill -9 $(cat DIR/pids/kube-apiserver)`, keep it
# down while DIR/hold/kube-apiserver exists, and pause etcd with SIGSTOP/SIGCONT. Every process
# carries a parent-death signal, so nothing outlives the `run` process that started it, even when
# that one is killed with SIGKILL.
set -euo pipefail

SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
source "$(dirname "$SCRIPT")/lib/go-tools.sh"
COMPONENTS=(etcd kube-apiserver kube-controller-manager)

die() { echo "control-plane: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is not installed (apt-get install $2)"; }

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 40000))
    if port_free "$p"; then echo "$p"; return; fi
  done
  die "no free port found on 127.0.0.1"
}

# ---------------------------------------------------------------------------------------------
# Certificates (ECDSA P-256; all signed by one CA generated per DIR).

gen_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# sign <name> <subject> <extensions...>: pki/<name>.key + pki/<name>.crt signed by pki/ca.
sign() {
  local name=$1 subject=$2; shift 2
  local pki=$DIR/pki
  gen_key "$pki/$name.key"
  openssl req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr" 2>/dev/null
  printf '%s\n' "$@" >"$pki/$name.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
  rm -f "$pki/$name.csr" "$pki/$name.ext"
}

make_pki() {
  local pki=$DIR/pki
  [ -f "$pki/.complete" ] && return 0
  need openssl openssl
  rm -rf "$pki" && mkdir -p "$pki" && chmod 700 "$pki"
  gen_key "$pki/ca.key"
  openssl req -x509 -new -key "$pki/ca.key" -subj "/CN=apollo-control-plane-ca" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$pki/ca.crt" 2>/dev/null
  sign apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.0.0.1" \
    "extendedKeyUsage=serverAuth" "keyUsage=critical,digitalSignature,keyEncipherment"
  sign admin "/O=system:masters/CN=apollo-admin" \
    "extendedKeyUsage=clientAuth" "keyUsage=critical,digitalSignature,keyEncipherment"
  sign controller-manager "/CN=system:kube-controller-manager" \
    "extendedKeyUsage=clientAuth" "keyUsage=critical,digitalSignature,keyEncipherment"
  gen_key "$pki/sa.key"
  openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  touch "$pki/.complete"
}

b64() { base64 -w0 <"$1"; }

# kubeconfig <file> <user> <cert name>
kubeconfig() {
  local file=$1 user=$2 cert=$3
  cat >"$file.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: apollo
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(b64 "$DIR/pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(b64 "$DIR/pki/$cert.crt")
    client-key-data: $(b64 "$DIR/pki/$cert.key")
contexts:
- name: apollo
  context:
    cluster: apollo
    user: $user
    namespace: default
current-context: apollo
EOF
  chmod 600 "$file.tmp" && mv "$file.tmp" "$file"
}

# Every request at Metadata level (who, verb, resource, namespace, code) so tests count what the
# apiserver really served; request and response bodies are never logged. Health probes and the
# apiserver's own loopback client are left out.
audit_policy() {
  cat >"$DIR/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: None
    users: ["system:apiserver"]
  - level: None
    nonResourceURLs: ["/healthz*", "/readyz*", "/livez*", "/version", "/metrics"]
  - level: Metadata
EOF
}

# ---------------------------------------------------------------------------------------------

load_env() {
  [ -f "$DIR/env" ] || die "$DIR/env not found: start the control plane first"
  # shellcheck disable=SC1091
  source "$DIR/env"
}

write_env() {
  local bin=$1
  APISERVER_PORT=${APOLLO_APISERVER_PORT:-$(free_port)}
  ETCD_PORT=${APOLLO_ETCD_PORT:-$(free_port)}
  ETCD_PEER_PORT=${APOLLO_ETCD_PEER_PORT:-$(free_port)}
  KCM_PORT=${APOLLO_KCM_PORT:-$(free_port)}
  cat >"$DIR/env" <<EOF
KUBE_BIN=$bin
KUBE_VERSION=$KUBE_VERSION
APISERVER_PORT=$APISERVER_PORT
APISERVER_URL=https://127.0.0.1:$APISERVER_PORT
ETCD_PORT=$ETCD_PORT
ETCD_PEER_PORT=$ETCD_PEER_PORT
ETCD_URL=http://127.0.0.1:$ETCD_PORT
KCM_PORT=$KCM_PORT
KUBECONFIG_ADMIN=$DIR/admin.kubeconfig
AUDIT_LOG=$DIR/audit.log
EOF
}

# The command line of one component (one argument per line).
command_of() {
  local pki=$DIR/pki
  case $1 in
    etcd) printf '%s\n' "$KUBE_BIN/etcd" \
      --name=apollo --data-dir="$DIR/etcd" \
      --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-cluster="apollo=http://127.0.0.1:$ETCD_PEER_PORT" \
      --listen-metrics-urls="" --log-level=warn \
      --unsafe-no-fsync=true --quota-backend-bytes=8589934592 ;;
    kube-apiserver)
      # The audit log is never rotated (a max size of 0 means lumberjack's default, 100 MB): tests
      # and loadtest count requests from this one file, and a 10,000-device rollout writes more.
      printf '%s\n' "$KUBE_BIN/kube-apiserver" \
        --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
        --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$APISERVER_PORT" \
        --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
        --client-ca-file="$pki/ca.crt" \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
        --api-audiences=https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range=10.0.0.0/24 \
        --authorization-mode=RBAC \
        --allow-privileged=true \
        --endpoint-reconciler-type=none \
        --audit-policy-file="$DIR/audit-policy.yaml" --audit-log-path="$DIR/audit.log" \
        --audit-log-format=json --audit-log-mode=blocking --audit-log-maxsize=1000000 \
        --profiling=false --v=1
      # shellcheck disable=SC2086
      [ -n "${APOLLO_APISERVER_EXTRA_ARGS:-}" ] && printf '%s\n' $APOLLO_APISERVER_EXTRA_ARGS
      return 0 ;;
    kube-controller-manager) printf '%s\n' "$KUBE_BIN/kube-controller-manager" \
      --kubeconfig="$DIR/controller-manager.kubeconfig" \
      --authentication-kubeconfig="$DIR/controller-manager.kubeconfig" \
      --authorization-kubeconfig="$DIR/controller-manager.kubeconfig" \
      --bind-address=127.0.0.1 --secure-port="$KCM_PORT" \
      --controllers="${APOLLO_KCM_CONTROLLERS:-garbage-collector-controller,namespace-controller,serviceaccount-controller,statefulset-controller}" \
      --use-service-account-credentials=true \
      --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
      --leader-elect=false --v=1 ;;
  esac
}

# _supervise DIR NAME: runs one component, restarting it whenever it exits, until DIR/stopping.
supervise() {
  local name=$1 log=$DIR/logs/$1.log
  local -a cmd
  mapfile -t cmd < <(command_of "$name")
  while [ ! -e "$DIR/stopping" ]; do
    if [ -e "$DIR/hold/$name" ]; then sleep 0.1; continue; fi
    echo "=== $(date -u +%FT%TZ) starting $name" >>"$log"
    setpriv --pdeathsig KILL -- "${cmd[@]}" >>"$log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$DIR/pids/$name"
    wait "$pid" && rc=0 || rc=$?
    echo "=== $(date -u +%FT%TZ) $name exited with status $rc" >>"$log"
    [ -e "$DIR/stopping" ] && break
    sleep 0.5
  done
}

readyz() { # status code of GET /readyz (anonymous may read it)
  curl -s -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$DIR/pki/ca.crt" \
    "https://127.0.0.1:$APISERVER_PORT/readyz" 2>/dev/null || true
}

kcm_healthy() {
  [ "$(curl -sk -o /dev/null -w '%{http_code}' --max-time 2 "https://127.0.0.1:$KCM_PORT/healthz" 2>/dev/null || true)" = 200 ]
}

# run DIR: foreground; the supervisors and their components end with it.
run() {
  need curl curl
  need setpriv util-linux
  local bin; bin=$(kube_bin_dir) || die "building the control plane failed"
  mkdir -p "$DIR"/{logs,pids,hold}
  DIR=$(cd "$DIR" && pwd)
  rm -f "$DIR/stopping" "$DIR/ready" "$DIR"/pids/*
  make_pki
  write_env "$bin"
  load_env
  audit_policy
  kubeconfig "$DIR/admin.kubeconfig" apollo-admin admin
  kubeconfig "$DIR/controller-manager.kubeconfig" system:kube-controller-manager controller-manager
  echo $$ >"$DIR/pids/run"

  local -a sups=()
  stop_all() {
    trap - INT TERM EXIT
    touch "$DIR/stopping"
    local name pid
    for name in kube-controller-manager kube-apiserver etcd; do
      pid=$(cat "$DIR/pids/$name" 2>/dev/null || true)
      [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && kill -CONT "$pid" 2>/dev/null
    done
    for _ in $(seq 1 50); do
      local alive=0
      for name in "${COMPONENTS[@]}"; do
        pid=$(cat "$DIR/pids/$name" 2>/dev/null || true)
        [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && alive=1
      done
      [ $alive = 0 ] && break
      sleep 0.1
    done
    for name in "${COMPONENTS[@]}"; do
      pid=$(cat "$DIR/pids/$name" 2>/dev/null || true)
      [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
    done
    kill "${sups[@]}" ${SLEEPER:-} 2>/dev/null || true
    rm -f "$DIR"/pids/* "$DIR/ready"
    echo "control-plane: stopped" >&2
  }
  trap 'stop_all; exit 0' INT TERM
  trap stop_all EXIT

  echo "control-plane: starting etcd, kube-apiserver ($KUBE_VERSION) and kube-controller-manager in $DIR" >&2
  local name
  for name in "${COMPONENTS[@]}"; do
    setpriv --pdeathsig KILL -- "$SCRIPT" _supervise "$DIR" "$name" &
    sups+=($!)
  done

  local started=$SECONDS
  until [ "$(readyz)" = 200 ] && kcm_healthy; do
    if [ $((SECONDS - started)) -gt "${APOLLO_CONTROL_PLANE_TIMEOUT:-120}" ]; then
      echo "control-plane: not ready within ${APOLLO_CONTROL_PLANE_TIMEOUT:-120} s (readyz: $(readyz))" >&2
      for name in "${COMPONENTS[@]}"; do
        echo "----- last lines of $DIR/logs/$name.log" >&2
        tail -n 25 "$DIR/logs/$name.log" >&2 || true
      done
      exit 1
    fi
    sleep 0.2
  done
  touch "$DIR/ready"
  echo "control-plane: ready in $((SECONDS - started)) s at $APISERVER_URL; kubeconfig: $DIR/admin.kubeconfig" >&2
  # Wait for a signal; `wait` returns when one arrives, the traps do the rest.
  while :; do setpriv --pdeathsig KILL sleep 3600 & SLEEPER=$!; wait $SLEEPER || true; done
}

start() {
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  if [ -f "$DIR/pids/run" ] && kill -0 "$(cat "$DIR/pids/run")" 2>/dev/null; then
    die "already running in $DIR (pid $(cat "$DIR/pids/run")); stop it first"
  fi
  # Build in the foreground so its progress shows, then detach.
  kube_bin_dir >/dev/null || die "building the control plane failed"
  rm -f "$DIR/ready" "$DIR/run.exit"
  mkdir -p "$DIR/logs"
  setsid bash -c '"$1" run "$2"; echo $? >"$2/run.exit"' _ "$SCRIPT" "$DIR" \
    >>"$DIR/logs/control-plane.log" 2>&1 </dev/null &
  local started=$SECONDS
  until [ -f "$DIR/ready" ]; do
    if [ -f "$DIR/run.exit" ]; then
      echo "control-plane: failed to start:" >&2
      tail -n 80 "$DIR/logs/control-plane.log" >&2
      exit 1
    fi
    if [ $((SECONDS - started)) -gt $(( ${APOLLO_CONTROL_PLANE_TIMEOUT:-120} + 10 )) ]; then
      tail -n 40 "$DIR/logs/control-plane.log" >&2
      stop; exit 1
    fi
    sleep 0.2
  done
  load_env
  echo "control-plane: ready at $APISERVER_URL"
  echo "  export KUBECONFIG=$DIR/admin.kubeconfig"
  echo "  audit log: $DIR/audit.log; logs: $DIR/logs/; stop: $0 stop $DIR"
}

stop() {
  local pid
  pid=$(cat "$DIR/pids/run" 2>/dev/null || true)
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    echo "control-plane: nothing running in $DIR"
    return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { echo "control-plane: stopped"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  echo "control-plane: killed"
}

status() {
  load_env
  local name pid
  for name in run "${COMPONENTS[@]}"; do
    pid=$(cat "$DIR/pids/$name" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$name: running (pid $pid)"; else echo "$name: not running"; fi
  done
  echo "apiserver: $APISERVER_URL (readyz $(readyz)); kubeconfig: $DIR/admin.kubeconfig"
}

cmd=${1:-}
case $cmd in
  build) kube_bin_dir ;;
  start|stop|run|status|_supervise)
    [ -n "${2:-}" ] || die "usage: $0 $cmd DIR"
    DIR=$2
    case $cmd in
      _supervise) DIR=$(cd "$DIR" && pwd); load_env; supervise "$3" ;;
      *) $cmd ;;
    esac ;;
  *) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
esac

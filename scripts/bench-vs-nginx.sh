#!/usr/bin/env bash
# Apollo side by side with nginx on this machine: the servers pinned to one core (taskset), the
# load (wrk, HTTP/1.1 keep-alive) from the other.
#
#   (a) the gateway's 304 path with HMAC device auth (GET /v1/devices/D/desired, X-Device-Token,
#       If-None-Match)                vs  nginx answering a static file's 304 (If-None-Match)
#   (b) router + 3 gateways over 1,000 devices (every request a different device, each with its
#       own token and ETag)            vs  nginx `hash $uri consistent` proxying to three nginx
#       backends that answer the static file's 304
#
# Both sides run one OS process per server (nginx: worker_processes 1; Apollo: one tokio worker
# thread, TOKIO_WORKER_THREADS=1), all of one side pinned to CPU $SERVER_CPU, wrk to $LOAD_CPU.
# Each pair is measured $ROUNDS times, alternating; the best rate of each side is kept (other work
# on the machine only ever lowers a rate). Prints both rates and the ratio Apollo / nginx, and the
# requests per CPU-second the server processes spent (from /proc): on a machine where other work
# takes part of the server core, that is the rate a whole core would give.
#
# Needs: nginx and wrk (installed from Debian when missing, as root), the Rust toolchain, and the
# real control plane's binaries (scripts/control-plane.sh builds them when missing): the gateway
# serves from its watch cache of DeviceProcesses, so the stack runs on a real kube-apiserver
# (apollo-bench-stack holds the local stack of `apollo-dev` with a fleet and no agents).
#
# Environment: CONNECTIONS (64), THREADS (1), DURATION (10s), ROUNDS (3), DEVICES (1000),
# SERVER_CPU (0), LOAD_CPU (1), WORK (target/bench-vs-nginx), NO_BUILD (set: use the binaries in
# target/release as they are).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
DEVICES=${DEVICES:-1000}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
WORK=${WORK:-$ROOT/target/bench-vs-nginx}

die() { echo "bench-vs-nginx: $*" >&2; exit 1; }
note() { echo "bench-vs-nginx: $*" >&2; }

# --- tools -------------------------------------------------------------------------------------
missing=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root or: apt-get install ${missing[*]}"
  note "installing ${missing[*]} from Debian ..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
source "$ROOT/scripts/lib/ensure-deps.sh"
ensure_redis_server
ensure_control_plane_deps
note "building the control plane's Go binaries when missing ..."
bash "$ROOT/scripts/control-plane.sh" build >/dev/null

if [[ -z ${NO_BUILD:-} ]]; then
  note "building the release binaries ..."
  cargo build --release --quiet -p apollo-gateway -p apollo-router -p apollo-controller \
    -p apollo-loadtest --bins
fi
BIN=${BIN:-$ROOT/target/release}

# --- processes we start, stopped on exit ---------------------------------------------------------
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT

free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
  die "no free port"
}

wait_http() { # url
  for _ in $(seq 1 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done
  die "$1 does not answer"
}

# --- Apollo: the local stack with a fleet, no agents -----------------------------------------------
rm -rf "$WORK"
mkdir -p "$WORK/nginx/www"
note "starting the stack (real control plane, redis, controller, 3 gateways, router) with $DEVICES DeviceProcesses ..."
TOKIO_WORKER_THREADS=1 "$BIN/apollo-bench-stack" --devices "$DEVICES" --gateways 3 --out "$WORK" \
  >"$WORK/bench-stack.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 1200); do
  [[ -f $WORK/stack.env ]] && break
  kill -0 "${PIDS[-1]}" 2>/dev/null || { tail -20 "$WORK/bench-stack.log" >&2; die "the stack exited"; }
  sleep 0.5
done
[[ -f $WORK/stack.env ]] || die "the stack was not ready within 10 minutes ($WORK/bench-stack.log)"
# shellcheck disable=SC1091
source "$WORK/stack.env"
APOLLO_PIDS=("$PID_router" "$PID_gateway_0" "$PID_gateway_1" "$PID_gateway_2")
# Everything else of the stack (control plane, redis, controller, the harness) stays off the
# servers' core; it is idle during the measurement (the 304 path reads no Redis, writes nothing).
for var in $(compgen -v PID_); do
  pid=${!var}
  case " ${APOLLO_PIDS[*]} " in *" $pid "*) taskset -a -p -c "$SERVER_CPU" "$pid" >/dev/null ;;
    *) taskset -a -p -c "$LOAD_CPU" "$pid" >/dev/null ;; esac
done

# (a) one device owned by gateway 0, asked of gateway 0 directly.
read -r DEV TOKEN ETAG _ < <(awk -F'\t' '$4 == "0"' "$WORK/devices.tsv" | head -1)
[[ -n ${DEV:-} ]] || die "no device on gateway 0 in $WORK/devices.tsv"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-Device-Token: $TOKEN" -H "If-None-Match: $ETAG" \
  "http://$GATEWAY_0/v1/devices/$DEV/desired")
[[ $code == 304 ]] || die "gateway 0 answered $code, not 304, for $DEV"
# The document the agents get, served by nginx as a static file of the same size.
curl -s -H "X-Device-Token: $TOKEN" "http://$GATEWAY_0/v1/devices/$DEV/desired" \
  >"$WORK/nginx/www/desired.json"

# --- nginx: one static server, a consistent-hash proxy, three backends -----------------------------
P_STATIC=$(free_port); P_PROXY=$(free_port); P_B=("$(free_port)" "$(free_port)" "$(free_port)")
nginx_conf() { # name body
  cat >"$WORK/nginx/$1.conf" <<EOF
worker_processes 1;
user root;
daemon off;
pid $WORK/nginx/$1.pid;
error_log $WORK/nginx/$1.error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/tmp-$1;
  proxy_temp_path $WORK/nginx/tmp-$1;
  fastcgi_temp_path $WORK/nginx/tmp-$1;
  uwsgi_temp_path $WORK/nginx/tmp-$1;
  scgi_temp_path $WORK/nginx/tmp-$1;
  $2
}
EOF
}
STATIC_SERVER="location / { root $WORK/nginx/www; try_files /desired.json =404; }"
nginx_conf static "server { listen 127.0.0.1:$P_STATIC; $STATIC_SERVER }"
for i in 0 1 2; do
  nginx_conf "backend$i" "server { listen 127.0.0.1:${P_B[$i]}; $STATIC_SERVER }"
done
nginx_conf proxy "upstream backends {
    hash \$uri consistent;
    server 127.0.0.1:${P_B[0]}; server 127.0.0.1:${P_B[1]}; server 127.0.0.1:${P_B[2]};
    keepalive 64;
  }
  server { listen 127.0.0.1:$P_PROXY;
    location / { proxy_pass http://backends; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }"
for name in static backend0 backend1 backend2 proxy; do
  taskset -c "$SERVER_CPU" "$NGINX" -c "$WORK/nginx/$name.conf" -e "$WORK/nginx/$name.error.log" \
    >"$WORK/nginx/$name.out" 2>&1 &
  PIDS+=($!)
done
wait_http "http://127.0.0.1:$P_STATIC/"
wait_http "http://127.0.0.1:$P_PROXY/"
NGINX_ETAG=$(curl -sI "http://127.0.0.1:$P_STATIC/desired.json" | tr -d '\r' | awk -F': ' 'tolower($1)=="etag"{print $2}')
[[ -n $NGINX_ETAG ]] || die "nginx sent no ETag"
code=$(curl -s -o /dev/null -w '%{http_code}' -H "If-None-Match: $NGINX_ETAG" \
  "http://127.0.0.1:$P_PROXY/v1/devices/$DEV/desired")
[[ $code == 304 ]] || die "nginx proxy answered $code, not 304"

# --- wrk scripts ----------------------------------------------------------------------------------
# One request per device, cycled; each wrk thread starts at its own place.
wrk_script() { # file etag-column-or-fixed-etag
  {
    echo "local d = {"
    if [[ $2 == apollo ]]; then
      awk -F'\t' '{ gsub(/"/, "\\\"", $3); printf "{\"/v1/devices/%s/desired\", \"%s\", \"%s\"},\n", $1, $2, $3 }' "$WORK/devices.tsv"
    else
      local tag=${2//\"/\\\"}
      awk -F'\t' -v tag="$tag" '{ printf "{\"/v1/devices/%s/desired\", \"%s\", \"%s\"},\n", $1, $2, tag }' "$WORK/devices.tsv"
    fi
    cat <<'EOF'
}
local reqs = {}
for k, v in ipairs(d) do
  reqs[k] = wrk.format("GET", v[1], { ["X-Device-Token"] = v[2], ["If-None-Match"] = v[3] })
end
local n = #reqs
local i = 0
setup = function(thread) end
init = function(args) math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16)); i = math.random(n) end
request = function() i = i % n + 1; return reqs[i] end
EOF
  } >"$1"
}
wrk_script "$WORK/apollo-fleet.lua" apollo
wrk_script "$WORK/nginx-fleet.lua" "$NGINX_ETAG"

# CPU seconds (user + system) spent so far by the processes given and all their threads; nginx's
# workers are children of the pids given.
TICKS=$(getconf CLK_TCK)
cpu_seconds() {
  local pid total=0 t
  for pid in "$@" $(for p in "$@"; do pgrep -P "$p" || true; done); do
    t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
    total=$((total + t))
  done
  awk -v t="$total" -v hz="$TICKS" 'BEGIN { printf "%.2f", t / hz }'
}

# measure <server pids> -- <wrk args...>: prints "requests/s requests-per-server-CPU-second";
# fails on any non-3xx answer or socket error.
measure() {
  local pids=() out before after
  while [[ $1 != -- ]]; do pids+=("$1"); shift; done
  shift
  before=$(cpu_seconds "${pids[@]}")
  out=$(taskset -c "$LOAD_CPU" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@" 2>&1)
  after=$(cpu_seconds "${pids[@]}")
  echo "$out" >>"$WORK/wrk.log"
  if grep -qE 'Non-2xx or 3xx|Socket errors' <<<"$out"; then
    echo "$out" >&2
    die "errors in a run (above)"
  fi
  awk -v b="$before" -v a="$after" '
    /requests in/ { n = $1 }
    /^Requests\/sec:/ { r = $2 }
    END { printf "%.0f %.0f\n", r, (a - b > 0 ? n / (a - b) : 0) }' <<<"$out"
}
best() { printf '%s\n' "$@" | sort -g | tail -1; }

NGINX_STATIC=$(cat "$WORK/nginx/static.pid")
NGINX_FLEET=("$(cat "$WORK/nginx/proxy.pid")" "$(cat "$WORK/nginx/backend0.pid")"
  "$(cat "$WORK/nginx/backend1.pid")" "$(cat "$WORK/nginx/backend2.pid")")
note "measuring: $ROUNDS rounds of $DURATION each, $CONNECTIONS connections, wrk on CPU $LOAD_CPU, servers on CPU $SERVER_CPU"
declare -A RATE EFF
for round in $(seq 1 "$ROUNDS"); do
  read -r r e < <(measure "$PID_gateway_0" -- -H "X-Device-Token: $TOKEN" -H "If-None-Match: $ETAG" \
    "http://$GATEWAY_0/v1/devices/$DEV/desired")
  RATE[a_apollo]+=" $r"; EFF[a_apollo]+=" $e"
  read -r r e < <(measure "$NGINX_STATIC" -- -H "X-Device-Token: $TOKEN" -H "If-None-Match: $NGINX_ETAG" \
    "http://127.0.0.1:$P_STATIC/v1/devices/$DEV/desired")
  RATE[a_nginx]+=" $r"; EFF[a_nginx]+=" $e"
  read -r r e < <(measure "${APOLLO_PIDS[@]}" -- -s "$WORK/apollo-fleet.lua" "http://$ROUTER")
  RATE[b_apollo]+=" $r"; EFF[b_apollo]+=" $e"
  read -r r e < <(measure "${NGINX_FLEET[@]}" -- -s "$WORK/nginx-fleet.lua" "http://127.0.0.1:$P_PROXY")
  RATE[b_nginx]+=" $r"; EFF[b_nginx]+=" $e"
  note "round $round: req/s (req per server CPU-second): (a) apollo ${RATE[a_apollo]##* } (${EFF[a_apollo]##* }) nginx ${RATE[a_nginx]##* } (${EFF[a_nginx]##* }); (b) apollo ${RATE[b_apollo]##* } (${EFF[b_apollo]##* }) nginx ${RATE[b_nginx]##* } (${EFF[b_nginx]##* })"
done
# shellcheck disable=SC2086
{
  a_apollo=$(best ${RATE[a_apollo]}); a_nginx=$(best ${RATE[a_nginx]})
  b_apollo=$(best ${RATE[b_apollo]}); b_nginx=$(best ${RATE[b_nginx]})
  ea_apollo=$(best ${EFF[a_apollo]}); ea_nginx=$(best ${EFF[a_nginx]})
  eb_apollo=$(best ${EFF[b_apollo]}); eb_nginx=$(best ${EFF[b_nginx]})
}

echo
echo "One server core ($(nproc) cores, 1-minute load $(cut -d' ' -f1 /proc/loadavg) at the end), wrk -t$THREADS -c$CONNECTIONS -d$DURATION, best of $ROUNDS."
echo "req/s is what the server side answered; per CPU-second is requests / CPU time the server"
echo "processes spent (user + system, from /proc), the rate one whole idle core would give."
echo
echo "| pair | Apollo req/s | nginx req/s | ratio | Apollo req per CPU-s | nginx req per CPU-s | ratio |"
echo "|---|---|---|---|---|---|---|"
row() {
  awk -v name="$1" -v a="$2" -v n="$3" -v ea="$4" -v en="$5" 'BEGIN {
    printf "| %s | %.0f | %.0f | %.2fx | %.0f | %.0f | %.2fx |\n", name, a, n, a / n, ea, en, ea / en }'
}
row "(a) gateway 304 with HMAC auth vs nginx static 304" "$a_apollo" "$a_nginx" "$ea_apollo" "$ea_nginx"
row "(b) router + 3 gateways, $DEVICES devices vs nginx hash \$uri consistent + 3 backends" \
  "$b_apollo" "$b_nginx" "$eb_apollo" "$eb_nginx"

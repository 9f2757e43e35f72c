#!/usr/bin/env bash
# bench/run.sh - Tollgate proxy throughput/latency/CPU benchmark against nginx (loopback only).
#
# What it measures, in one run of ROUNDS rounds (the targets alternate inside each round,
# so slow drift of the machine hits all of them alike; medians are reported at the end):
#
#   direct               wrk -> upstream nginx                          127.0.0.1:18080/
#   nginx                wrk -> nginx reverse proxy -> upstream nginx   127.0.0.1:18081/
#   nginx-fwd            wrk -> the same nginx, a server block that also sends what Tollgate
#                        adds to each request (X-Forwarded-For/-Proto/-Host, X-Request-Id)
#                        -> upstream nginx                              127.0.0.1:18083/
#   tollgate             wrk -> Tollgate data plane -> upstream nginx   127.0.0.1:18090/
#   tollgate-auth        wrk -> Tollgate data plane (API-key auth only, no limit) -> upstream
#                                                                       127.0.0.1:18090/auth
#                        (not measured unless named in TARGETS: it shows what the key costs
#                        apart from the limit)
#   tollgate-auth-limit  wrk -> Tollgate data plane (API-key auth + Redis rate limit; every
#                        request decided by the limiter script, batched: the requests queued
#                        while one EVALSHA is in flight go in the next) -> upstream
#                                                                       127.0.0.1:18090/limited
#
#   upstream  nginx, 1 worker, `return 200 "ok"`, keepalive_requests 1000000
#   nginx     1 worker, keepalive_requests 1000000, upstream pool `keepalive 64`,
#             proxy_http_version 1.1, Connection ""
#   nginx-fwd the same worker, plus proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for,
#             X-Forwarded-Proto $scheme, X-Forwarded-Host $host, X-Request-Id $request_id: the
#             same work as Tollgate's plain route (the targets of the issues compare with
#             `nginx`; this one shows how much of the gap is those headers, at the proxy and at
#             the upstream, which parses them on the same core)
#   tollgate  `tollgate data-plane` with TOLLGATE_WORKER_THREADS=1, configured by a
#             `tollgate control-plane` (embedded SQLite, admin 18091, cluster 18095,
#             data-plane status 18092) with one upstream and one route `/`.
#   tollgate-auth  the same data plane process, route `bench-auth` on `/auth` with
#             `auth: {api_key: {}}`, consumer `bench` with one API key sent by wrk as `X-API-Key`.
#   tollgate-auth-limit  the same data plane process, route `bench-limited` on `/limited`
#             with `auth: {api_key: {}}` and `rate_limit: {requests: 1e9, window_seconds: 1,
#             by: consumer}` (an exact sliding window: per consumer, a sorted set of the
#             milliseconds holding admissions and a hash of counts per millisecond; never full
#             here), consumer `bench` with one API key sent by wrk as `X-API-Key`.
#             The data plane then runs with TOLLGATE_REDIS_URL=redis://127.0.0.1:18379/0 and
#             TOLLGATE_REDIS_PREFIX=bench (and TOLLGATE_REDIS_TIMEOUT_MS=$REDIS_TIMEOUT_MS, 100 by
#             default) against a redis-server started here (127.0.0.1:18379,
#             no persistence). Only started when this target is selected; the machine's own
#             Redis (6379) is never used. TOLLGATE_LIMITER_PACING stays at its default, `auto`,
#             which paces the limiter's calls because this Redis is on loopback (see
#             data-plane/src/pacing.rs); set it in the environment to `off` to compare.
#
#   Every server (upstream, nginx proxy, Tollgate control plane and data plane, redis-server)
#   is pinned to CPU $SERVER_CPU with taskset; wrk (`wrk -t1 -c$CONNS -d${DUR}s --latency`) to
#   $CLIENT_CPU.
#
# Per run it prints requests/s, p50 and p99 latency (ms), wrk errors / non-2xx responses, and
# CPU-microseconds per request of the proxy (utime+stime of the proxy process and its children,
# from /proc/<pid>/stat, * 1e6 / CLK_TCK / requests reported by wrk) and of the upstream.
# For tollgate-auth-limit also: CPU-us per request of redis-server (same /proc method),
# Redis commands per request (sum of `calls=` of every cmdstat line of `INFO commandstats`
# except `info` itself, after minus before the wrk run, / requests; the limiter script's
# ZRANGEBYSCORE/HMGET/HSET/ZADD/... count too), script calls per request
# (evalsha + eval) and requests the data plane decided by its failure policy instead of Redis
# (delta of tollgate_limiter_degraded_total; must stay 0). And `steal%`: the share of the
# servers' CPU the hypervisor gave to other guests during the run (/proc/stat); on a shared
# virtual machine a run with high steal measured a slower machine, so compare only runs with
# low steal.
# The final table holds the medians and the ratios tollgate/nginx and
# tollgate-auth-limit/nginx (rps and CPU-us/req).
#
# Usage:  bench/run.sh                      (as root on Debian: installs nginx, wrk and, for
#                                            tollgate-auth-limit, redis-server if missing)
# Knobs (environment variables):
#   TARGETS="direct nginx nginx-fwd tollgate tollgate-auth-limit"   targets measured, in order
#                   (tollgate-auth can be added)
#   ROUNDS=3        rounds (each round runs every target once)
#   DUR=10          seconds per wrk run
#   CONNS=50        wrk connections
#   WARMUP=2        seconds of unmeasured load per target before the first round (0 = none)
#   SERVER_CPU=0    CPU the servers are pinned to
#   CLIENT_CPU=1    CPU wrk is pinned to
#   BENCH_DIR=...   results dir (default /tmp/tollgate-bench/results/<timestamp>): configs, logs,
#                   raw wrk outputs, runs.txt (one line per run) and table.txt
#   CARGO_TARGET_DIR  where the tollgate binary is looked for / built (default <repo>/target)
#   TOLLGATE_BIN=...  use this binary instead (no build)
#   SKIP_INSTALL=1  never call apt-get
#   PORT_OFFSET=0   added to every port below (0-999), when another instance holds them
#   REDIS_TIMEOUT_MS=100  the data plane's Redis timeout for tollgate-auth-limit
#   INSTRUCTIONS=1  afterwards, count user-space instructions per request of each proxy with
#                   valgrind's callgrind (installed if missing): repeatable where timings are
#                   not (see the section "instructions" below); IR_WARMUP=3 and IR_DUR=5
#                   seconds per target, IR_CONNS=4 wrk connections (more batch the limiter's
#                   Redis calls as under the timed load, at valgrind's latency)
#
# Not a test: CI does not run it. Ports used (+ PORT_OFFSET): 18080 18081 18083 18090 18091 18092 18095,
# and 18379 (redis-server) with tollgate-auth-limit (all must be free; the script refuses to start
# otherwise). Everything it starts is stopped by PID at exit.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DUR=${DUR:-10}
CONNS=${CONNS:-50}
WARMUP=${WARMUP:-2}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
BENCH_DIR=${BENCH_DIR:-/tmp/tollgate-bench/results/$(date +%Y%m%d-%H%M%S)}

PORT_OFFSET=${PORT_OFFSET:-0}
[[ "$PORT_OFFSET" =~ ^[0-9]+$ ]] && ((PORT_OFFSET < 1000)) ||
  { echo "error: PORT_OFFSET must be a number from 0 to 999" >&2; exit 1; }
UPSTREAM_PORT=$((18080 + PORT_OFFSET))
NGINX_PORT=$((18081 + PORT_OFFSET))
NGINX_FWD_PORT=$((18083 + PORT_OFFSET))
TG_PROXY_PORT=$((18090 + PORT_OFFSET))
TG_ADMIN_PORT=$((18091 + PORT_OFFSET))
TG_STATUS_PORT=$((18092 + PORT_OFFSET))
TG_CLUSTER_PORT=$((18095 + PORT_OFFSET))
REDIS_PORT=$((18379 + PORT_OFFSET)) # never the machine's Redis (6379)
read -r -a TARGETS <<<"${TARGETS:-direct nginx nginx-fwd tollgate tollgate-auth-limit}"
((${#TARGETS[@]} > 0)) || { echo 'error: TARGETS is empty' >&2; exit 1; }
WITH_REDIS=""
WITH_KEY=""
for t in "${TARGETS[@]}"; do
  case $t in
    direct | nginx | nginx-fwd | tollgate) ;;
    tollgate-auth) WITH_KEY=1 ;;
    tollgate-auth-limit) WITH_KEY=1 WITH_REDIS=1 ;;
    *) printf 'error: unknown target %s (known: direct nginx nginx-fwd tollgate tollgate-auth tollgate-auth-limit)\n' "$t" >&2; exit 1 ;;
  esac
done

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '>> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------------------------ tools
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  [[ -z "${SKIP_INSTALL:-}" ]] || die "nginx and wrk are needed (SKIP_INSTALL is set)"
  log "installing nginx and wrk"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y nginx wrk
fi
if [[ -n "$WITH_REDIS" ]] && ! command -v redis-server >/dev/null; then
  [[ -z "${SKIP_INSTALL:-}" ]] || die "redis-server is needed for tollgate-auth-limit (SKIP_INSTALL is set)"
  log "installing redis-server"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server
fi
for tool in nginx wrk taskset curl awk getconf od sed ${WITH_REDIS:+redis-server redis-cli}; do
  command -v "$tool" >/dev/null || die "missing tool: $tool"
done

# ------------------------------------------------------------------------------------ tollgate binary
if [[ -n "${TOLLGATE_BIN:-}" ]]; then
  [[ -x "$TOLLGATE_BIN" ]] || die "TOLLGATE_BIN=$TOLLGATE_BIN is not executable"
else
  target_dir=${CARGO_TARGET_DIR:-target}
  [[ "$target_dir" == /* ]] || target_dir=$REPO_ROOT/$target_dir
  TOLLGATE_BIN=$target_dir/release/tollgate
  if [[ ! -x "$TOLLGATE_BIN" ]]; then
    log "building $TOLLGATE_BIN (cargo build --release)"
    (cd "$REPO_ROOT" && CARGO_TARGET_DIR=$target_dir cargo build --release)
  fi
  [[ -x "$TOLLGATE_BIN" ]] || die "no tollgate binary at $TOLLGATE_BIN after the build"
fi

# ------------------------------------------------------------------------------------ dirs, ports
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in "$UPSTREAM_PORT" "$NGINX_PORT" "$NGINX_FWD_PORT" "$TG_PROXY_PORT" "$TG_ADMIN_PORT" "$TG_STATUS_PORT" \
  "$TG_CLUSTER_PORT" ${WITH_REDIS:+"$REDIS_PORT"}; do
  if port_busy "$port"; then die "127.0.0.1:$port is already in use (a previous run still alive?)"; fi
done

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
CONF=$BENCH_DIR/conf
LOGS=$BENCH_DIR/logs
RAW=$BENCH_DIR/raw
mkdir -p "$CONF" "$LOGS" "$RAW"
rm -f "$RAW"/*.txt "$BENCH_DIR/runs.txt" "$BENCH_DIR/table.txt"
STATE=$(mktemp -d /tmp/tollgate-bench-state.XXXXXX) # nginx temp paths, Tollgate data dirs
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ------------------------------------------------------------------------------------ start / stop
STARTED=() # PIDs, in start order
declare -A PID
cleanup() {
  local i p
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do kill -TERM "${STARTED[i]}" 2>/dev/null || true; done
  for p in "${STARTED[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  rm -rf "$STATE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD... : runs CMD pinned to SERVER_CPU in the background, output to logs/NAME.log.
# taskset and env exec their command, so $! is the server's own PID.
start() {
  local name=$1
  shift
  taskset -c "$SERVER_CPU" "$@" >"$LOGS/$name.log" 2>&1 &
  PID[$name]=$!
  STARTED+=("$!")
}

# wait_for DESC SECONDS CHECK-CMD... : polls CHECK-CMD every 0.2 s; fails early when a server
# started here has exited.
wait_for() {
  local desc=$1 secs=$2 i name why=""
  shift 2
  for ((i = 0; i < secs * 5; i++)); do
    if "$@"; then return 0; fi
    for name in "${!PID[@]}"; do
      kill -0 "${PID[$name]}" 2>/dev/null || why="$name exited"
    done
    [[ -z "$why" ]] || break
    sleep 0.2
  done
  log "gave up waiting for $desc (${why:-timeout}); last lines of the logs:"
  tail -n 20 "$LOGS"/*.log >&2 || true
  exit 1
}
answers_ok() { [[ "$(curl -s -m 1 "$1" 2>/dev/null)" == ok ]]; }
http_200() { [[ "$(curl -s -m 1 -o /dev/null -w '%{http_code}' "$1" 2>/dev/null)" == 200 ]]; }
# status_of URL [CURL-ARGS...]: the HTTP status code (000 when there is no answer)
status_of() { curl -s -m 2 -o /dev/null -w '%{http_code}' "${@:2}" "$1" 2>/dev/null || true; }
# Only ever our own redis-server: -h/-p are always given.
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

# ------------------------------------------------------------------------------------ nginx configs
mkdir -p "$STATE/nginx-upstream" "$STATE/nginx-proxy"
cat >"$CONF/upstream-nginx.conf" <<EOF
# upstream: one worker answering a constant 2-byte body
worker_processes 1;
daemon off;
pid $STATE/nginx-upstream/nginx.pid;
error_log $LOGS/upstream-nginx.error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    default_type text/plain;
    client_body_temp_path $STATE/nginx-upstream/body;
    proxy_temp_path $STATE/nginx-upstream/proxy;
    fastcgi_temp_path $STATE/nginx-upstream/fastcgi;
    uwsgi_temp_path $STATE/nginx-upstream/uwsgi;
    scgi_temp_path $STATE/nginx-upstream/scgi;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT backlog=4096;
        location / { return 200 "ok"; }
    }
}
EOF
cat >"$CONF/proxy-nginx.conf" <<EOF
# nginx reverse proxy: one worker, keep-alive pool towards the upstream
worker_processes 1;
daemon off;
pid $STATE/nginx-proxy/nginx.pid;
error_log $LOGS/proxy-nginx.error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    client_body_temp_path $STATE/nginx-proxy/body;
    proxy_temp_path $STATE/nginx-proxy/proxy;
    fastcgi_temp_path $STATE/nginx-proxy/fastcgi;
    uwsgi_temp_path $STATE/nginx-proxy/uwsgi;
    scgi_temp_path $STATE/nginx-proxy/scgi;
    upstream bench_upstream {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
    server {
        listen 127.0.0.1:$NGINX_FWD_PORT backlog=4096;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Forwarded-Host \$host;
            proxy_set_header X-Request-Id \$request_id;
        }
    }
}
EOF
for c in upstream-nginx proxy-nginx; do
  nginx -q -t -p "$STATE" -c "$CONF/$c.conf" >"$LOGS/$c.configtest.log" 2>&1 ||
    { cat "$LOGS/$c.configtest.log" >&2; die "nginx rejected $CONF/$c.conf"; }
done

# ------------------------------------------------------------------------------------ start servers
log "results in $BENCH_DIR"
start upstream nginx -p "$STATE" -c "$CONF/upstream-nginx.conf"
start nginx nginx -p "$STATE" -c "$CONF/proxy-nginx.conf"
wait_for "upstream nginx" 10 answers_ok "http://127.0.0.1:$UPSTREAM_PORT/"
wait_for "nginx proxy" 10 answers_ok "http://127.0.0.1:$NGINX_PORT/"
wait_for "nginx proxy (forwarding headers)" 10 answers_ok "http://127.0.0.1:$NGINX_FWD_PORT/"

if [[ -n "$WITH_REDIS" ]]; then
  mkdir -p "$STATE/redis"
  start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize no --dir "$STATE/redis"
  redis_up() { [[ "$(rcli PING 2>/dev/null)" == PONG ]]; }
  wait_for "redis-server on $REDIS_PORT" 10 redis_up
fi

token() { printf 'bench-%s' "$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"; }
ADMIN_TOKEN=$(token)
CLUSTER_TOKEN=$(token)
mkdir -p "$STATE/cp" "$STATE/dp"

start control-plane env \
  TOLLGATE_DATA_DIR="$STATE/cp" \
  TOLLGATE_ADMIN_LISTEN="127.0.0.1:$TG_ADMIN_PORT" \
  TOLLGATE_CLUSTER_LISTEN="127.0.0.1:$TG_CLUSTER_PORT" \
  TOLLGATE_ADMIN_TOKEN="$ADMIN_TOKEN" \
  TOLLGATE_CLUSTER_TOKEN="$CLUSTER_TOKEN" \
  TOLLGATE_LOG=warn \
  "$TOLLGATE_BIN" control-plane
admin_up() {
  [[ "$(curl -s -m 1 -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $ADMIN_TOKEN" \
    "http://127.0.0.1:$TG_ADMIN_PORT/admin/v1/status" 2>/dev/null)" == 200 ]]
}
wait_for "tollgate control plane (admin API)" 30 admin_up

ADMIN_BODY=""
admin_post() { # PATH JSON  (the response body is left in ADMIN_BODY)
  local out code
  out=$(curl -s -m 5 -w '\n%{http_code}' -X POST "http://127.0.0.1:$TG_ADMIN_PORT/admin/v1/$1" \
    -H "Authorization: Bearer $ADMIN_TOKEN" -H 'Content-Type: application/json' -d "$2")
  code=${out##*$'\n'}
  printf 'POST /admin/v1/%s -> %s\n%s\n' "$1" "$code" "${out%$'\n'*}" >>"$LOGS/admin-api.log"
  [[ "$code" == 2* ]] || die "POST /admin/v1/$1 answered $code: ${out%$'\n'*}"
  ADMIN_BODY=${out%$'\n'*}
}
admin_post upstreams "{\"name\":\"bench\",\"targets\":[{\"url\":\"http://127.0.0.1:$UPSTREAM_PORT\"}]}"
admin_post routes '{"name":"bench","paths":["/"],"upstream":"bench"}'
API_KEY=""
REDIS_ENV=()
if [[ -n "$WITH_KEY" ]]; then
  admin_post consumers '{"username":"bench"}'
  admin_post consumers/bench/keys '{}'
  API_KEY=$(sed -n 's/.*"key" *: *"\(tg_[^"]*\)".*/\1/p' <<<"$ADMIN_BODY")
  [[ -n "$API_KEY" ]] || die "no key (tg_...) in the answer of POST /admin/v1/consumers/bench/keys"
  admin_post routes '{"name":"bench-auth","paths":["/auth"],"upstream":"bench","auth":{"api_key":{}}}'
fi
if [[ -n "$WITH_REDIS" ]]; then
  admin_post routes '{"name":"bench-limited","paths":["/limited"],"upstream":"bench","auth":{"api_key":{}},"rate_limit":{"requests":1000000000,"window_seconds":1,"by":"consumer"}}'
  # Redis shares one saturated core with the data plane and the upstream here, so the scheduler
  # alone can hold an answer back for several milliseconds: a timeout of 100 ms (instead of the
  # default 10 ms, meant for a Redis with a core of its own) keeps every request decided by
  # Redis, which the `degraded` column checks.
  REDIS_ENV=(TOLLGATE_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" TOLLGATE_REDIS_PREFIX=bench
    TOLLGATE_REDIS_TIMEOUT_MS="${REDIS_TIMEOUT_MS:-100}")
fi

# start_data_plane NAME [WRAPPER...]: the data plane, run by WRAPPER (valgrind) when given.
start_data_plane() {
  start "$1" env \
    TOLLGATE_CONTROL_PLANE_URL="http://127.0.0.1:$TG_CLUSTER_PORT" \
    TOLLGATE_CLUSTER_TOKEN="$CLUSTER_TOKEN" \
    TOLLGATE_PROXY_LISTEN="127.0.0.1:$TG_PROXY_PORT" \
    TOLLGATE_STATUS_LISTEN="127.0.0.1:$TG_STATUS_PORT" \
    TOLLGATE_DATA_DIR="$STATE/dp" \
    TOLLGATE_WORKER_THREADS=1 \
    TOLLGATE_LOG=warn \
    ${REDIS_ENV[@]+"${REDIS_ENV[@]}"} \
    "${@:2}" "$TOLLGATE_BIN" data-plane
  wait_for "tollgate data plane /readyz" 120 http_200 "http://127.0.0.1:$TG_STATUS_PORT/readyz"
  wait_for "tollgate proxy answering ok" 60 answers_ok "http://127.0.0.1:$TG_PROXY_PORT/"
}
start_data_plane tollgate

# redis_calls: "ALL SCRIPT" - summed calls= of every cmdstat line except info (ALL) and of
# evalsha + eval (SCRIPT), from INFO commandstats of our redis-server.
redis_calls() {
  rcli INFO commandstats | tr -d '\r' | awk -F'[:=,]' '
    /^cmdstat_/ { n = $1; sub(/^cmdstat_/, "", n)
                  if (n != "info") all += $3
                  if (n == "evalsha" || n == "eval") script += $3 }
    END { printf "%d %d\n", all, script }'
}
# degraded: tollgate_limiter_degraded_total of the data plane (requests decided without Redis)
degraded() {
  curl -s -m 2 "http://127.0.0.1:$TG_STATUS_PORT/metrics" |
    awk '$1 == "tollgate_limiter_degraded_total" {print $2; found = 1} END {if (!found) print "nan"}'
}

declare -A URL=(
  [direct]="http://127.0.0.1:$UPSTREAM_PORT/"
  [nginx]="http://127.0.0.1:$NGINX_PORT/"
  [nginx-fwd]="http://127.0.0.1:$NGINX_FWD_PORT/"
  [tollgate]="http://127.0.0.1:$TG_PROXY_PORT/"
  [tollgate-auth]="http://127.0.0.1:$TG_PROXY_PORT/auth"
  [tollgate-auth-limit]="http://127.0.0.1:$TG_PROXY_PORT/limited"
)
declare -A PROXY_PID=([direct]="" [nginx]="${PID[nginx]}" [nginx-fwd]="${PID[nginx]}"
  [tollgate]="${PID[tollgate]}"
  [tollgate-auth]="${PID[tollgate]}" [tollgate-auth-limit]="${PID[tollgate]}")
declare -A WRK_HEADER=([direct]="" [nginx]="" [nginx-fwd]="" [tollgate]="" [tollgate-auth]=""
  [tollgate-auth-limit]="")
[[ -z "$WITH_KEY" ]] || WRK_HEADER[tollgate-auth]="X-API-Key: $API_KEY"

if [[ -n "$WITH_REDIS" ]]; then
  WRK_HEADER[tollgate-auth-limit]="X-API-Key: $API_KEY"
  # The data plane connects to Redis in the background after it is ready, and a limit whose
  # store is unreachable fails open (200 without any Redis call): wait until a keyed request
  # is answered 200 *and* reached Redis.
  limited_ok_via_redis() {
    local before after
    read -r _ before <<<"$(redis_calls)"
    [[ "$(curl -s -m 1 -H "X-API-Key: $API_KEY" "${URL[tollgate-auth-limit]}" 2>/dev/null)" == ok ]] || return 1
    read -r _ after <<<"$(redis_calls)"
    ((after > before))
  }
  wait_for "tollgate /limited answering ok with the key, through Redis" 60 limited_ok_via_redis
  code=$(status_of "${URL[tollgate-auth-limit]}")
  [[ "$code" == 401 ]] || die "tollgate /limited without a key answered $code, expected 401"
  code=$(status_of "${URL[tollgate-auth-limit]}" -H "X-API-Key: tg_not-a-real-key")
  [[ "$code" == 401 ]] || die "tollgate /limited with a wrong key answered $code, expected 401"
  code=$(status_of "${URL[tollgate-auth-limit]}" -H "X-API-Key: $API_KEY")
  [[ "$code" == 200 ]] || die "tollgate /limited with the key answered $code, expected 200"
  log "tollgate /limited: 200 with the key (through Redis), 401 without it or with a wrong one"
fi

# ------------------------------------------------------------------------------------ measuring
HZ=$(getconf CLK_TCK)

# cpu_ticks PID: utime+stime of PID (all its threads) plus its direct children (nginx workers).
# Fields are counted from the end of the comm field, which may contain spaces.
cpu_ticks() {
  local total=0 p stat rest f
  # shellcheck disable=SC2046 # word splitting of the children lists is wanted
  for p in "$1" $(cat /proc/"$1"/task/*/children 2>/dev/null); do
    stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    rest=${stat##*) }
    # rest starts at field 3 (state); utime and stime are fields 14 and 15
    read -r -a f <<<"$rest"
    total=$((total + f[11] + f[12]))
  done
  echo "$total"
}

# to_ms VALUE: wrk latency ("812.00us", "1.23ms", "1.01s") in milliseconds
to_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
    else printf "nan" }'
}

per_req_us() { # TICKS REQUESTS
  awk -v t="$1" -v n="$2" -v hz="$HZ" 'BEGIN { if (n > 0) printf "%.2f", t * 1e6 / hz / n; else printf "nan" }'
}

per_req() { # COUNT REQUESTS
  awk -v c="$1" -v n="$2" 'BEGIN { if (n > 0 && c != "nan") printf "%.3f", c / n; else printf "nan" }'
}

run_wrk() { # TARGET SECONDS OUTFILE [--latency]
  local header=()
  [[ -z "${WRK_HEADER[$1]}" ]] || header=(-H "${WRK_HEADER[$1]}")
  taskset -c "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"$2s" ${header[@]+"${header[@]}"} "${@:4}" "${URL[$1]}" \
    >"$3" 2>&1 || { cat "$3" >&2; die "wrk failed against $1"; }
}

if ((WARMUP > 0)); then
  log "warm-up: ${WARMUP}s per target"
  for t in "${TARGETS[@]}"; do run_wrk "$t" "$WARMUP" "$RAW/warmup-$t.txt"; done
fi

log "host: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
log "$(nginx -v 2>&1), $(wrk -v 2>&1 | awk 'NR == 1 {print $1, $2}'), tollgate: $TOLLGATE_BIN"
[[ -z "$WITH_REDIS" ]] || log "redis-server $(rcli INFO server | tr -d '\r' | awk -F: '$1 == "redis_version" {print $2}') on 127.0.0.1:$REDIS_PORT"
log "servers on CPU $SERVER_CPU, wrk -t1 -c$CONNS -d${DUR}s --latency on CPU $CLIENT_CPU, $ROUNDS rounds"

RUNS=$BENCH_DIR/runs.txt
# server_cpu_ticks: "STEAL ALL" ticks of the servers' CPU from /proc/stat. Steal is time the
# hypervisor gave this virtual CPU to someone else: a run with much of it measured a slower
# machine, whatever the target.
server_cpu_ticks() {
  awk -v cpu="cpu$SERVER_CPU" '$1 == cpu { all = 0; for (i = 2; i <= NF; i++) all += $i
    print $9, all }' /proc/stat
}
echo "round target rps p50_ms p99_ms proxy_cpu_us_per_req upstream_cpu_us_per_req requests errors" \
  "redis_cpu_us_per_req redis_cmds_per_req redis_script_calls_per_req limiter_degraded" \
  "server_cpu_steal_pct" >"$RUNS"
ROW='%-5s %-19s %10s %8s %8s %14s %14s %12s %14s %11s %8s %6s  %s\n'
# shellcheck disable=SC2059 # the format is ROW
printf "$ROW" round target rps p50_ms p99_ms proxy_us/req upstream_us/req redis_us/req \
  redis_cmds/req evalsha/req degraded steal% errors
# Odd rounds run the targets in the given order, even rounds in reverse: a machine that speeds
# up or slows down during a round favours no target over a whole run.
REVERSED=()
for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do REVERSED+=("${TARGETS[i]}"); done
for ((r = 1; r <= ROUNDS; r++)); do
  order=("${TARGETS[@]}")
  ((r % 2)) || order=("${REVERSED[@]}")
  for t in "${order[@]}"; do
    out=$RAW/$t.round$r.txt
    pp=${PROXY_PID[$t]}
    with_redis=""
    [[ "$t" != tollgate-auth-limit ]] || with_redis=1
    p0=0
    [[ -z "$pp" ]] || p0=$(cpu_ticks "$pp")
    u0=$(cpu_ticks "${PID[upstream]}")
    read -r st0 all0 <<<"$(server_cpu_ticks)"
    if [[ -n "$with_redis" ]]; then
      r0=$(cpu_ticks "${PID[redis]}")
      read -r c0 s0 <<<"$(redis_calls)"
      d0=$(degraded)
    fi
    run_wrk "$t" "$DUR" "$out" --latency
    p1=0
    [[ -z "$pp" ]] || p1=$(cpu_ticks "$pp")
    u1=$(cpu_ticks "${PID[upstream]}")
    read -r st1 all1 <<<"$(server_cpu_ticks)"
    steal=$(awk -v s=$((st1 - st0)) -v a=$((all1 - all0)) 'BEGIN { if (a > 0) printf "%.1f", 100 * s / a; else print "nan" }')
    rcpu=- rcmds=- rscripts=- rdeg=-
    if [[ -n "$with_redis" ]]; then
      r1=$(cpu_ticks "${PID[redis]}")
      read -r c1 s1 <<<"$(redis_calls)"
      d1=$(degraded)
      rdeg=$(awk -v a="$d0" -v b="$d1" 'BEGIN { if (a == "nan" || b == "nan") print "nan"; else print b - a }')
    fi

    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    p50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
    nreq=$(awk '/ requests in / {print $1}' "$out")
    errors=$(awk '/Socket errors|Non-2xx/ {sub(/^ +/, ""); s = s (s == "" ? "" : "; ") $0}
      END {print (s == "" ? "none" : s)}' "$out")
    pcpu=-
    [[ -z "$pp" ]] || pcpu=$(per_req_us $((p1 - p0)) "$nreq")
    ucpu=$(per_req_us $((u1 - u0)) "$nreq")
    if [[ -n "$with_redis" ]]; then
      rcpu=$(per_req_us $((r1 - r0)) "$nreq")
      rcmds=$(per_req $((c1 - c0)) "$nreq")
      rscripts=$(per_req $((s1 - s0)) "$nreq")
    fi
    # shellcheck disable=SC2059 # the format is ROW
    printf "$ROW" "$r" "$t" "$rps" "$p50" "$p99" "$pcpu" "$ucpu" "$rcpu" "$rcmds" "$rscripts" "$rdeg" "$steal" "$errors"
    echo "$r $t $rps $p50 $p99 $pcpu $ucpu $nreq ${errors// /_} $rcpu $rcmds $rscripts $rdeg $steal" >>"$RUNS"
  done
done

# ------------------------------------------------------------------------------------ summary
median_of() { # TARGET COLUMN (of runs.txt)
  awk -v t="$1" -v c="$2" 'NR > 1 && $2 == t && $c != "-" && $c != "nan" {print $c}' "$RUNS" |
    sort -g | awk '{v[NR] = $1} END {
      if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }
# TARGET COLUMN [BASE]: the ratio TARGET/BASE (nginx by default) of COLUMN within each round
# (both ran seconds apart, so the drift of a shared machine mostly cancels out), as
# "median (min-max over N rounds); mean G, 95% CI L-H": G is the geometric mean of the
# rounds' ratios and L-H its 95% confidence interval (Student's t on the logarithms), so a
# target is met only when the whole interval is on the right side of it.
paired() {
  awk -v t="$1" -v c="$2" -v b="${3:-nginx}" 'NR > 1 && $2 == b && $c + 0 > 0 {base[$1] = $c}
    NR > 1 && $2 == t && $c + 0 > 0 {value[$1] = $c}
    END {for (r in value) if (r in base) print value[r] / base[r]}' "$RUNS" |
    sort -g | awk '{v[NR] = $1; l = log($1); s += l; ss += l * l} END {
      if (NR == 0) {print "-"; exit}
      m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      printf "%.2f (%.2f-%.2f over %d rounds)", m, v[1], v[NR], NR
      if (NR < 3) exit
      mean = s / NR; var = (ss - NR * mean * mean) / (NR - 1); if (var < 0) var = 0
      # two-sided 95% t quantiles by degrees of freedom (n - 1), rounded down to the nearest listed
      df = NR - 1
      t = df >= 120 ? 1.98 : df >= 60 ? 2.00 : df >= 40 ? 2.02 : df >= 30 ? 2.04 : df >= 20 ? 2.09 \
        : df >= 15 ? 2.13 : df >= 10 ? 2.23 : df >= 7 ? 2.36 : df >= 5 ? 2.57 : df >= 3 ? 3.18 : 4.30
      half = t * sqrt(var / NR)
      printf "; mean %.2f, 95%% CI %.2f-%.2f", exp(mean), exp(mean - half), exp(mean + half) }'
}

fmt() { # PRINTF-FORMAT VALUE: VALUE formatted, or as is when it is not a number ("-")
  awk -v f="$1" -v v="$2" 'BEGIN { if (v ~ /^-?[0-9.]+([eE][-+]?[0-9]+)?$/) printf f, v; else printf "%s", v }'
}
sum() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-") print "-"; else print a + b }'; }

declare -A MED_RPS MED_CPU MED_RCPU
for t in direct nginx nginx-fwd tollgate tollgate-auth tollgate-auth-limit; do MED_RPS[$t]=- MED_CPU[$t]=- MED_RCPU[$t]=-; done
{
  echo
  echo "medians of $ROUNDS x ${DUR}s runs (wrk -t1 -c$CONNS; servers on CPU $SERVER_CPU, wrk on CPU $CLIENT_CPU)"
  printf '%-19s %10s %8s %8s %14s %16s %12s %14s %11s\n' target rps p50_ms p99_ms proxy_us/req \
    upstream_us/req redis_us/req redis_cmds/req evalsha/req
  for t in "${TARGETS[@]}"; do
    MED_RPS[$t]=$(median_of "$t" 3)
    MED_CPU[$t]=$(median_of "$t" 6)
    MED_RCPU[$t]=$(median_of "$t" 10)
    printf '%-19s %10s %8s %8s %14s %16s %12s %14s %11s\n' "$t" "$(fmt %.0f "${MED_RPS[$t]}")" \
      "$(fmt %.3f "$(median_of "$t" 4)")" "$(fmt %.3f "$(median_of "$t" 5)")" "${MED_CPU[$t]}" \
      "$(median_of "$t" 7)" "${MED_RCPU[$t]}" "$(median_of "$t" 11)" "$(median_of "$t" 12)"
  done
  echo "tollgate/nginx rps:                                  $(ratio "${MED_RPS[tollgate]}" "${MED_RPS[nginx]}")"
  echo "tollgate/nginx CPU-us/req:                           $(ratio "${MED_CPU[tollgate]}" "${MED_CPU[nginx]}")"
  for t in tollgate tollgate-auth tollgate-auth-limit; do
    [[ " ${TARGETS[*]} " == *" $t "* && " ${TARGETS[*]} " == *" nginx "* ]] || continue
    printf '%-52s %s\n' "$t/nginx rps, paired per round:" "$(paired "$t" 3)"
    printf '%-52s %s\n' "$t/nginx CPU-us/req, paired per round:" "$(paired "$t" 6)"
  done
  if [[ " ${TARGETS[*]} " == *" tollgate "* && " ${TARGETS[*]} " == *" nginx-fwd "* ]]; then
    printf '%-52s %s\n' "tollgate/nginx-fwd rps, paired per round:" "$(paired tollgate 3 nginx-fwd)"
    printf '%-52s %s\n' "tollgate/nginx-fwd CPU-us/req, paired per round:" "$(paired tollgate 6 nginx-fwd)"
  fi
  if [[ -n "$WITH_REDIS" ]]; then
    echo "tollgate-auth-limit/nginx rps:                       $(ratio "${MED_RPS[tollgate-auth-limit]}" "${MED_RPS[nginx]}")"
    echo "tollgate-auth-limit/nginx CPU-us/req (proxy):        $(ratio "${MED_CPU[tollgate-auth-limit]}" "${MED_CPU[nginx]}")"
    echo "tollgate-auth-limit/nginx CPU-us/req (proxy+redis):  $(ratio "$(sum "${MED_CPU[tollgate-auth-limit]}" "${MED_RCPU[tollgate-auth-limit]}")" "${MED_CPU[nginx]}")"
  fi
  echo "(CPU-us/req = utime+stime of the proxy process tree / of the upstream nginx / of redis-server,"
  echo " per request; redis_cmds/req = all commands Redis executed, those inside the limiter script"
  echo " included; evalsha/req = script calls (evalsha + eval); proxy+redis = sum of the two medians)"
} | tee "$BENCH_DIR/table.txt"

if awk 'NR > 1 && $9 != "none" {found = 1} END {exit !found}' "$RUNS"; then
  log "WARNING: some runs had socket errors or non-2xx responses (see $RUNS)"
fi
if awk 'NR > 1 && $2 == "tollgate-auth-limit" && ($13 != 0 || $12 <= 0) {found = 1} END {exit !found}' "$RUNS"; then
  log "WARNING: some tollgate-auth-limit requests did not reach Redis (limiter_degraded > 0 or" \
    "no script call at all; see $RUNS)"
fi

# ------------------------------------------------------------------------------------ instructions
# INSTRUCTIONS=1: user-space instructions per request of each proxy, counted by valgrind's
# callgrind. Unlike time, the count does not depend on what else the machine (or the
# hypervisor) is doing: the same binary under the same load counts the same to about 1%, so
# it compares builds and proxies on a noisy virtual machine where rps and CPU-us do not.
# Kernel time (syscalls, TCP) is not counted. The nginx proxy and the data plane are
# restarted under valgrind (nginx with master_process off, so that its one process is the
# worker), each target is loaded for IR_WARMUP seconds, then counted over IR_DUR seconds of
# wrk -t1 -c$IR_CONNS (valgrind runs about 50x slower: the default 4 connections keep the
# latency sane).
if [[ -n "${INSTRUCTIONS:-}" ]]; then
  if ! command -v valgrind >/dev/null; then
    [[ -z "${SKIP_INSTALL:-}" ]] || die "valgrind is needed for INSTRUCTIONS=1 (SKIP_INSTALL is set)"
    log "installing valgrind"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y valgrind
  fi
  IR_WARMUP=${IR_WARMUP:-3}
  IR_DUR=${IR_DUR:-5}
  IR_CONNS=${IR_CONNS:-4}
  IR_OUT=$BENCH_DIR/callgrind
  mkdir -p "$IR_OUT"
  stop() { # NAME: stops a server started here and waits for it to exit
    kill -TERM "${PID[$1]}" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "${PID[$1]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${PID[$1]}" 2>/dev/null || true
  }
  callgrind() { echo valgrind --tool=callgrind "--callgrind-out-file=$IR_OUT/$1.%p"; }
  sed 's/^worker_processes 1;/worker_processes 1;\nmaster_process off;/' "$CONF/proxy-nginx.conf" \
    >"$CONF/proxy-nginx-callgrind.conf"
  stop nginx
  # shellcheck disable=SC2046 # the valgrind command line is split on purpose
  start nginx $(callgrind nginx) nginx -p "$STATE" -c "$CONF/proxy-nginx-callgrind.conf"
  wait_for "nginx proxy under valgrind" 60 answers_ok "${URL[nginx]}"
  stop tollgate
  # shellcheck disable=SC2046
  start_data_plane tollgate $(callgrind tollgate)
  if [[ -n "$WITH_REDIS" ]]; then
    wait_for "tollgate /limited through Redis, under valgrind" 60 limited_ok_via_redis
  fi
  # instructions TARGET: "REQUESTS INSTRUCTIONS" of one counted run
  instructions() {
    local pid=${PROXY_PID[$1]} header=() before dump
    [[ -z "${WRK_HEADER[$1]}" ]] || header=(-H "${WRK_HEADER[$1]}")
    taskset -c "$CLIENT_CPU" wrk -t1 -c"$IR_CONNS" -d"${IR_WARMUP}s" ${header[@]+"${header[@]}"} "${URL[$1]}" \
      >"$RAW/callgrind-warmup-$1.txt" 2>&1
    callgrind_control -z "$pid" >/dev/null 2>&1
    taskset -c "$CLIENT_CPU" wrk -t1 -c"$IR_CONNS" -d"${IR_DUR}s" ${header[@]+"${header[@]}"} "${URL[$1]}" \
      >"$RAW/callgrind-$1.txt" 2>&1 || die "wrk failed against $1 (under valgrind)"
    before=$(find "$IR_OUT" -name "*.$pid.*" | wc -l)
    callgrind_control -d "$pid" >/dev/null 2>&1
    for _ in $(seq 50); do
      (($(find "$IR_OUT" -name "*.$pid.*" | wc -l) > before)) && break
      sleep 0.1
    done
    dump=$(ls -t "$IR_OUT"/*."$pid".* | head -n 1)
    mv "$dump" "$IR_OUT/$1.counted"
    printf '%s %s\n' "$(awk '/requests in/ {print $1}' "$RAW/callgrind-$1.txt")" \
      "$(awk '/^(summary|totals):/ {print $2; exit}' "$IR_OUT/$1.counted")"
  }
  PROXY_PID[nginx]=${PID[nginx]}
  PROXY_PID[nginx-fwd]=${PID[nginx]}
  PROXY_PID[tollgate]=${PID[tollgate]}
  PROXY_PID[tollgate-auth]=${PID[tollgate]}
  PROXY_PID[tollgate-auth-limit]=${PID[tollgate]}
  declare -A IR
  {
    echo
    echo "user-space instructions per request (callgrind; wrk -t1 -c$IR_CONNS, ${IR_DUR}s per target)"
    printf '%-19s %10s %14s %9s\n' target requests instr/req vs_nginx
    for t in "${TARGETS[@]}"; do
      [[ "$t" != direct ]] || continue
      read -r n ir <<<"$(instructions "$t")"
      IR[$t]=$(awk -v i="$ir" -v n="$n" 'BEGIN { if (n > 0) printf "%.0f", i / n; else print "-" }')
      printf '%-19s %10s %14s %9s\n' "$t" "$n" "${IR[$t]}" "$(ratio "${IR[$t]}" "${IR[nginx]:--}")"
    done
    echo "(the counted dumps are in $IR_OUT: callgrind_annotate shows where the instructions go)"
  } | tee -a "$BENCH_DIR/table.txt"
fi
log "raw outputs in $BENCH_DIR"

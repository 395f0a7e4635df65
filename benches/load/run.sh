#!/usr/bin/env bash
# Load benchmark: the direct path, nginx (a local proxy that adds the same
# header, the floor for "a proxy that adds a credential"), and the Leash
# sidecar, alternated in one invocation, closed loop with wrk.
#
#   ./benches/load/run.sh [ROUNDS] [SECONDS]        (defaults: 3 rounds of 10 s)
#
# Upstream (nginx answering 200 "ok") and the proxy under test share core 0;
# wrk runs on core 1. Prints a Markdown table of medians and the
# sidecar/nginx and sidecar/direct ratios, CPU seconds per 1,000 requests of
# each proxy, and its RSS idle and after load. Needs: nginx (nginx-light),
# wrk, taskset, curl; installs nginx-light and wrk with apt when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${1:-3}
SECONDS_PER_RUN=${2:-10}
CONNS=${LEASH_BENCH_CONNECTIONS:-16}

for tool in nginx wrk taskset curl; do
  if ! command -v "$tool" >/dev/null && ! [ -x "/usr/sbin/$tool" ]; then
    echo "==> installing nginx-light and wrk"; apt-get install -y -qq nginx-light wrk >/dev/null; break
  fi
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "==> building release binaries" >&2
cargo build --release --quiet -p leash-control-plane -p leash-proxy
BIN=target/release
DIR=$(mktemp -d /tmp/lshload.XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

UP=127.0.0.1:19190 PEER=127.0.0.1:19191 SIDECAR=127.0.0.1:19192
TOKEN="Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"

mkdir -p "$DIR/nginx-up" "$DIR/nginx-peer"
cat >"$DIR/nginx-up/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $DIR/nginx-up/pid; error_log $DIR/nginx-up/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen $UP; location / { return 200 "ok\n"; } } }
CONF
cat >"$DIR/nginx-peer/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $DIR/nginx-peer/pid; error_log $DIR/nginx-peer/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server $UP; keepalive 64; }
  server { listen $PEER; location / {
    proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
    proxy_set_header Authorization "$TOKEN"; } } }
CONF
taskset -c 0 "$NGINX" -p "$DIR/nginx-up" -c "$DIR/nginx-up/nginx.conf" & pids+=($!)
taskset -c 0 "$NGINX" -p "$DIR/nginx-peer" -c "$DIR/nginx-peer/nginx.conf" & pids+=($!)

TD=leash.test
"$BIN/leash-control-plane" dev-identity --socket "$DIR/cp.sock=spiffe://$TD/leash/control-plane" \
  --socket "$DIR/app.sock=spiffe://$TD/ns/bench/sa/client" 2>"$DIR/identity.log" & pids+=($!)
for _ in $(seq 100); do [ -S "$DIR/app.sock" ] && break; sleep 0.05; done
cat >"$DIR/policy.yaml" <<YAML
version: 1
upstreams:
  - name: bench
    hosts: [bench.leash.test]
    target: http://$UP
    credential: { kind: jwt, ttl: 1h }
grants:
  - workload: spiffe://$TD/ns/bench/sa/client
    upstreams: [bench]
YAML
RUST_LOG=warn "$BIN/leash-control-plane" serve --policy "$DIR/policy.yaml" --data-dir "$DIR/data" \
  --listen 127.0.0.1:19443 --admin-listen 127.0.0.1:19080 \
  --spiffe-endpoint "unix://$DIR/cp.sock" 2>"$DIR/cp.log" & pids+=($!)
for _ in $(seq 200); do curl -fs -o /dev/null http://127.0.0.1:19080/readyz && break; sleep 0.05; done

start=$(date +%s%N)
RUST_LOG=warn taskset -c 0 "$BIN/leash-proxy" --spiffe-endpoint "unix://$DIR/app.sock" \
  --control-plane 127.0.0.1:19443 --listen 127.0.0.1:19193 --admin-listen 127.0.0.1:19194 \
  --upstream-listener "bench=$SIDECAR" --worker-threads "${LEASH_BENCH_WORKERS:-1}" \
  2>"$DIR/sidecar.log" & SIDECAR_PID=$!; pids+=($SIDECAR_PID)
for _ in $(seq 400); do curl -fs -o /dev/null http://127.0.0.1:19194/readyz && break; sleep 0.005; done
ready_ms=$(( ($(date +%s%N) - start) / 1000000 ))
curl -fsS "http://$SIDECAR/" >/dev/null    # first credential fetched before measuring
curl -fsS "http://$PEER/" >/dev/null
PEER_PID=$(pgrep -f "nginx: worker process" -n -P "$(cat "$DIR/nginx-peer/pid")" 2>/dev/null || pgrep -P "$(cat "$DIR/nginx-peer/pid")")
sleep 1

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICKS=$(getconf CLK_TCK)
declare -A idle_rss=( [nginx]=$(rss_kib "$PEER_PID") [sidecar]=$(rss_kib "$SIDECAR_PID") )

# run NAME URL PID -> appends "rps p50 p99 cpu_per_1k" to $DIR/NAME.results
run() {
  local name=$1 url=$2 pid=$3 before after out rps reqs
  before=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0 )
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECONDS_PER_RUN}s" --latency "$url")
  after=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0 )
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out")
  [ -z "$errors" ] || echo "!! $name: $errors" >&2
  cpu=$(awk -v a="$after" -v b="$before" -v t="$TICKS" -v r="$reqs" 'BEGIN { if (r>0) printf "%.4f", (a-b)/t/(r/1000); else print "nan" }')
  echo "$rps $p50 $p99 $cpu" >>"$DIR/$name.results"
  echo "   $name: $rps req/s, p50 $p50, p99 $p99, ${cpu} CPU-s/1k req" >&2
}

for round in $(seq "$ROUNDS"); do
  echo "==> round $round of $ROUNDS (${SECONDS_PER_RUN}s each, $CONNS connections)" >&2
  run direct "http://$UP/" ""
  run nginx "http://$PEER/" "$PEER_PID"
  run sidecar "http://$SIDECAR/" "$SIDECAR_PID"
done
declare -A load_rss=( [nginx]=$(rss_kib "$PEER_PID") [sidecar]=$(rss_kib "$SIDECAR_PID") )

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
col() { awk -v c="$2" '{print $c}' "$DIR/$1.results" | sed -E 's/us$/e-3/; s/ms$//; s/([0-9.]+)s$/\1e3/' | median; }

echo
echo "Closed loop, HTTP/1.1 keep-alive, $CONNS connections, ${SECONDS_PER_RUN}s x $ROUNDS rounds (medians); sidecar ready in ${ready_ms} ms"
echo
echo "| path | req/s | p50 | p99 | CPU-s per 1k req | RSS idle | RSS after load |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for name in direct nginx sidecar; do
  rss_i=${idle_rss[$name]:-}; rss_l=${load_rss[$name]:-}
  printf "| %s | %.0f | %.3f ms | %.3f ms | %s | %s | %s |\n" "$name" "$(col "$name" 1)" "$(col "$name" 2)" "$(col "$name" 3)" \
    "$( [ "$name" = direct ] && echo - || col "$name" 4)" \
    "$( [ -n "$rss_i" ] && echo "$((rss_i/1024)) MiB" || echo -)" "$( [ -n "$rss_l" ] && echo "$((rss_l/1024)) MiB" || echo -)"
done
s=$(col sidecar 1); n=$(col nginx 1); d=$(col direct 1)
echo
awk -v s="$s" -v n="$n" -v d="$d" 'BEGIN { printf "sidecar/nginx throughput: %.2f   sidecar/direct: %.2f   nginx/direct: %.2f\n", s/n, s/d, n/d }'

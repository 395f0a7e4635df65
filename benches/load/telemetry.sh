#!/usr/bin/env bash
# What usage reporting and OTLP tracing cost: the same release sidecar run
# three ways side by side, alternated in one invocation, closed loop with wrk
# (HTTP/1.1 keep-alive, 16 connections), nginx as the reference:
#   off    --usage-reporting false, no OTLP
#   usage  the default: usage counted and shipped every 5 s, no OTLP
#   otlp   usage on, and OTEL_EXPORTER_OTLP_ENDPOINT set: one span per
#          request at 100% sampling (the SDK default, parent-based always-on),
#          exported in batches to a local OTLP sink (benches/src/bin/otlp_sink.rs)
#
#   ./benches/load/telemetry.sh [ROUNDS] [SECONDS]      defaults: 3 rounds of 10 s
#
# Upstream (nginx) and the sidecar under test on core 0; wrk and the OTLP
# sink on core 1 (a collector lives off the node in production).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
ROUNDS=${1:-3}
SECONDS_PER_RUN=${2:-10}
for tool in nginx wrk; do
  if ! command -v "$tool" >/dev/null && ! [ -x "/usr/sbin/$tool" ]; then
    echo "==> installing nginx-light and wrk" >&2; apt-get install -y -qq nginx-light wrk >/dev/null; break
  fi
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
echo "==> building release binaries" >&2
cargo build --release --quiet -p leash-control-plane -p leash-proxy
cargo build --release --quiet -p leash-benches --bin otlp_sink
BIN=target/release
DIR=$(mktemp -d /tmp/lshtel.XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
declare -A max_rss=()

UP=127.0.0.1:19290 PEER=127.0.0.1:19291 SINK=127.0.0.1:19299
TOKEN="Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"
mkdir -p "$DIR/nginx"
cat >"$DIR/nginx/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $DIR/nginx/pid; error_log $DIR/nginx/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server $UP; keepalive 64; }
  server { listen $UP; location / { return 200 "ok\n"; } }
  server { listen $PEER; location / {
    proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
    proxy_set_header Authorization "$TOKEN"; } } }
CONF
# One nginx serves both the upstream and the peer here: the peer is only a
# reference line for this comparison (run.sh compares against nginx properly).
taskset -c 0 "$NGINX" -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" & pids+=($!)
taskset -c 1 "$BIN/otlp_sink" "$SINK" >"$DIR/sink.out" & pids+=($!)

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
  --listen 127.0.0.1:19543 --admin-listen 127.0.0.1:19580 \
  --spiffe-endpoint "unix://$DIR/cp.sock" --insecure-dev 2>"$DIR/cp.log" & pids+=($!)
for _ in $(seq 200); do curl -fs -o /dev/null http://127.0.0.1:19580/readyz && break; sleep 0.05; done

declare -A PORT=( [off]=19201 [usage]=19202 [otlp]=19203 ) PID=()
for v in off usage otlp; do
  p=${PORT[$v]}
  env RUST_LOG=warn $( [ "$v" = otlp ] && echo "OTEL_EXPORTER_OTLP_ENDPOINT=http://$SINK" ) \
    taskset -c 0 "$BIN/leash-proxy" --spiffe-endpoint "unix://$DIR/app.sock" \
    --control-plane 127.0.0.1:19543 --listen "127.0.0.1:$((p + 100))" --admin-listen "127.0.0.1:$((p + 200))" \
    --upstream-listener "bench=127.0.0.1:$p" --worker-threads 1 \
    --usage-reporting "$( [ "$v" = off ] && echo false || echo true )" 2>"$DIR/sidecar-$v.log" &
  PID[$v]=$!; pids+=($!)
done
for v in off usage otlp; do
  for _ in $(seq 400); do curl -fs -o /dev/null "http://127.0.0.1:$((PORT[$v] + 200))/readyz" && break; sleep 0.01; done
  curl -fsS -o /dev/null "http://127.0.0.1:${PORT[$v]}/" || { echo "!! sidecar $v does not answer" >&2; exit 1; }
done
PEER_PID=$(pgrep -P "$(cat "$DIR/nginx/pid")" | head -1)
sleep 1

for round in $(seq "$ROUNDS"); do
  echo "==> round $round of $ROUNDS (${SECONDS_PER_RUN}s per run)" >&2
  run keepalive nginx "http://$PEER/" "$PEER_PID" 16
  for v in off usage otlp; do run keepalive "$v" "http://127.0.0.1:${PORT[$v]}/" "${PID[$v]}" 16; done
done
sleep 6 # the last usage batch and span batch
spans=$(tail -1 "$DIR/sink.out")
used=$(curl -fs http://127.0.0.1:19580/metrics | awk '$1=="leash_cp_usage_requests_total" {print $2}')

echo
echo "Keep-alive, 16 connections, ${SECONDS_PER_RUN}s x $ROUNDS rounds per variant, medians"
echo
echo "| sidecar | req/s | p50 | p99 | CPU-s per 1k req | peak RSS |"
echo "|---|---:|---:|---:|---:|---:|"
for name in nginx off usage otlp; do
  printf "| %s | %.0f | %.3f ms | %.3f ms | %s | %s MiB |\n" "$name" "$(col keepalive "$name" 1)" "$(col keepalive "$name" 2)" \
    "$(col keepalive "$name" 3)" "$(col keepalive "$name" 4)" "$(( ${max_rss[$name]:-0} / 1024 ))"
done
off=$(col keepalive off 1)
awk -v o="$off" -v u="$(col keepalive usage 1)" -v t="$(col keepalive otlp 1)" \
  'BEGIN { printf "\nusage on / off %.3f (%.1f%% lower), usage + OTLP tracing / off %.3f (%.1f%% lower)\n", u/o, (1-u/o)*100, t/o, (1-t/o)*100 }'
echo "spans received by the sink: $spans; requests in the control plane's usage: $used"

#!/usr/bin/env bash
# Load benchmark: the direct path, nginx (a local proxy that adds the same
# header: the floor for "a proxy that adds a credential"), and the Leash
# sidecar, alternated in one invocation, closed loop with wrk.
#
#   ./benches/load/run.sh [ROUNDS] [SECONDS] [SCENARIOS]
#   defaults: 3 rounds of 10 s; scenarios "keepalive newconn 1mib tls"
#
# Scenarios: keepalive (HTTP/1.1 keep-alive, small answers, 16 connections),
# newconn (a new connection per request), 1mib (1 MiB answers streamed, 4
# connections), tls (the proxy originates TLS to the upstream; nginx with
# proxy_ssl verify and session reuse, the sidecar with the policy's CA file).
# The upstream (nginx) and the proxy under test share core 0; wrk runs on
# core 1. Prints a Markdown table per scenario with medians, the
# sidecar/nginx and sidecar/direct ratios, CPU seconds per 1,000 requests of
# each proxy and its RSS. Needs nginx (nginx-light), wrk, taskset, curl,
# openssl; installs nginx-light and wrk with apt when missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
ROUNDS=${1:-3}
SECONDS_PER_RUN=${2:-10}
SCENARIOS=${3:-keepalive newconn 1mib tls rate2k rate10k}

for tool in nginx wrk; do
  if ! command -v "$tool" >/dev/null && ! [ -x "/usr/sbin/$tool" ]; then
    echo "==> installing nginx-light and wrk" >&2; apt-get install -y -qq nginx-light wrk >/dev/null; break
  fi
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

echo "==> building release binaries" >&2
cargo build --release --quiet -p leash-control-plane -p leash-proxy
cargo build --release --quiet -p leash-benches --bin openloop
BIN=target/release
DIR=$(mktemp -d /tmp/lshload.XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

UP=127.0.0.1:19190 UP_TLS=127.0.0.1:19195 PEER=127.0.0.1:19191 PEER_TLS=127.0.0.1:19196
SIDECAR=127.0.0.1:19192 SIDECAR_TLS=127.0.0.1:19197
TOKEN="Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"

# Test PKI for the TLS upstream.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
  -keyout "$DIR/ca.key" -out "$DIR/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=bench.internal" \
  -keyout "$DIR/up.key" -out "$DIR/up.csr" 2>/dev/null
printf 'subjectAltName=DNS:bench.internal\n' >"$DIR/ext.cnf"
openssl x509 -req -in "$DIR/up.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" -CAcreateserial -days 2 \
  -extfile "$DIR/ext.cnf" -out "$DIR/up.pem" 2>/dev/null
head -c 1048576 /dev/urandom >"$DIR/1m.bin"
# nginx workers run unprivileged: they must be able to read the body file.
chmod 755 "$DIR"; chmod 644 "$DIR/1m.bin"

mkdir -p "$DIR/nginx-up" "$DIR/nginx-peer"
cat >"$DIR/nginx-up/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $DIR/nginx-up/pid; error_log $DIR/nginx-up/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen $UP; location / { return 200 "ok\n"; } location = /1m { alias $DIR/1m.bin; } }
  server { listen $UP_TLS ssl; ssl_certificate $DIR/up.pem; ssl_certificate_key $DIR/up.key;
           location / { return 200 "ok\n"; } } }
CONF
cat >"$DIR/nginx-peer/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $DIR/nginx-peer/pid; error_log $DIR/nginx-peer/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream up { server $UP; keepalive 64; }
  upstream up_tls { server $UP_TLS; keepalive 64; }
  server { listen $PEER; location / {
    proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
    proxy_set_header Authorization "$TOKEN"; } }
  server { listen $PEER_TLS; location / {
    proxy_pass https://up_tls; proxy_http_version 1.1; proxy_set_header Connection "";
    proxy_ssl_verify on; proxy_ssl_trusted_certificate $DIR/ca.pem; proxy_ssl_name bench.internal;
    proxy_ssl_server_name on; proxy_ssl_session_reuse on;
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
  - name: bench-tls
    hosts: [bench-tls.leash.test]
    target: https://$UP_TLS
    tls: { ca_file: $DIR/ca.pem, ca_only: true, server_name: bench.internal }
    credential: { kind: jwt, ttl: 1h }
grants:
  - workload: spiffe://$TD/ns/bench/sa/client
    upstreams: [bench, bench-tls]
YAML
RUST_LOG=warn "$BIN/leash-control-plane" serve --policy "$DIR/policy.yaml" --data-dir "$DIR/data" \
  --listen 127.0.0.1:19443 --admin-listen 127.0.0.1:19080 \
  --spiffe-endpoint "unix://$DIR/cp.sock" 2>"$DIR/cp.log" & pids+=($!)
for _ in $(seq 200); do curl -fs -o /dev/null http://127.0.0.1:19080/readyz && break; sleep 0.05; done

start=$(date +%s%N)
RUST_LOG=warn taskset -c 0 "$BIN/leash-proxy" --spiffe-endpoint "unix://$DIR/app.sock" \
  --control-plane 127.0.0.1:19443 --listen 127.0.0.1:19193 --admin-listen 127.0.0.1:19194 \
  --upstream-listener "bench=$SIDECAR" --upstream-listener "bench-tls=$SIDECAR_TLS" \
  --worker-threads "${LEASH_BENCH_WORKERS:-1}" 2>"$DIR/sidecar.log" & SIDECAR_PID=$!; pids+=($SIDECAR_PID)
for _ in $(seq 400); do curl -fs -o /dev/null http://127.0.0.1:19194/readyz && break; sleep 0.005; done
ready_ms=$(( ($(date +%s%N) - start) / 1000000 ))
for url in "http://$SIDECAR/" "http://$SIDECAR_TLS/" "http://$PEER/" "http://$PEER_TLS/"; do
  curl -fsS -o /dev/null "$url" || { echo "!! $url does not answer" >&2; exit 1; }
done
PEER_PID=$(pgrep -P "$(cat "$DIR/nginx-peer/pid")" | head -1)
sleep 1

declare -A idle_rss=( [nginx]=$(rss_kib "$PEER_PID") [sidecar]=$(rss_kib "$SIDECAR_PID") )
declare -A max_rss=( [nginx]=0 [sidecar]=0 )

# run_rate SCENARIO NAME URL PID RATE -> appends "achieved p50 p99 p999 cpu_per_1k errors"
run_rate() {
  local scenario=$1 name=$2 url=$3 pid=$4 rate=$5 before after out cpu
  before=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0 )
  out=$(taskset -c 1 "$BIN/openloop" --url "$url" --rate "$rate" --seconds "$SECONDS_PER_RUN" --connections 64)
  after=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0 )
  read -r achieved reqs errors p50 p99 p999 < <(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["achieved"], d["requests"], d["errors"], d["p50_ms"], d["p99_ms"], d["p999_ms"])' "$out")
  [ "$errors" = 0 ] || echo "!! $scenario/$name: $errors errors" >&2
  cpu=$(awk -v a="$after" -v b="$before" -v t="$TICKS" -v r="$reqs" 'BEGIN { if (r>0) printf "%.4f", (a-b)/t/(r/1000); else print "nan" }')
  echo "$achieved $p50 $p99 $p999 $cpu $errors" >>"$DIR/$scenario.$name"
  if [ -n "$pid" ]; then
    rss=$(rss_kib "$pid"); [ "$rss" -gt "${max_rss[$name]}" ] && max_rss[$name]=$rss
  fi
  echo "   $scenario/$name: $achieved req/s, p50 ${p50} ms, p99 ${p99} ms, p99.9 ${p999} ms, ${cpu} CPU-s/1k req" >&2
}

scenario() {
  local s=$1
  case $s in
    keepalive) run "$s" direct "http://$UP/" "" 16; run "$s" nginx "http://$PEER/" "$PEER_PID" 16
               run "$s" sidecar "http://$SIDECAR/" "$SIDECAR_PID" 16 ;;
    newconn)   run "$s" direct "http://$UP/" "" 16 -H "Connection: close"
               run "$s" nginx "http://$PEER/" "$PEER_PID" 16 -H "Connection: close"
               run "$s" sidecar "http://$SIDECAR/" "$SIDECAR_PID" 16 -H "Connection: close" ;;
    1mib)      run "$s" direct "http://$UP/1m" "" 4; run "$s" nginx "http://$PEER/1m" "$PEER_PID" 4
               run "$s" sidecar "http://$SIDECAR/1m" "$SIDECAR_PID" 4 ;;
    tls)       run "$s" nginx "http://$PEER_TLS/" "$PEER_PID" 16
               run "$s" sidecar "http://$SIDECAR_TLS/" "$SIDECAR_PID" 16 ;;
    rate2k|rate10k)
               local r=$([ "$s" = rate2k ] && echo 2000 || echo 10000)
               run_rate "$s" direct "http://$UP/" "" "$r"; run_rate "$s" nginx "http://$PEER/" "$PEER_PID" "$r"
               run_rate "$s" sidecar "http://$SIDECAR/" "$SIDECAR_PID" "$r" ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
}

for round in $(seq "$ROUNDS"); do
  echo "==> round $round of $ROUNDS (${SECONDS_PER_RUN}s per run)" >&2
  for s in $SCENARIOS; do scenario "$s"; done
done


echo
echo "Closed loop, ${SECONDS_PER_RUN}s x $ROUNDS rounds per path, medians; sidecar ready ${ready_ms} ms after start"
echo "RSS idle: nginx $((idle_rss[nginx]/1024)) MiB, sidecar $((idle_rss[sidecar]/1024)) MiB; peak after runs: nginx $((max_rss[nginx]/1024)) MiB, sidecar $((max_rss[sidecar]/1024)) MiB"
for s in $SCENARIOS; do
  if [[ $s == rate* ]]; then
    echo
    echo "**$s** (open loop, latency from each request's scheduled time)"
    echo
    echo "| path | achieved req/s | p50 | p99 | p99.9 | CPU-s per 1k req | added p99 vs direct |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    d99=$(col "$s" direct 3)
    for name in direct nginx sidecar; do
      printf "| %s | %.0f | %.3f ms | %.3f ms | %.3f ms | %s | %s |\n" "$name" "$(col "$s" "$name" 1)" "$(col "$s" "$name" 2)" \
        "$(col "$s" "$name" 3)" "$(col "$s" "$name" 4)" "$( [ "$name" = direct ] && echo - || col "$s" "$name" 5)" \
        "$( [ "$name" = direct ] && echo - || awk -v a="$(col "$s" "$name" 3)" -v d="$d99" 'BEGIN { printf "+%.3f ms", a-d }')"
    done
    continue
  fi
  echo
  echo "**$s**"
  echo
  echo "| path | req/s | p50 | p99 | CPU-s per 1k req |"
  echo "|---|---:|---:|---:|---:|"
  for name in direct nginx sidecar; do
    [ -f "$DIR/$s.$name" ] || continue
    printf "| %s | %.0f | %.3f ms | %.3f ms | %s |\n" "$name" "$(col "$s" "$name" 1)" "$(col "$s" "$name" 2)" \
      "$(col "$s" "$name" 3)" "$( [ "$name" = direct ] && echo - || col "$s" "$name" 4)"
  done
  sc=$(col "$s" sidecar 1); ng=$(col "$s" nginx 1)
  if [ -f "$DIR/$s.direct" ]; then
    awk -v s="$sc" -v n="$ng" -v d="$(col "$s" direct 1)" 'BEGIN { printf "\nsidecar/nginx %.2f, sidecar/direct %.2f, nginx/direct %.2f\n", s/n, s/d, n/d }'
  else
    awk -v s="$sc" -v n="$ng" 'BEGIN { printf "\nsidecar/nginx %.2f\n", s/n }'
  fi
done

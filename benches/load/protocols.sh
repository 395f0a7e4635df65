#!/usr/bin/env bash
# HTTPS interception and gRPC under load (issue 19): the direct path, nginx
# doing the same work, and the Leash sidecar, alternated within each round,
# closed loop, on the setup of run.sh (setup.sh) plus:
#
#   https  HTTP/1.1 keep-alive inside TLS, 16 connections, small answers, the
#          same client for every path (leash-benches' tlsload):
#          direct:  TLS straight to the upstream nginx (bench.internal);
#          nginx:   TLS terminated with a certificate for api.bench.test from
#                   the test CA, proxy_pass https:// with proxy_ssl_verify,
#                   session reuse, upstream keep-alive, Authorization set;
#          sidecar: CONNECT api.bench.test:443 on the proxy port once per
#                   connection, TLS trusting the sidecar's local CA (/ca.pem),
#                   JWT injected, TLS re-originated to the upstream (policy
#                   intercept: true, tls.ca_file).
#   grpc   unary gRPC calls over HTTP/2, h2load with 16 connections x 10
#          concurrent streams, to a gRPC-shaped upstream (grpcup: h2 over TLS
#          only, a 5-byte-framed answer and grpc-status 0 as a trailer):
#          direct:  h2 over TLS to the upstream;
#          nginx:   h2c (listen ... http2) + grpc_pass grpcs:// with
#                   grpc_ssl_verify, session reuse, upstream keep-alive,
#                   Authorization set;
#          sidecar: h2c with prior knowledge on a named listener bound to the
#                   upstream, JWT injected, one multiplexed h2/TLS connection.
#          A gRPC refusal is an HTTP 200, so a call counts as done only if it
#          reached the upstream with a Bearer credential (grpcup's counters).
#
#   ./benches/load/protocols.sh [ROUNDS] [SECONDS] [SCENARIOS]
#   defaults: 3 rounds of 10 s; scenarios "https grpc"
#   PERF=1 ./benches/load/protocols.sh 1 10: also samples each proxy with
#   perf (cpu-clock) during its runs and prints where its CPU went (the
#   sampling costs the proxies time: not for the figures); PERF=callgraph
#   records call graphs too (DWARF unwinding: slow), for `perf report -G`
#
# Pinning as run.sh: upstreams and the proxy under test on core 0, the client
# on core 1. Prints a Markdown table per scenario (medians over rounds;
# errors summed over rounds), CPU seconds per 1,000 requests of each proxy
# and of the upstream, and a summary table. Needs nginx with the gRPC module
# (nginx-light's binary on Debian 12 has it), h2load (nghttp2-client), wrk,
# GNU time, taskset, curl, openssl, python3; installs nginx-light, wrk,
# nghttp2-client and time when missing (perf only for PERF=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
ROUNDS=${1:-3}
SECONDS_PER_RUN=${2:-10}
SCENARIOS=${3:-https grpc}

need_nginx_wrk
command -v h2load >/dev/null || { echo "==> installing nghttp2-client (h2load)" >&2; apt-get install -y -qq nghttp2-client >/dev/null; }
[ -x /usr/bin/time ] || { echo "==> installing time" >&2; apt-get install -y -qq time >/dev/null; }
if "$NGINX" -V 2>&1 | grep -q -- --without-http_grpc_module; then
  echo "==> $NGINX has no gRPC module: installing nginx-full" >&2
  apt-get install -y -qq nginx-full >/dev/null
fi

echo "==> building release binaries" >&2
cargo build --release --quiet -p leash-control-plane -p leash-proxy
cargo build --release --quiet -p leash-benches --bin tlsload --bin grpcup
BIN=target/release
scratch lshproto

PROXY=127.0.0.1:19193 ADMIN=127.0.0.1:19194
UP_TLS13=127.0.0.1:19202 UP_GRPC=127.0.0.1:19198 UP_GRPC_STATS=127.0.0.1:19203 PEER_HTTPS=127.0.0.1:19199 PEER_GRPC=127.0.0.1:19200 SIDECAR_GRPC=127.0.0.1:19201
HTTPS_HOST=api.bench.test

# nginx 1.22 (Debian 12) speaks TLS 1.2 at most unless told otherwise (1.3
# became its default in 1.23.4); every TLS hop here allows 1.3, as the
# sidecar's rustls does, so both proxies do the same TLS 1.3 work.
extra_nginx_up() {
  cat <<CONF
  server { listen $UP_TLS13 ssl; ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $DIR/up.pem; ssl_certificate_key $DIR/up.key;
    location / { return 200 "ok\n"; }
    location = /tlsinfo { return 200 "\$ssl_protocol \$ssl_cipher reused=\$ssl_session_reused\n"; } }
CONF
}
# nginx's gRPC proxy carries one call at a time per upstream connection:
# with 160 calls in flight it keeps 160 connections, so its keep-alive
# cache is larger than that, and outlives the pauses between its runs.
extra_nginx_peer() {
  cat <<CONF
  upstream up_https { server $UP_TLS13; keepalive 64; keepalive_requests 1000000; keepalive_timeout 300s; }
  upstream up_grpc { server $UP_GRPC; keepalive 256; keepalive_requests 1000000; keepalive_timeout 300s; }
  server { listen $PEER_HTTPS ssl; ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $DIR/front.pem; ssl_certificate_key $DIR/front.key;
    location / {
      proxy_pass https://up_https; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_protocols TLSv1.2 TLSv1.3; proxy_ssl_verify on; proxy_ssl_trusted_certificate $DIR/ca.pem;
      proxy_ssl_name bench.internal; proxy_ssl_server_name on; proxy_ssl_session_reuse on;
      proxy_set_header Authorization "$TOKEN"; } }
  server { listen $PEER_GRPC http2;
    location / {
      grpc_pass grpcs://up_grpc;
      grpc_ssl_protocols TLSv1.2 TLSv1.3; grpc_ssl_verify on; grpc_ssl_trusted_certificate $DIR/ca.pem;
      grpc_ssl_name bench.internal; grpc_ssl_server_name on; grpc_ssl_session_reuse on;
      grpc_set_header Authorization "$TOKEN"; } }
CONF
}
extra_policy() {
  cat <<YAML
  - name: bench-https
    hosts: [$HTTPS_HOST]
    target: https://$UP_TLS13
    tls: { ca_file: $DIR/ca.pem, ca_only: true, server_name: bench.internal }
    intercept: true
    credential: { kind: jwt, ttl: 1h }
  - name: bench-grpc
    hosts: [grpc.bench.test]
    target: https://$UP_GRPC
    tls: { ca_file: $DIR/ca.pem, ca_only: true, server_name: bench.internal }
    credential: { kind: jwt, ttl: 1h }
YAML
}
extra_grants() { printf ', bench-https, bench-grpc'; }
SIDECAR_EXTRA_ARGS=(--upstream-listener "bench-grpc=$SIDECAR_GRPC")

# shellcheck source=benches/load/setup.sh
source benches/load/setup.sh

taskset -c 0 "$BIN/grpcup" --listen "$UP_GRPC" --cert "$DIR/up.pem" --key "$DIR/up.key" \
  --stats "$UP_GRPC_STATS" 2>"$DIR/grpcup.log" &
GRPCUP_PID=$!; pids+=("$GRPCUP_PID")
UP_PID=$(pgrep -P "$(cat "$DIR/nginx-up/pid")" | head -1)
curl -fsS "http://$ADMIN/ca.pem" -o "$DIR/sidecar-ca.pem"
grpc_stats() { curl -fsS "http://$UP_GRPC_STATS/"; }
for _ in $(seq 100); do grpc_stats >/dev/null 2>&1 && break; sleep 0.05; done
# One request down each new path before timing anything: what the upstream's
# TLS server saw of each proxy's connection (protocol, cipher, resumed).
tlsinfo_nginx=$(curl -fsS --cacert "$DIR/ca.pem" --connect-to "$HTTPS_HOST:443:$PEER_HTTPS" "https://$HTTPS_HOST/tlsinfo")
tlsinfo_sidecar=$(curl -fsS --proxy "http://$PROXY" --cacert "$DIR/sidecar-ca.pem" "https://$HTTPS_HOST/tlsinfo")
# A gRPC request: 5-byte prefix (not compressed, length 7), field 1 = "hello".
printf '\x00\x00\x00\x00\x07\x0a\x05hello' >"$DIR/grpc.bin"
for url in "https://$UP_GRPC/" "http://$PEER_GRPC/" "http://$SIDECAR_GRPC/"; do
  h2load -n 1 -d "$DIR/grpc.bin" -H 'content-type: application/grpc' -H 'te: trailers' "$url" \
    | grep -q '1 succeeded' || { echo "!! $url does not answer gRPC" >&2; exit 1; }
done
served=$(grpc_stats | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["served"], d["authorized"])')
[ "$served" = "3 2" ] || { echo "!! gRPC upstream saw (served authorized) $served, expected 3 2" >&2; exit 1; }
sleep 1

# Appends "$2" to $DIR/SCENARIO.NAME.$3 (text kept per path: TLS, connections).
note() { echo "$2" >>"$DIR/$1.$3"; }
cpu_of() { [ -n "$1" ] && cpu_ticks "$1" || echo 0; }
sys_of() { [ -n "$1" ] && awk '{print $15}' "/proc/$1/stat" || echo 0; }
per_1k() { awk -v a="$1" -v b="$2" -v t="$TICKS" -v r="$3" 'BEGIN { if (r>0) printf "%.4f", (a-b)/t/(r/1000); else print "nan" }'; }

# begin PID UPSTREAM_PID LABEL: CPU counters of the proxy under test (none
# for the direct path) and of the upstream before a run. With PERF=1, perf
# samples the proxy during the run (timings then suffer: profile in an
# invocation of its own).
begin() {
  M_PID=$1 M_UP=$2 M_B=$(cpu_of "$1") M_SB=$(sys_of "$1") M_UB=$(cpu_of "$2") PERF_PID=
  if [ -n "${PERF:-}" ] && [ -n "$1" ]; then
    local graph=(); [ "$PERF" = callgraph ] && graph=(--call-graph dwarf,32768 -F 499)
    perf record -q -e cpu-clock -F 1999 "${graph[@]}" -p "$1" -o "$DIR/perf.$3.data" >/dev/null 2>&1 & PERF_PID=$!
  fi
}
# finish REQUESTS: sets M_CPU and M_UPCPU (CPU seconds per 1k requests of
# the proxy and of the upstream) and M_SYS (the kernel's share of the
# proxy's CPU).
finish() {
  local a sa ua
  a=$(cpu_of "$M_PID"); sa=$(sys_of "$M_PID"); ua=$(cpu_of "$M_UP")
  if [ -n "$PERF_PID" ]; then kill -INT "$PERF_PID"; wait "$PERF_PID" || true; fi
  M_CPU=$(per_1k "$a" "$M_B" "$1"); M_UPCPU=$(per_1k "$ua" "$M_UB" "$1")
  M_SYS=$(awk -v a=$((a - M_B)) -v s=$((sa - M_SB)) 'BEGIN { if (a > 0) printf "%.2f", s/a; else print "nan" }')
}

# run_tls SCENARIO NAME PID UPSTREAM_PID [tlsload args] -> appends
#   "rps p50 p99 proxy_cpu_per_1k errors upstream_cpu_per_1k client_busy proxy_kernel_share"
run_tls() {
  local scenario=$1 name=$2 pid=$3 up=$4; shift 4
  local out rps reqs errors p50 p99 tls alpn busy first
  begin "$pid" "$up" "$scenario.$name"
  out=$(taskset -c 1 "$BIN/tlsload" --connections 16 --seconds "$SECONDS_PER_RUN" "$@")
  read -r rps reqs errors p50 p99 tls alpn busy first < <(python3 -c '
import json, sys
d = json.loads(sys.argv[1])
print(d["rps"], d["requests"], d["errors"], d["p50_ms"], d["p99_ms"], d["tls"].replace(" ", "/"),
      d["alpn"], round(d["client_cpu_busy"], 2), (d["first_error"] or "-").replace(" ", "_"))' "$out")
  finish "$reqs"
  echo "$out" >>"$DIR/$scenario.$name.raw"
  [ "$errors" = 0 ] || echo "!! $scenario/$name: $errors errors, first: $first" >&2
  echo "$rps $p50 $p99 $M_CPU $errors $M_UPCPU $busy $M_SYS" >>"$DIR/$scenario.$name"
  note "$scenario.$name" "client TLS $tls, ALPN $alpn" tls
  printf '   %s/%s: %.0f req/s, p50 %.3f ms, p99 %.3f ms, %s CPU-s/1k req (kernel %s), %s errors, client busy %s\n' \
    "$scenario" "$name" "$rps" "$p50" "$p99" "$M_CPU" "$M_SYS" "$errors" "$busy" >&2
}

# run_grpc SCENARIO NAME PID URL -> the same columns as run_tls
run_grpc() {
  local scenario=$1 name=$2 pid=$3 url=$4
  local s0 s1 out rps ok failed non2xx p50 p99 unseen unauthorized conns errors busy
  rm -f "$DIR/h2load.log"  # h2load appends to it
  s0=$(grpc_stats)
  begin "$pid" "$GRPCUP_PID" "$scenario.$name"
  out=$(taskset -c 1 /usr/bin/time -f '%U %S' -o "$DIR/h2load.time" h2load -c 16 -m 10 -D "$SECONDS_PER_RUN" \
    -d "$DIR/grpc.bin" -H 'content-type: application/grpc' -H 'te: trailers' --log-file "$DIR/h2load.log" "$url")
  s1=$(grpc_stats)
  echo "$out" >>"$DIR/$scenario.$name.raw"
  rps=$(awk '/^finished in/ {print $4}' <<<"$out" | tr -d ,)
  # h2load's "failed" are streams with no answer; "succeeded" counts any
  # status, so only 2xx answers are taken as done.
  failed=$(awk '/^requests:/ {print $10}' <<<"$out")
  read -r ok non2xx < <(awk '/^status codes:/ {print $3, $5 + $7 + $9}' <<<"$out")
  finish "$ok"
  read -r p50 p99 < <(awk -F'\t' '$2 == 200 {print $3}' "$DIR/h2load.log" | sort -n \
    | awk '{a[NR]=$1} END {if (NR) printf "%.3f %.3f\n", a[int((NR-1)*0.5+1.5)]/1000, a[int((NR-1)*0.99+1.5)]/1000; else print "nan nan"}')
  # Calls answered 2xx but never seen by the upstream (a proxy's own gRPC
  # refusal), and, through a proxy, calls that reached it without a Bearer.
  read -r unseen unauthorized conns < <(python3 -c '
import json, sys
s0, s1, ok, proxied = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
served = s1["served"] - s0["served"]
auth = s1["authorized"] - s0["authorized"]
print(max(0, ok - served), (served - auth) if proxied else 0, s1["connections"] - s0["connections"])' \
    "$s0" "$s1" "$ok" "$([ -n "$pid" ] && echo 1 || echo 0)")
  errors=$((failed + non2xx + unseen + unauthorized))
  [ "$errors" = 0 ] || echo "!! $scenario/$name: $errors errors ($failed failed, $non2xx non-2xx, $unseen never reached the upstream, $unauthorized without credential)" >&2
  busy=$(awk -v s="$SECONDS_PER_RUN" '{printf "%.2f", ($1 + $2) / s}' "$DIR/h2load.time")
  echo "$rps $p50 $p99 $M_CPU $errors $M_UPCPU $busy $M_SYS" >>"$DIR/$scenario.$name"
  note "$scenario.$name" "client $(grep -E '^(TLS Protocol|Cipher|Application protocol)' <<<"$out" | tr '\n' ' ')| upstream connections opened: $conns" tls
  printf '   %s/%s: %.0f req/s, p50 %.3f ms, p99 %.3f ms, %s CPU-s/1k req (kernel %s), %s errors, %s upstream connections opened, client busy %s\n' \
    "$scenario" "$name" "$rps" "$p50" "$p99" "$M_CPU" "$M_SYS" "$errors" "$conns" "$busy" >&2
}

scenario() {
  local s=$1
  case $s in
    https)
      run_tls "$s" direct "" "$UP_PID" --url https://bench.internal/ --connect-to "$UP_TLS13" --cafile "$DIR/ca.pem"
      run_tls "$s" nginx "$PEER_PID" "$UP_PID" --url "https://$HTTPS_HOST/" --connect-to "$PEER_HTTPS" --cafile "$DIR/ca.pem"
      run_tls "$s" sidecar "$SIDECAR_PID" "$UP_PID" --url "https://$HTTPS_HOST/" --connect-proxy "$PROXY" \
        --cafile "$DIR/sidecar-ca.pem" ;;
    grpc)
      run_grpc "$s" direct "" "https://$UP_GRPC/bench.Echo/Unary"
      run_grpc "$s" nginx "$PEER_PID" "http://$PEER_GRPC/bench.Echo/Unary"
      run_grpc "$s" sidecar "$SIDECAR_PID" "http://$SIDECAR_GRPC/bench.Echo/Unary" ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
}

for round in $(seq "$ROUNDS"); do
  echo "==> round $round of $ROUNDS (${SECONDS_PER_RUN}s per run)" >&2
  for s in $SCENARIOS; do scenario "$s"; done
done

sum_errors() { awk '{e += $5} END {print e + 0}' "$DIR/$1.$2"; }
echo
echo "Closed loop, ${SECONDS_PER_RUN}s x $ROUNDS rounds per path, medians (errors: summed); $(date -u '+%Y-%m-%d %H:%M UTC'); sidecar ready ${ready_ms} ms after start"
for s in $SCENARIOS; do
  echo
  echo "**$s**"
  echo
  echo "| path | req/s | p50 | p99 | CPU-s per 1k req (kernel share) | upstream CPU-s per 1k req | client busy | errors |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  for name in direct nginx sidecar; do
    printf "| %s | %.0f | %.3f ms | %.3f ms | %s | %s | %s | %s |\n" "$name" "$(col "$s" "$name" 1)" "$(col "$s" "$name" 2)" \
      "$(col "$s" "$name" 3)" "$( [ "$name" = direct ] && echo - || echo "$(col "$s" "$name" 4) ($(col "$s" "$name" 8))")" \
      "$(col "$s" "$name" 6)" "$(col "$s" "$name" 7)" "$(sum_errors "$s" "$name")"
  done
  awk -v s="$(col "$s" sidecar 1)" -v n="$(col "$s" nginx 1)" -v d="$(col "$s" direct 1)" \
    'BEGIN { printf "\nsidecar/nginx %.2f, sidecar/direct %.2f, nginx/direct %.2f\n\n", s/n, s/d, n/d }'
  for name in direct nginx sidecar; do echo "- $name, per run: $(sort "$DIR/$s.$name.tls" | uniq -c | sed -E 's/^ *//' | paste -sd ';')"; done
done
echo
echo "What the upstreams' TLS servers saw of the proxies' connections:"
if [[ " $SCENARIOS " == *" https "* ]]; then
  echo "- https, nginx → upstream nginx (a first request, before the runs): $tlsinfo_nginx"
  echo "- https, sidecar → upstream nginx (the same): $tlsinfo_sidecar"
fi
echo "- grpc upstream, every handshake (direct, nginx and sidecar together, version suite ALPN kind: count): $(grpc_stats \
  | python3 -c 'import json,sys; print("; ".join(f"{k}: {v}" for k, v in json.load(sys.stdin)["handshakes"].items()))')"
echo
echo "| scenario | direct | nginx | sidecar | sidecar/nginx | CPU-s per 1k req, nginx / sidecar | errors, nginx / sidecar |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for s in $SCENARIOS; do
  sc=$(col "$s" sidecar 1); ng=$(col "$s" nginx 1)
  printf "| %s | %.0f req/s | %.0f | %.0f | **%s** | %s / %s | %s / %s |\n" "$s" "$(col "$s" direct 1)" "$ng" "$sc" \
    "$(awk -v s="$sc" -v n="$ng" 'BEGIN { printf "%.2f", s/n }')" "$(col "$s" nginx 4)" "$(col "$s" sidecar 4)" \
    "$(sum_errors "$s" nginx)" "$(sum_errors "$s" sidecar)"
done
if [ -n "${PERF:-}" ]; then
  for f in "$DIR"/perf.*.data; do
    echo
    echo "perf, $(basename "$f" .data | sed 's/^perf\.//'): share of CPU samples by object, then the top symbols"
    # head closes the pipe early: not a failure
    perf report -i "$f" --no-children --sort dso --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -6 || true
    perf report -i "$f" --no-children --sort dso,sym --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -30 | cut -c1-150 || true
  done
fi
echo
echo "Raw outputs and logs: $DIR"

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

need_nginx_wrk

echo "==> building release binaries" >&2
cargo build --release --quiet -p leash-control-plane -p leash-proxy
cargo build --release --quiet -p leash-benches --bin openloop
BIN=target/release
scratch lshload

# shellcheck source=benches/load/setup.sh
source benches/load/setup.sh

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

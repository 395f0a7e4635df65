#!/usr/bin/env bash
# Soak: a bounded open-loop run through the release sidecar while the
# credential in use is revoked every 15 s (the sidecar fetches a fresh one)
# and SVIDs rotate every 30 s (60 s lifetime). Reports the sidecar's RSS at
# start, every minute and at the end, the error count, and whether the usage
# the control plane stored equals the requests the upstream answered.
#
#   ./benches/load/soak.sh [MINUTES] [RATE]        defaults: 5 minutes at 2,000 req/s
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
MINUTES=${1:-5}
RATE=${2:-2000}
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || { apt-get install -y -qq nginx-light >/dev/null; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
echo "==> building release binaries" >&2
cargo build --release --quiet -p leash-control-plane -p leash-proxy
cargo build --release --quiet -p leash-benches --bin openloop
BIN=target/release
DIR=$(mktemp -d /tmp/lshsoak.XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

UP=127.0.0.1:19390 SIDECAR=127.0.0.1:19392
mkdir -p "$DIR/nginx"
cat >"$DIR/nginx/nginx.conf" <<CONF
worker_processes 1; daemon off; pid $DIR/nginx/pid; error_log $DIR/nginx/error.log;
events { worker_connections 4096; }
http { access_log $DIR/nginx/access.log; keepalive_requests 1000000;
  server { listen $UP; location / { return 200 "ok\n"; } } }
CONF
"$NGINX" -p "$DIR/nginx" -c "$DIR/nginx/nginx.conf" & pids+=($!)
TD=leash.test
RUST_LOG=leash_control_plane=debug "$BIN/leash-control-plane" dev-identity --svid-ttl 60s --socket "$DIR/cp.sock=spiffe://$TD/leash/control-plane" \
  --socket "$DIR/app.sock=spiffe://$TD/ns/bench/sa/client" 2>"$DIR/identity.log" & pids+=($!)
for _ in $(seq 100); do [ -S "$DIR/app.sock" ] && break; sleep 0.05; done
cat >"$DIR/policy.yaml" <<YAML
version: 1
upstreams:
  - name: bench
    hosts: [bench.leash.test]
    target: http://$UP
    credential: { kind: jwt, ttl: 10m }
grants:
  - workload: spiffe://$TD/ns/bench/sa/client
    upstreams: [bench]
YAML
RUST_LOG=warn "$BIN/leash-control-plane" serve --policy "$DIR/policy.yaml" --data-dir "$DIR/data" \
  --listen 127.0.0.1:19643 --admin-listen 127.0.0.1:19680 \
  --spiffe-endpoint "unix://$DIR/cp.sock" --insecure-dev 2>"$DIR/cp.log" & pids+=($!)
for _ in $(seq 200); do curl -fs -o /dev/null http://127.0.0.1:19680/readyz && break; sleep 0.05; done
RUST_LOG=warn "$BIN/leash-proxy" --spiffe-endpoint "unix://$DIR/app.sock" \
  --control-plane 127.0.0.1:19643 --listen 127.0.0.1:19393 --admin-listen 127.0.0.1:19394 \
  --upstream-listener "bench=$SIDECAR" 2>"$DIR/sidecar.log" & SIDECAR_PID=$!; pids+=($SIDECAR_PID)
for _ in $(seq 400); do curl -fs -o /dev/null http://127.0.0.1:19394/readyz && break; sleep 0.01; done
curl -fsS -o /dev/null "http://$SIDECAR/"
export LEASH_ADDR=http://127.0.0.1:19680 LEASH_TOKEN
LEASH_TOKEN=$(cat "$DIR/data/admin-token")
sleep 1
rss_start=$(rss_kib "$SIDECAR_PID")
seconds=$((MINUTES * 60))
echo "==> $MINUTES min at $RATE req/s; sidecar RSS at start $((rss_start / 1024)) MiB" >&2
"$BIN/openloop" --url "http://$SIDECAR/" --rate "$RATE" --seconds "$seconds" --connections 32 >"$DIR/openloop.json" &
load=$!
revocations=0
rss_samples="$((rss_start / 1024))"
for t in $(seq 15 15 $((seconds - 5))); do
  sleep 15
  cred=$(curl -fs http://127.0.0.1:19394/config_dump | python3 -c 'import json,sys; print(next(r["credential_id"] for r in json.load(sys.stdin)["routes"] if r["upstream"]=="bench") or "")')
  if [ -n "$cred" ]; then
    "$BIN/leashctl" revoke credential "$cred" --reason "soak rotation" >/dev/null && revocations=$((revocations + 1))
  fi
  if [ $((t % 60)) -eq 0 ]; then rss_samples="$rss_samples $(( $(rss_kib "$SIDECAR_PID") / 1024 ))"; fi
done
wait "$load"
rss_end=$(rss_kib "$SIDECAR_PID")
kill -TERM "$SIDECAR_PID"; wait "$SIDECAR_PID" 2>/dev/null || true   # ships its last usage batch
read -r achieved requests errors p99 < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["achieved"], d["requests"], d["errors"], d["p99_ms"])' "$DIR/openloop.json")
upstream_saw=$(grep -c ' 200 ' "$DIR/nginx/access.log" || true)
used=$("$BIN/leashctl" --json usage | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["requests"], d["dropped_requests"])')
svids=$(grep -c "rotated dev SVID" "$DIR/identity.log" || true)

echo
echo "| minutes | rate | requests | errors | p99 | revocations of the credential in use | sidecar RSS start → each minute → end | upstream answered | usage stored (requests, dropped) |"
echo "|---:|---:|---:|---:|---:|---:|---|---:|---|"
echo "| $MINUTES | $achieved | $requests | $errors | $p99 ms | $revocations | $rss_samples → $((rss_end / 1024)) MiB | $upstream_saw | $used |"
echo "SVID rotations during the run: $svids (60 s SVIDs re-issued at half-life, for the sidecar and the control plane)"

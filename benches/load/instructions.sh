#!/usr/bin/env bash
# Instructions per proxied request: the release sidecar under valgrind's
# callgrind (instruction counts are reproducible here, where perf has no
# hardware counters and wall-clock CPU time moves ±10 % between runs), the
# same setup as run.sh, wrk keep-alive load (16 connections) for SECONDS
# after a 2 s warm-up; counters are zeroed after the warm-up, so start-up is
# not counted. Prints the total, the requests and their ratio, and the top
# functions by inclusive cost (the profile stays in the scratch directory:
# open it with callgrind_annotate or kcachegrind).
#
#   ./benches/load/instructions.sh [SECONDS]        default: 15
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benches/load/lib.sh
source benches/load/lib.sh
SECONDS_PER_RUN=${1:-15}
need_nginx_wrk
command -v valgrind >/dev/null || { echo "==> installing valgrind" >&2; apt-get install -y -qq valgrind >/dev/null; }

echo "==> building release binaries" >&2
cargo build --release --quiet -p leash-control-plane -p leash-proxy
BIN=target/release
scratch lshinstr
OUT=$DIR/callgrind.out
SIDECAR_WRAP="valgrind --tool=callgrind --callgrind-out-file=$OUT"
# shellcheck source=benches/load/setup.sh
source benches/load/setup.sh

taskset -c 1 wrk -t1 -c16 -d2s "http://$SIDECAR/" >/dev/null
callgrind_control -z "$SIDECAR_PID" >/dev/null 2>&1
requests=$(taskset -c 1 wrk -t1 -c16 -d"${SECONDS_PER_RUN}s" "http://$SIDECAR/" | awk '/requests in/ {print $1}')
callgrind_control -d "$SIDECAR_PID" >/dev/null 2>&1
total=$(callgrind_annotate "$OUT.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo
echo "sidecar under callgrind, wrk keep-alive 16 connections, ${SECONDS_PER_RUN}s: $requests requests, $total instructions"
echo "instructions per request: $((total / requests))"
echo "profile: $OUT.1"
echo
callgrind_annotate --inclusive=yes "$OUT.1" 2>/dev/null | grep -E '^ *[0-9,]+ \(' | grep -vE 'PROGRAM TOTALS|\?\?\?|libc-start|rt.rs|function.rs|backtrace.rs|runtime.rs|context|scheduler|task/' \
  | head -25 | sed -E 's|/[^ ]*/registry/src/[^/]+/||; s|/rustc/[0-9a-f]+/||; s| \[[^]]*\]$||' | cut -c1-160 \
  || true  # head closes the pipe early: not a failure

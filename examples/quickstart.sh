#!/usr/bin/env bash
# Brings up a whole local Leash deployment: the dev identity provider, the
# control plane (SQLite under a data dir), one sidecar and an example upstream
# that accepts only Leash JWTs. Runs until Ctrl-C.
#
#   ./examples/quickstart.sh            # interactive
#   LEASH_QUICKSTART_SMOKE=1 ./examples/quickstart.sh   # check and exit (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${LEASH_QUICKSTART_DIR:-/tmp/leash-quickstart}
BIN=${LEASH_BIN_DIR:-target/debug}
TD=leash.test
CP_ID=spiffe://$TD/leash/control-plane
APP_ID=spiffe://$TD/ns/demo/sa/payments-client

if [ -z "${LEASH_BIN_DIR:-}" ]; then
  echo "==> building (cargo build --bins)"
  cargo build --quiet --bins
fi
mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR"/*.sock

# shellcheck source=examples/local-run.sh
. examples/local-run.sh
start_dev_identity

echo "==> control plane on 127.0.0.1:8443 (sidecar API) and 127.0.0.1:8080 (admin)"
# The master key encrypts brokered secrets; it lives outside the database.
[ -f "$RUN_DIR/master.key" ] || (umask 077 && "$BIN/leash-control-plane" master-key > "$RUN_DIR/master.key")
"$BIN/leash-control-plane" serve --policy examples/quickstart/policy.yaml \
  --data-dir "$RUN_DIR/data" --spiffe-endpoint "unix://$RUN_DIR/control-plane.sock" \
  --master-key-file "$RUN_DIR/master.key" \
  2>"$RUN_DIR/control-plane.log" &
pids+=($!)
wait_for http://127.0.0.1:8080/readyz "control plane"

echo "==> example upstream (payments API) on 127.0.0.1:9090"
"$BIN/example-upstream" 2>"$RUN_DIR/upstream.log" &
pids+=($!)

echo "==> sidecar on 127.0.0.1:15001 (egress) and 127.0.0.1:15000 (admin)"
"$BIN/leash-proxy" --spiffe-endpoint "unix://$RUN_DIR/workload.sock" \
  --control-plane-id "$CP_ID" 2>"$RUN_DIR/sidecar.log" &
pids+=($!)
wait_for http://127.0.0.1:15000/readyz "sidecar"

TOKEN=$(cat "$RUN_DIR/data/admin-token")

cat <<TXT

Leash is up. The workload has no secret; its sidecar fetches one per upstream.

  curl -x http://127.0.0.1:15001 http://payments.leash.test/whoami
      -> the upstream verified a short-lived JWT and answers with the caller's SPIFFE ID
  curl -x http://127.0.0.1:15001 http://ledger.leash.test/
      -> 403 not_granted: policy does not grant this workload that upstream
  curl -x http://127.0.0.1:15001 http://example.com/
      -> 403 unknown_upstream: deny by default
  curl http://127.0.0.1:8080/.well-known/jwks.json     (the public keys)
  curl http://127.0.0.1:15000/readyz                   (sidecar readiness)

Revoke, and watch it take effect (leashctl is in $BIN):
  export LEASH_ADDR=http://127.0.0.1:8080 LEASH_TOKEN=$TOKEN
  $BIN/leashctl sidecars
  $BIN/leashctl revoke grant --workload $APP_ID --upstream payments --reason "demo"
  curl -x http://127.0.0.1:15001 http://payments.leash.test/whoami    -> 403 revoked_grant
  $BIN/leashctl status <revocation id>                 (who acknowledged it, and when)
  $BIN/leashctl restore <revocation id> --reason "demo over"
  $BIN/leashctl usage deps                             (who called what, with which kind of credential; every 5 s)

Logs: $RUN_DIR/*.log   Stop: Ctrl-C
TXT

if [ -n "${LEASH_QUICKSTART_SMOKE:-}" ]; then
  out=$(curl -fsS -x http://127.0.0.1:15001 http://payments.leash.test/whoami)
  echo "whoami: $out"
  echo "$out" | grep -q "\"sub\":\"$APP_ID\"" || { echo "!! unexpected answer" >&2; exit 1; }
  code=$(curl -s -o /dev/null -w '%{http_code}' -x http://127.0.0.1:15001 http://ledger.leash.test/)
  [ "$code" = 403 ] || { echo "!! ledger answered $code, want 403" >&2; exit 1; }
  export LEASH_ADDR=http://127.0.0.1:8080 LEASH_TOKEN=$TOKEN
  id=$("$BIN/leashctl" --json revoke grant --workload "$APP_ID" --upstream payments --reason smoke \
        | sed -n 's/^  "id": "\(.*\)",$/\1/p')
  [ -n "$id" ] || { echo "!! revoke failed" >&2; exit 1; }
  for _ in $(seq 1 50); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -x http://127.0.0.1:15001 http://payments.leash.test/whoami)
    [ "$code" = 403 ] && break; sleep 0.1
  done
  [ "$code" = 403 ] || { echo "!! revoked grant still answered $code" >&2; exit 1; }
  "$BIN/leashctl" status "$id"
  "$BIN/leashctl" restore "$id" --reason "smoke over" >/dev/null
  for _ in $(seq 1 50); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -x http://127.0.0.1:15001 http://payments.leash.test/whoami)
    [ "$code" = 200 ] && break; sleep 0.1
  done
  [ "$code" = 200 ] || { echo "!! restore not applied ($code)" >&2; exit 1; }
  # Usage arrives every report interval (5 s).
  for _ in $(seq 1 100); do
    deps=$("$BIN/leashctl" usage deps)
    echo "$deps" | grep -q "payments" && break; sleep 0.1
  done
  echo "$deps"
  echo "$deps" | grep -q "$APP_ID  *payments  *jwt" || { echo "!! no usage edge for payments" >&2; exit 1; }
  echo "quickstart smoke check passed"
  exit 0
fi
wait

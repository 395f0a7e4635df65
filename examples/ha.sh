#!/usr/bin/env bash
# Two control-plane replicas on one PostgreSQL database, without containers:
# PostgreSQL in a temporary directory (removed at exit), the dev identity
# provider, replicas 1 and 2 with the same master key and issuer, one sidecar
# given both replicas' addresses, and the example upstream. Runs until Ctrl-C.
# Needs PostgreSQL's server binaries (initdb, pg_ctl; Debian: apt-get install
# postgresql), curl and python3.
#
#   ./examples/ha.sh                      # interactive
#   LEASH_HA_SMOKE=1 ./examples/ha.sh     # check and exit (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${LEASH_HA_DIR:-/tmp/leash-ha}
BIN=${LEASH_BIN_DIR:-target/debug}
TD=leash.test
CP_ID=spiffe://$TD/leash/control-plane
APP_ID=spiffe://$TD/ns/demo/sa/payments-client
# One issuer for both replicas: a JWT's `iss` must not depend on which
# replica signed it, and the default is each replica's own admin address.
ISSUER=http://control-plane.leash.test

pg_bin=""
for d in "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")" \
  /usr/lib/postgresql/*/bin /usr/local/bin; do
  if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
    # The directory of the real binaries, where createdb and postgres are
    # too (/usr/local/bin may hold links to a few of them only).
    pg_bin="$(dirname "$(readlink -f "$d/initdb")")"
    break
  fi
done
if [ -z "$pg_bin" ]; then
  echo "!! initdb and pg_ctl not found (on PATH, in /usr/lib/postgresql/*/bin or /usr/local/bin):" >&2
  echo "   install PostgreSQL's server, e.g. apt-get install postgresql" >&2
  exit 1
fi

if [ -z "${LEASH_BIN_DIR:-}" ]; then
  echo "==> building (cargo build --bins)"
  cargo build --quiet --bins
fi
# Logs stay in RUN_DIR after exit; each run starts on an empty database.
mkdir -p "$RUN_DIR"
rm -rf "$RUN_DIR"/*.sock "$RUN_DIR"/replica-1 "$RUN_DIR"/replica-2 "$RUN_DIR"/*.log

# Eight free ports on 127.0.0.1, held together while chosen so they differ.
read -r PG_PORT CP1 ADMIN1 CP2 ADMIN2 UPSTREAM EGRESS SIDECAR_ADMIN < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')

# shellcheck source=examples/local-run.sh
. examples/local-run.sh
pg_dir=""
pg_stop=()
# At exit, once the control planes are gone: PostgreSQL and its data.
after_processes() {
  if [ "${#pg_stop[@]}" -gt 0 ]; then (cd / && "${pg_stop[@]}" >/dev/null 2>&1) || true; fi
  if [ -n "$pg_dir" ]; then rm -rf "$pg_dir"; fi
  rm -f "$RUN_DIR/database-url"
}

# initdb refuses to run as root: as root, PostgreSQL runs as nobody, in a
# directory of its own under /tmp that nobody can enter.
pg_dir="$(mktemp -d /tmp/leash-ha-pg.XXXX)"
as=()
if [ "$(id -u)" = 0 ]; then
  chown nobody "$pg_dir"
  as=(runuser -u nobody --)
fi
echo "==> PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') in $pg_dir on 127.0.0.1:$PG_PORT"
# Password authentication even on loopback: other local users cannot reach
# the store. The password is in no command line and no log.
PG_PASSWORD=$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')
(umask 077 && printf '%s\n' "$PG_PASSWORD" > "$pg_dir/pw")
if [ "${#as[@]}" -gt 0 ]; then chown nobody "$pg_dir/pw"; fi
(cd "$pg_dir" && "${as[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -U postgres --pwfile="$pg_dir/pw" \
  -A scram-sha-256 -E UTF8 --no-locale >"$RUN_DIR/initdb.log" 2>&1) \
  || { cat "$RUN_DIR/initdb.log" >&2; exit 1; }
rm -f "$pg_dir/pw"
pg_stop=("${as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" stop -m fast)
(cd "$pg_dir" && "${as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w \
  -o "-p $PG_PORT -k $pg_dir -c listen_addresses=127.0.0.1" start >/dev/null) \
  || { cat "$pg_dir/server.log" >&2; exit 1; }
PGPASSWORD=$PG_PASSWORD "$pg_bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres leash
export LEASH_DATABASE_URL="postgres://postgres:$PG_PASSWORD@127.0.0.1:$PG_PORT/leash"
(umask 077 && printf '%s\n' "$LEASH_DATABASE_URL" > "$RUN_DIR/database-url")

start_dev_identity

# The quickstart's policy, with the upstream on this run's port.
sed "s#http://127.0.0.1:9090#http://127.0.0.1:$UPSTREAM#" examples/quickstart/policy.yaml > "$RUN_DIR/policy.yaml"
# One master key for both: the signing keys in the database are sealed with it.
(umask 077 && "$BIN/leash-control-plane" master-key > "$RUN_DIR/master.key")
replica() { # n sidecar-port admin-port
  "$BIN/leash-control-plane" serve --policy "$RUN_DIR/policy.yaml" \
    --data-dir "$RUN_DIR/replica-$1" --spiffe-endpoint "unix://$RUN_DIR/control-plane.sock" \
    --master-key-file "$RUN_DIR/master.key" --issuer "$ISSUER" \
    --listen "127.0.0.1:$2" --admin-listen "127.0.0.1:$3" \
    2>"$RUN_DIR/replica-$1.log" &
  pids+=($!)
  wait_for "http://127.0.0.1:$3/readyz" "control plane replica $1"
}
# Replica 1 first: on an empty database it creates the tables, the signing
# key and the bootstrap admin token (in its own data directory); replica 2
# finds them there.
echo "==> control plane replica 1 on 127.0.0.1:$CP1 (sidecar API) and 127.0.0.1:$ADMIN1 (admin)"
replica 1 "$CP1" "$ADMIN1"
CP1_PID=${pids[-1]}
echo "==> control plane replica 2 on 127.0.0.1:$CP2 (sidecar API) and 127.0.0.1:$ADMIN2 (admin)"
replica 2 "$CP2" "$ADMIN2"

echo "==> example upstream (payments API) on 127.0.0.1:$UPSTREAM"
# Its JWKS from replica 2, the one this recipe keeps; in a cluster, from the
# address in front of every replica.
"$BIN/example-upstream" --listen "127.0.0.1:$UPSTREAM" --issuer "$ISSUER" \
  --jwks-url "http://127.0.0.1:$ADMIN2/.well-known/jwks.json" 2>"$RUN_DIR/upstream.log" &
pids+=($!)

echo "==> sidecar on 127.0.0.1:$EGRESS (egress) and 127.0.0.1:$SIDECAR_ADMIN (admin), replica 1 then replica 2"
"$BIN/leash-proxy" --spiffe-endpoint "unix://$RUN_DIR/workload.sock" \
  --control-plane-id "$CP_ID" --listen "127.0.0.1:$EGRESS" --admin-listen "127.0.0.1:$SIDECAR_ADMIN" \
  --control-plane "127.0.0.1:$CP1" --control-plane "127.0.0.1:$CP2" 2>"$RUN_DIR/sidecar.log" &
pids+=($!)
wait_for "http://127.0.0.1:$SIDECAR_ADMIN/readyz" "sidecar"

export LEASH_TOKEN
LEASH_TOKEN=$(cat "$RUN_DIR/replica-1/admin-token")

cat <<TXT

Two replicas on one database are up. The sidecar tried replica 1 first, so
its session is there; any replica takes admin calls.

  curl -x http://127.0.0.1:$EGRESS http://payments.leash.test/whoami
      -> the upstream verified a short-lived JWT and answers with the caller's SPIFFE ID

Revoke on replica 2, watch the sidecar on replica 1 enforce it (leashctl is in $BIN):
  export LEASH_TOKEN=\$(cat $RUN_DIR/replica-1/admin-token)   (replica 1 made it: the first to start)
  $BIN/leashctl --addr http://127.0.0.1:$ADMIN2 revoke grant --workload $APP_ID --upstream payments --reason demo
  curl -x http://127.0.0.1:$EGRESS http://payments.leash.test/whoami    -> 403 revoked_grant
  $BIN/leashctl --addr http://127.0.0.1:$ADMIN2 status <revocation id>
  $BIN/leashctl --addr http://127.0.0.1:$ADMIN2 restore <revocation id> --reason "demo over"

Lose replica 1; the sidecar moves to replica 2:
  kill -9 $CP1_PID
  curl -x http://127.0.0.1:$EGRESS http://payments.leash.test/whoami
  $BIN/leashctl --addr http://127.0.0.1:$ADMIN2 sidecars

A token of your own, made offline straight in the database (psql takes the URL too):
  LEASH_DATABASE_URL=\$(cat $RUN_DIR/database-url) \\
    $BIN/leash-control-plane tokens create --data-dir $RUN_DIR/replica-2 --name me --role admin

Logs: $RUN_DIR/*.log   Stop: Ctrl-C (PostgreSQL and its data go too)
TXT

if [ -z "${LEASH_HA_SMOKE:-}" ]; then
  wait
  exit 0
fi

echo
echo "==> HA smoke checks"
failed=()
pass() { echo "ok    $1"; }
fail() { echo "FAIL  $1: $2" >&2; failed+=("$1"); }
whoami_code() {
  curl -s -m 5 -o /dev/null -w '%{http_code}' -x "http://127.0.0.1:$EGRESS" http://payments.leash.test/whoami
}
now_ms() { date +%s%3N; }
# Waits up to $2 seconds for whoami to answer $1; prints the last code.
whoami_becomes() { # code seconds
  local code deadline=$(($(now_ms) + $2 * 1000))
  while :; do
    code=$(whoami_code)
    if [ "$code" = "$1" ] || [ "$(now_ms)" -ge "$deadline" ]; then break; fi
    sleep 0.1
  done
  echo "$code"
}
ctl() { # replica-admin-port args...
  local port=$1
  shift
  "$BIN/leashctl" --addr "http://127.0.0.1:$port" "$@"
}
expect_whoami() { # check code seconds; returns whether it passed
  local code
  code=$(whoami_becomes "$2" "$3")
  if [ "$code" = "$2" ]; then pass "$1"; else fail "$1" "answered $code after $3 s"; return 1; fi
}
# A grant revoked through replica 2's admin API: enforced by the sidecar
# within $2 seconds, acknowledged, restored.
revocation_round() { # who seconds
  local id status deadline name="a revocation made on replica 2 is enforced by $1 within $2 s"
  id=$({ ctl "$ADMIN2" --json revoke grant --workload "$APP_ID" --upstream payments --reason "ha smoke" \
    || true; } | sed -n 's/^  "id": "\(.*\)",$/\1/p')
  if [ -z "$id" ]; then
    fail "$name" "the revocation was refused"
    return
  fi
  local enforced=""
  if expect_whoami "$name" 403 "$2"; then enforced=1; fi
  name="replica 2 shows the acknowledgement of $1 within 5 s"
  deadline=$(($(now_ms) + 5000))
  while :; do
    status=$(ctl "$ADMIN2" status "$id" || true)
    if echo "$status" | grep -q "acknowledged by 1 sidecar" || [ "$(now_ms)" -ge "$deadline" ]; then break; fi
    sleep 0.1
  done
  if echo "$status" | grep -q "acknowledged by 1 sidecar"; then pass "$name"; else fail "$name" "$(echo "$status" | sed -n 2p)"; fi
  ctl "$ADMIN2" restore "$id" --reason "ha smoke over" >/dev/null || echo "!! restore of $id refused" >&2
  name="the restore made on replica 2 is applied by $1 within 5 s"
  if [ -n "$enforced" ]; then
    expect_whoami "$name" 200 5 || true
  else
    echo "skip  $name (the revocation never was)"
  fi
}

name="a request through the sidecar (session on replica 1)"
out=$(curl -s -m 5 -x "http://127.0.0.1:$EGRESS" http://payments.leash.test/whoami || true)
if echo "$out" | grep -q "\"sub\":\"$APP_ID\""; then pass "$name"; else fail "$name" "answered: $out"; fi

name="replica 1 holds the sidecar's session"
if { ctl "$ADMIN1" sidecars || true; } | grep -q "$APP_ID"; then pass "$name"; else fail "$name" "not in replica 1's sidecars"; fi

name="one store: replica 1's bootstrap token works on replica 2, and both publish the same keys"
jwks1=$(curl -fsS -m 5 "http://127.0.0.1:$ADMIN1/.well-known/jwks.json" || true)
jwks2=$(curl -fsS -m 5 "http://127.0.0.1:$ADMIN2/.well-known/jwks.json" || true)
if ! ctl "$ADMIN2" revocations >/dev/null; then
  fail "$name" "replica 2 refused the token"
elif [ -z "$jwks1" ] || [ "$jwks1" != "$jwks2" ]; then
  fail "$name" "the JWKS differ"
else
  pass "$name"
fi

revocation_round "the sidecar on replica 1" 5

echo "==> SIGKILL replica 1 (pid $CP1_PID)"
kill -KILL "$CP1_PID"
wait "$CP1_PID" 2>/dev/null || true
expect_whoami "a request through the sidecar after replica 1 died" 200 5 || true
# That request could be served from the credential cache without any
# control plane (for --max-staleness); a revocation enforced now proves a
# live session with replica 2. 10 s: failover is due within two heartbeat
# intervals (5 s each).
revocation_round "the sidecar, replica 1 dead," 10

name="the sidecar is ready on replica 2"
if curl -fsS -m 5 -o /dev/null "http://127.0.0.1:$SIDECAR_ADMIN/readyz"; then pass "$name"; else fail "$name" "/readyz not 200"; fi

name="neither the database password nor the admin token is in any log"
if grep -rqF -e "$PG_PASSWORD" -e "$LEASH_TOKEN" "$RUN_DIR"/*.log "$pg_dir/server.log" 2>/dev/null; then
  fail "$name" "found in $(grep -rlF -e "$PG_PASSWORD" -e "$LEASH_TOKEN" "$RUN_DIR"/*.log "$pg_dir/server.log" | tr '\n' ' ')"
else
  pass "$name"
fi

if [ "${#failed[@]}" -gt 0 ]; then
  echo "!! ha smoke check failed (${#failed[@]} checks; logs in $RUN_DIR):" >&2
  printf '   - %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "ha smoke check passed"

# Shared by run.sh and instructions.sh (sourced): the upstream and peer
# nginx (plain and TLS), a test PKI, the dev identity provider, the control
# plane and the sidecar under test, started and checked. Expects BIN, DIR,
# NGINX and the pids array; SIDECAR_WRAP, when set, prefixes the sidecar's
# command (a profiler). Sets SIDECAR_PID, PEER_PID, ready_ms and the
# addresses below. A caller adds servers, upstreams and listeners of its
# own (protocols.sh) by defining any of these functions, whose output goes
# in: extra_nginx_up and extra_nginx_peer (inside the upstream's and the
# peer's http {}), extra_policy (more upstreams) and extra_grants (their
# names, each after a comma); and the array SIDECAR_EXTRA_ARGS.
UP=127.0.0.1:19190 UP_TLS=127.0.0.1:19195 PEER=127.0.0.1:19191 PEER_TLS=127.0.0.1:19196
SIDECAR=127.0.0.1:19192 SIDECAR_TLS=127.0.0.1:19197
TOKEN="Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJiZW5jaCJ9.c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU"
extra() { ! declare -F "$1" >/dev/null || "$1"; }

# Test PKI for the TLS upstream.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
  -keyout "$DIR/ca.key" -out "$DIR/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=bench.internal" \
  -keyout "$DIR/up.key" -out "$DIR/up.csr" 2>/dev/null
printf 'subjectAltName=DNS:bench.internal\n' >"$DIR/ext.cnf"
openssl x509 -req -in "$DIR/up.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" -CAcreateserial -days 2 \
  -extfile "$DIR/ext.cnf" -out "$DIR/up.pem" 2>/dev/null
# The name a workload calls through a proxy that terminates its TLS
# (protocols.sh: nginx's certificate for it; the sidecar mints its own).
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=api.bench.test" \
  -keyout "$DIR/front.key" -out "$DIR/front.csr" 2>/dev/null
printf 'subjectAltName=DNS:api.bench.test\n' >"$DIR/front.cnf"
openssl x509 -req -in "$DIR/front.csr" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" -CAcreateserial -days 2 \
  -extfile "$DIR/front.cnf" -out "$DIR/front.pem" 2>/dev/null
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
           location / { return 200 "ok\n"; } }
  $(extra extra_nginx_up) }
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
    proxy_set_header Authorization "$TOKEN"; } }
  $(extra extra_nginx_peer) }
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
$(extra extra_policy)
grants:
  - workload: spiffe://$TD/ns/bench/sa/client
    upstreams: [bench, bench-tls$(extra extra_grants)]
YAML
RUST_LOG=warn "$BIN/leash-control-plane" serve --policy "$DIR/policy.yaml" --data-dir "$DIR/data" \
  --listen 127.0.0.1:19443 --admin-listen 127.0.0.1:19080 \
  --spiffe-endpoint "unix://$DIR/cp.sock" --insecure-dev 2>"$DIR/cp.log" & pids+=($!)
for _ in $(seq 200); do curl -fs -o /dev/null http://127.0.0.1:19080/readyz && break; sleep 0.05; done

start=$(date +%s%N)
# shellcheck disable=SC2086 # SIDECAR_WRAP is a command line, split on purpose
RUST_LOG=warn taskset -c 0 ${SIDECAR_WRAP:-} "$BIN/leash-proxy" --spiffe-endpoint "unix://$DIR/app.sock" \
  --control-plane 127.0.0.1:19443 --listen 127.0.0.1:19193 --admin-listen 127.0.0.1:19194 \
  --upstream-listener "bench=$SIDECAR" --upstream-listener "bench-tls=$SIDECAR_TLS" \
  --worker-threads "${LEASH_BENCH_WORKERS:-1}" ${SIDECAR_EXTRA_ARGS[@]+"${SIDECAR_EXTRA_ARGS[@]}"} 2>"$DIR/sidecar.log" & SIDECAR_PID=$!; pids+=($SIDECAR_PID)
for _ in $(seq 4000); do curl -fs -o /dev/null http://127.0.0.1:19194/readyz && break; sleep 0.005; done
ready_ms=$(( ($(date +%s%N) - start) / 1000000 ))
for url in "http://$SIDECAR/" "http://$SIDECAR_TLS/" "http://$PEER/" "http://$PEER_TLS/"; do
  curl -fsS -o /dev/null "$url" || { echo "!! $url does not answer" >&2; exit 1; }
done
PEER_PID=$(pgrep -P "$(cat "$DIR/nginx-peer/pid")" | head -1)
sleep 1

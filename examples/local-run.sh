# Shared by examples/quickstart.sh and examples/ha.sh, which source it: the
# processes they start (stopped at exit), readiness waits, and the dev
# identity provider. Uses BIN, RUN_DIR, TD, CP_ID and APP_ID.

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # What the script itself must undo once its processes are gone.
  if declare -F after_processes >/dev/null; then after_processes; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # url what
  for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "!! $2 did not become ready ($1); logs in $RUN_DIR" >&2
  exit 1
}

# A SPIFFE Workload API socket for the control plane(s) and one for the
# workload's sidecar, from one dev CA.
start_dev_identity() {
  echo "==> dev identity provider (SPIFFE Workload API) in $RUN_DIR"
  "$BIN/leash-control-plane" dev-identity --trust-domain "$TD" \
    --socket "$RUN_DIR/control-plane.sock=$CP_ID" \
    --socket "$RUN_DIR/workload.sock=$APP_ID" \
    --bundle-out "$RUN_DIR/bundle.pem" 2>"$RUN_DIR/dev-identity.log" &
  pids+=($!)
  for _ in $(seq 1 100); do [ -S "$RUN_DIR/workload.sock" ] && break; sleep 0.1; done
}

# Shared by the load benchmarks (sourced): process CPU and RSS, a wrk run
# appended to $DIR/SCENARIO.NAME, and medians of those files. Expects DIR,
# SECONDS_PER_RUN and the associative array max_rss.

TICKS=$(getconf CLK_TCK)

# Installs nginx-light and wrk with apt when missing; sets NGINX.
need_nginx_wrk() {
  local tool
  for tool in nginx wrk; do
    if ! command -v "$tool" >/dev/null && ! [ -x "/usr/sbin/$tool" ]; then
      echo "==> installing nginx-light and wrk" >&2; apt-get install -y -qq nginx-light wrk >/dev/null; break
    fi
  done
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
}

# scratch PREFIX: a fresh directory in DIR; every process in pids is
# stopped on exit.
scratch() {
  DIR=$(mktemp -d "/tmp/$1.XXXX")
  pids=()
  trap cleanup EXIT
}
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run SCENARIO NAME URL PID CONNS [wrk args] -> appends "rps p50 p99 cpu_per_1k"
run() {
  local scenario=$1 name=$2 url=$3 pid=$4 conns=$5; shift 5
  local before after out rps reqs p50 p99 cpu errors rss
  before=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0 )
  out=$(taskset -c 1 wrk -t1 -c"$conns" -d"${SECONDS_PER_RUN}s" --latency "$@" "$url")
  after=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0 )
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errors=$(grep -E 'Non-2xx|Socket errors' <<<"$out" || true)
  [ -z "$errors" ] || echo "!! $scenario/$name: $errors" >&2
  cpu=$(awk -v a="$after" -v b="$before" -v t="$TICKS" -v r="$reqs" 'BEGIN { if (r>0) printf "%.4f", (a-b)/t/(r/1000); else print "nan" }')
  echo "$rps $p50 $p99 $cpu" >>"$DIR/$scenario.$name"
  if [ -n "$pid" ]; then
    rss=$(rss_kib "$pid"); [ "$rss" -gt "${max_rss[$name]:-0}" ] && max_rss[$name]=$rss
  fi
  echo "   $scenario/$name: $rps req/s, p50 $p50, p99 $p99, ${cpu} CPU-s/1k req" >&2
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
col() { awk -v c="$3" '{print $c}' "$DIR/$1.$2" | sed -E 's/us$/e-3/; s/ms$//; s/([0-9.]+)s$/\1e3/' | median; }

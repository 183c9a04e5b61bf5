#!/usr/bin/env bash
# Measures Strata side by side with bare peers, on a fresh local broker, and writes the figures.
#
#   scripts/bench.sh [--smoke] [--runs K] [--events N] [--fresh-rate R] [--fresh-secs S]
#                    [--fresh-sample K] [--wrk-secs S] [--backlog B] [--memory-events M]
#                    [--soak-secs T] [--only LIST] [--profile]
#                    [--out FILE]
#
#   ingest     N events (default 1,000,000; smoke 20,000) on a 4-partition topic, read to the end
#              by a bare rdkafka consumer (`strata-bench consume`) and by `strata speed` on a fresh
#              data dir (time until its stored offsets, seen through `strata serve`'s
#              /v1/status, reach the end); K runs each, interleaved, medians (default 3; smoke 1);
#              then the speed layer's ceiling without the broker (`strata-bench speed-ceiling`:
#              the same workers fed N records from a file), on 1 worker and one per core
#   serving    `strata up` loaded with the ingest topic and one batch run: each route alone (one
#              request at a time, computed), then under a live stream of 2,000 events/s, wrk (64
#              connections, 2 threads, S s, default 10; smoke 2; --latency) against a bare warp
#              hello-world server (`strata-bench hello`) and against each read route with another
#              key each request, over every generated item and user (uniform, and a Zipf law) or
#              every combination of a ranking's parameters, the share of kept answers beside each;
#              then one URL over and over (kept answers, for comparison); then a batch run: the
#              new version's load time and the first request of each route after it (cold);
#              then `strata serve` alone on the same data directory: its load time, its memory
#              once loaded and its peak after each route's spread keys (the serving layer's RSS)
#   freshness  then, with the same `strata up`, for each rate R of a list (default
#              5000,20000,50000; smoke 500): R events/s for S s (default 30; smoke 3), each for a
#              new item; 1 in K (--fresh-sample, default 250;
#              smoke 50) timed from produce to a 200 answer (polled every 5 ms, or a tenth of its
#              age when longer), and to its arrival at a bare consumer reading the topic's end
#   soak       then, with the same `strata up`, T s (default 600; smoke 30) of a steady stream
#              (2,000 events/s) and a steady query load at 80% of the maximum measured under that
#              stream (`strata-bench soak`: 64 connections, a new item, user or device each
#              request over a mix of the read routes, latency from each request's scheduled
#              time), sampled every 10 s (smoke 5): rate, p50/p99, errors, resident memory; per
#              route, the service time
#   batch      `strata batch --once` archives the ingest topic into the master dataset (Parquet);
#              then K times, equal work over the same span: a recompute (`strata batch --once`
#              again: read, fold and publish, its log's `with_publish_ms`) and
#              bench/duckdb_views.py computing every view of the version with DuckDB (PyPI duckdb,
#              as many threads as cores) over the same files and writing them to Parquet; an
#              item-pair self-join Strata does not compute is timed apart;
#              `strata-bench compare-batch` checks every view DuckDB computed equals Strata's
#   memory     (fresh broker) `strata speed` over M events (default 4,000,000; smoke 20,000;
#              --memory-events) spread over 7 days of event time: its peak RSS and the view keys
#              and event ids its state holds afterwards
#   recovery   (fresh broker) `strata speed` is killed with SIGKILL half-way through a head of B/10
#              events, B more (default 1,000,000; smoke 20,000) are produced, and the restarted
#              layer is timed until its stored offsets reach the end
#
#   hostile    (fresh broker) H messages (default 200,000; smoke 20,000; --hostile-events), half
#              of them malformed in every way the generator knows, read by `strata speed`: every
#              malformed one in the DLQ, the rest counted exactly (the generator's own counts)
#
#   retention  (no broker) `strata-bench retention`: a master dataset of R events (default
#              1,000,000; smoke 100,000; --retention-events) written directly, 30% of them
#              heartbeats and readings older than the rollup age: its bytes and the recompute's
#              time before and after a rollup and the purge (the versions' event counts equal)
#
#   --only ingest,serving,freshness,batch,memory,recovery,cluster,hostile,retention  run some parts only
#   --profile  one more, unmeasured, speed ingest run under `perf record` (report next to --out)
#   --out      results file (default $CARGO_TARGET_DIR/bench/results.json; smoke: smoke.json)
#
# Prints `name value unit` per figure on stdout (ratios have unit `ratio`), progress on stderr.
# Exits non-zero only when something is broken (a step fails, or a correctness check does not
# hold); the issue's goals are not checked here (see docs/PERFORMANCE.md).
# The broker listens on a free port (STRATA_BENCH_BROKER_PORT to choose one); logs and data go to
# a temporary directory, removed on success (kept on failure, or with STRATA_BENCH_KEEP=1).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$STRATA_ROOT"

smoke=0 profile=0 only="ingest,serving,freshness,soak,batch,memory,recovery,cluster,hostile,retention"
DUCKDB_VERSION="2.0.1"
hostile_events="" retention_events="" mem_events="" soak_secs="" runs="" events="" fresh_rate="" fresh_secs="" fresh_sample="" wrk_secs="" backlog="" out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --profile) profile=1 ;;
    --runs) runs="${2:?--runs needs a value}"; shift ;;
    --events) events="${2:?--events needs a value}"; shift ;;
    --fresh-rate) fresh_rate="${2:?--fresh-rate needs a value}"; shift ;;
    --fresh-secs) fresh_secs="${2:?--fresh-secs needs a value}"; shift ;;
    --fresh-sample) fresh_sample="${2:?--fresh-sample needs a value}"; shift ;;
    --wrk-secs) wrk_secs="${2:?--wrk-secs needs a value}"; shift ;;
    --backlog) backlog="${2:?--backlog needs a value}"; shift ;;
    --memory-events) mem_events="${2:?--memory-events needs a value}"; shift ;;
    --hostile-events) hostile_events="${2:?--hostile-events needs a value}"; shift ;;
    --retention-events) retention_events="${2:?--retention-events needs a value}"; shift ;;
    --soak-secs) soak_secs="${2:?--soak-secs needs a value}"; shift ;;
    --only) only="${2:?--only needs a value}"; shift ;;
    --out) out="${2:?--out needs a value}"; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
if [ "$smoke" = 1 ]; then
  : "${runs:=1}" "${events:=20000}" "${fresh_rate:=500}" "${fresh_secs:=3}" "${fresh_sample:=50}"
  : "${wrk_secs:=2}"
  : "${backlog:=20000}" "${mem_events:=20000}" "${hostile_events:=20000}" "${retention_events:=100000}" "${soak_secs:=30}" "${out:=$CARGO_TARGET_DIR/bench/smoke.json}"
else
  : "${runs:=3}" "${events:=1000000}" "${fresh_rate:=5000,20000,50000}" "${fresh_secs:=30}" "${fresh_sample:=250}"
  : "${wrk_secs:=10}"
  : "${backlog:=1000000}" "${mem_events:=4000000}" "${hostile_events:=200000}" "${retention_events:=1000000}" "${soak_secs:=600}" "${out:=$CARGO_TARGET_DIR/bench/results.json}"
fi
fresh_rates="${fresh_rate//,/ }"
for n in "$runs" "$events" $fresh_rates "$fresh_secs" "$fresh_sample" "$wrk_secs" "$backlog" "$mem_events" "$hostile_events" "$retention_events" "$soak_secs"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "$n is not a positive whole number"
done
wants() { [[ ",$only," == *",$1,"* ]]; }

"$STRATA_ROOT/scripts/deps.sh"
if wants serving && ! command -v wrk >/dev/null; then
  log "installing wrk with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq wrk >/dev/null
fi
log "building strata and strata-bench (release)"
cargo build --release --quiet -p strata -p strata-bench -p strata-engine
STRATA="$CARGO_TARGET_DIR/release/strata"
BENCH="$CARGO_TARGET_DIR/release/strata-bench"
ENGINE="$CARGO_TARGET_DIR/release/strata-engine"

started=$(date +%s)
load_at_start="$(cut -d ' ' -f 1-3 /proc/loadavg)"
work="$(mktemp -d -t strata-bench.XXXXXX)"
results="$work/results.txt"
: >"$results"
failed_checks=0
pids=()
broker_dir=""
broker_port="${STRATA_BENCH_BROKER_PORT:-$("$BENCH" free-port | sed -n 's/^port=//p')}"
BROKERS="127.0.0.1:$broker_port"
ADMIN_KEY="bench-admin-key"
# Strata's processes log at info (progress lines are read below), whatever the caller's RUST_LOG.
unset RUST_LOG

# --- helpers ---------------------------------------------------------------------------------

now_ns() { date +%s%N; }
val() { sed -n "s/^$1=//p" "$2" | head -n 1; }
# Arithmetic on figures; anything involving a missing value (NaN) is `nan`.
calc() { case "$1" in *[Nn]a[Nn]*) echo nan ;; *) awk "BEGIN { printf \"%.${2:-0}f\", $1 }" ;; esac; }
ratio() {
  case "$1 $2" in *[Nn]a[Nn]*) echo nan ;;
    *) awk "BEGIN { if (($2) == 0) print \"nan\"; else printf \"%.3f\", ($1) / ($2) }" ;; esac
}
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
join_by() { local IFS="$1"; shift; echo "$*"; }

figure() { # name value unit [runs]
  printf '%s %s %s\n' "$1" "$2" "$3"
  echo "$*" >>"$results"
}
# The machine's 1-minute load average as a step starts (the machine may be shared).
note_load() { figure "load.$1" "$(cut -d ' ' -f 1 /proc/loadavg)" loadavg; }
check() { # name ok|fail detail
  local name="$1" outcome="$2"; shift 2
  log "check $name: $outcome ($*)"
  echo "check $name $outcome $*" >>"$results"
  [ "$outcome" = ok ] || failed_checks=$((failed_checks + 1))
}

# Starts a process in the background, output to $work/NAME.log; its pid in $last_pid.
spawn() {
  local name="$1"; shift
  env RUST_LOG=info "$@" >>"$work/$name.log" 2>&1 </dev/null &
  last_pid=$!
  pids+=("$last_pid")
}
forget() { local p keep=(); for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; pids=("${keep[@]}"); }
# SIGTERM, then SIGKILL after 30 s.
stop_pid() {
  local pid="$1"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}
kill9() { kill -KILL "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; forget "$1"; }
wait_http() { # url pid log
  for _ in $(seq 1 600); do
    curl -sf -o /dev/null "$1" && return 0
    kill -0 "$2" 2>/dev/null || { tail -n 30 "$3" >&2; die "the process behind $1 exited"; }
    sleep 0.1
  done
  die "$1 did not answer in 60 s"
}
free_port() { "$BENCH" free-port | sed -n 's/^port=//p'; }
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null; }
# Waits (at most 10 minutes) until PID uses under a fifth of a core over a second, so that work
# left over from one step (requests wrk gave up on, a batch run) does not load the next.
settle() { # pid what
  local hz t0 prev cur
  hz=$(getconf CLK_TCK) t0=$(date +%s)
  prev=$(cpu_ticks "$1") || return 0
  while sleep 1; do
    cur=$(cpu_ticks "$1") || return 0
    [ $((cur - prev)) -le $((hz / 5)) ] && break
    prev=$cur
    [ $(($(date +%s) - t0)) -lt 600 ] || { log "$2 still busy after 600 s; going on"; break; }
  done
  [ $(($(date +%s) - t0)) -le 1 ] || log "$2 was busy for $(($(date +%s) - t0)) s before settling"
}
# Milliseconds of one request at a time: the median of 3, on an otherwise idle server.
single_ms() { # url
  # A query parameter no route reads makes each URL new: the answer is computed, not kept.
  local i times=() sep="?"
  case "$1" in *\?*) sep="&" ;; esac
  for i in 1 2 3; do
    times+=("$(curl -sf -o /dev/null -w '%{time_total}' "$1${sep}alone=$i$RANDOM" || echo nan)")
  done
  calc "$(median "${times[@]}") * 1000" 1
}

start_broker() {
  broker_dir="$work/broker-$1"
  STRATA_BROKER_PORT="$broker_port" "$STRATA_ROOT/scripts/broker.sh" start "$broker_dir"
}
stop_broker() {
  if [ -n "$broker_dir" ]; then
    STRATA_BROKER_PORT="$broker_port" "$STRATA_ROOT/scripts/broker.sh" stop "$broker_dir" || true
    # Its log stays with the other logs of the run; its data goes.
    cp "$broker_dir/broker.log" "$broker_dir.log" 2>/dev/null || true
    rm -rf "$broker_dir"
    broker_dir=""
  fi
}
cleanup() {
  local rc=$?
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  stop_broker
  if [ "$rc" = 0 ] && [ -z "${STRATA_BENCH_KEEP:-}" ]; then
    rm -rf "$work"
  else
    log "logs and data kept in $work"
  fi
}
trap cleanup EXIT

# Produces COUNT events with SEED to TOPIC (4 partitions); the rate in $produce_rate.
produce() { # topic count seed [span]
  log "producing $2 events to $1 (seed $3)"
  local t0; t0=$(now_ns)
  RUST_LOG=info "$STRATA" generate --brokers "$BROKERS" --topic "$1" --partitions 4 --count "$2" --seed "$3" \
    --malformed-rate 0 --span "${4:-2h}" 2>&1 | sed -u 's/^/  [generate] /' >&2
  produce_rate=$(calc "$2 / (($(now_ns) - $t0) / 1e9)")
}

# Starts `strata serve` on DATA_DIR for TOPIC; its pid in $serve_pid, its address in $serve_addr.
start_serve() { # name topic data_dir
  serve_addr="127.0.0.1:$(free_port)"
  spawn "$1" "$STRATA" serve --brokers "$BROKERS" --topic "$2" --data-dir "$3" --http "$serve_addr"
  serve_pid=$last_pid
  wait_http "http://$serve_addr/healthz" "$serve_pid" "$work/$1.log"
}

# wrk against URL (30 s request timeout, so that slow answers are measured rather than dropped);
# sets $wrk_rps, $wrk_p99 (ms; nan when no request finished), $wrk_requests, $wrk_non2xx and
# $wrk_socket_errors.
run_wrk() { # name url [lua script choosing each request's path]
  log "wrk: $2${3:+ (paths from $3)} for ${wrk_secs} s (64 connections, 2 threads)"
  wrk -t2 -c64 -d"${wrk_secs}s" --timeout 30s --latency ${3:+-s "$3"} "$2" >"$work/wrk-$1.txt" 2>&1 ||
    { cat "$work/wrk-$1.txt" >&2; die "wrk failed against $2"; }
  wrk_rps=$(awk '/^Requests\/sec:/ { print $2 }' "$work/wrk-$1.txt")
  wrk_p99=$(awk '$1 == "99%" {
      v = $2; n = v + 0
      if (v ~ /us$/) n = n / 1000; else if (v ~ /ms$/) n = n; else if (v ~ /m$/) n = n * 60000;
      else if (v ~ /s$/) n = n * 1000
      printf "%.3f", n }' "$work/wrk-$1.txt")
  wrk_non2xx=$(awk '/Non-2xx or 3xx responses:/ { e += $NF } END { print e + 0 }' "$work/wrk-$1.txt")
  wrk_socket_errors=$(awk '/Socket errors:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) e += $i + 0 }
      END { print e + 0 }' "$work/wrk-$1.txt")
  [ -n "$wrk_rps" ] || { cat "$work/wrk-$1.txt" >&2; die "cannot read wrk's output"; }
  # No request finished within the timeout: no latency distribution.
  wrk_requests=$(awk '/ requests in / { print $1 }' "$work/wrk-$1.txt")
  [ -n "$wrk_p99" ] && [ "${wrk_requests:-0}" != 0 ] || wrk_p99=nan
  [ "$wrk_socket_errors" = 0 ] || log "wrk: $wrk_socket_errors socket errors against $2 ($(grep 'Socket errors' "$work/wrk-$1.txt"))"
}

# --- ingest ----------------------------------------------------------------------------------

INGEST_TOPIC="bench-ingest"
ingest_ready=0
# Produces the ingest topic once per broker.
ingest_topic() {
  [ "$ingest_ready" = 1 ] && return 0
  produce "$INGEST_TOPIC" "$events" 1
  figure ingest.produce "$produce_rate" events/s
  "$BENCH" end-offsets --brokers "$BROKERS" --topic "$INGEST_TOPIC" >"$work/ingest-ends.txt"
  ingest_total=$(val total "$work/ingest-ends.txt")
  if [ "$ingest_total" = "$events" ]; then
    check ingest.topic ok "$ingest_total messages in $INGEST_TOPIC"
  else
    check ingest.topic fail "$ingest_total messages in $INGEST_TOPIC, $events produced"
  fi
  ingest_ready=1
}

# One `strata speed` run over the ingest topic on a fresh data dir; the rate in $speed_rate.
speed_run() { # run-name
  local dd="$work/$1-data" t0 spid
  start_serve "$1-serve" "$INGEST_TOPIC" "$dd"
  # A group of its own per run: the previous run's consumer was a static member, which the
  # broker keeps in its group until its session times out (10 s), so a new member of that group
  # would wait that long for its partitions, time the figure would count.
  local cmd=("$STRATA" speed --brokers "$BROKERS" --topic "$INGEST_TOPIC" --data-dir "$dd"
    --group "bench-$1")
  # Profiled: perf runs the speed layer (cpu-clock samples, DWARF call graphs).
  [ "${2:-}" = profile ] && cmd=(perf record -F 499 -g --call-graph dwarf,16384 -o "$work/perf.data" -- "${cmd[@]}")
  t0=$(now_ns)
  spawn "$1" "${cmd[@]}"
  spid=$last_pid
  "$BENCH" watch --url "http://$serve_addr" --brokers "$BROKERS" --topic "$INGEST_TOPIC" \
    --started-at-ns "$t0" --pid "$spid" --label "$1" >"$work/$1.txt" ||
    { tail -n 30 "$work/$1.log" >&2; die "$1 failed"; }
  speed_rate=$(calc "$ingest_total / $(val secs "$work/$1.txt")")
  local counted; counted=$(calc "$(val accepted "$work/$1.txt") + $(val rejected "$work/$1.txt")")
  if [ "$counted" = "$ingest_total" ]; then
    check "ingest.$1.counts" ok "accepted + rejected = $counted"
  else
    check "ingest.$1.counts" fail "accepted + rejected = $counted, topic holds $ingest_total"
  fi
  if [ "${2:-}" = profile ]; then
    # Stop the speed layer (perf's child); perf writes its data and exits after it.
    local child; child=$(pgrep -P "$spid" | head -n 1 || true)
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
    for _ in $(seq 1 600); do kill -0 "$spid" 2>/dev/null || break; sleep 0.1; done
  fi
  stop_pid "$spid"
  stop_pid "$serve_pid"
  rm -rf "$dd"
}

bench_ingest() {
  ingest_topic
  note_load ingest
  local raw=() speed=() r t0
  for r in $(seq 1 "$runs"); do
    log "ingest run $r/$runs: raw consumer"
    t0=$(now_ns)
    "$BENCH" consume --brokers "$BROKERS" --topic "$INGEST_TOPIC" --started-at-ns "$t0" \
      >"$work/raw-$r.txt" || die "the raw consumer failed"
    raw+=("$(calc "$(val rate "$work/raw-$r.txt")")")
    log "ingest run $r/$runs: raw consumer ${raw[-1]} msgs/s"
    log "ingest run $r/$runs: strata speed"
    speed_run "speed-$r"
    speed+=("$speed_rate")
    log "ingest run $r/$runs: strata speed $speed_rate events/s"
  done
  local raw_m speed_m
  raw_m=$(median "${raw[@]}")
  speed_m=$(median "${speed[@]}")
  figure ingest.raw_consume "$(calc "$raw_m")" msgs/s "$(join_by , "${raw[@]}")"
  figure ingest.speed "$(calc "$speed_m")" events/s "$(join_by , "${speed[@]}")"
  figure ingest.speed_vs_raw "$(ratio "$speed_m" "$raw_m")" ratio
  # The speed layer with the broker taken out: the same workers fed the same number of records
  # from a file (written once), on one worker and on one per core.
  local recs="$work/ceiling-records.bin" w c1 call wall
  for w in 1 0; do
    log "speed ceiling (no broker), $([ "$w" = 0 ] && echo "one worker per core" || echo "1 worker")"
    "$BENCH" speed-ceiling --records "$recs" --events "$events" --workers "$w" \
      --data-dir "$work/ceiling-$w" >"$work/ceiling-$w.txt" || die "the speed ceiling failed"
    rm -rf "$work/ceiling-$w"
  done
  c1=$(val rate "$work/ceiling-1.txt") call=$(val rate "$work/ceiling-0.txt") wall=$(val workers "$work/ceiling-0.txt")
  figure ingest.ceiling_1_worker "$(calc "$c1")" events/s
  figure ingest.ceiling_all_workers "$(calc "$call")" events/s
  figure ingest.ceiling_workers "$wall" count
  figure ingest.speed_vs_ceiling "$(ratio "$speed_m" "$call")" ratio
  if [ "$profile" = 1 ]; then
    command -v perf >/dev/null || die "--profile needs perf (Debian: linux-perf)"
    log "profiling one more (unmeasured) speed run with perf record"
    speed_run speed-profile profile
    local report="${out%.json}-perf.txt"
    mkdir -p "$(dirname "$report")"
    {
      echo "== perf record -F 499 -g --call-graph dwarf -- strata speed, $ingest_total events"
      echo "== samples by thread"
      perf report -i "$work/perf.data" --no-children --stdio --sort comm --percent-limit 0.5 -g none
      echo "== self time by symbol"
      perf report -i "$work/perf.data" --no-children --stdio --sort sym --percent-limit 0.5 -g none
      echo "== inclusive time by symbol"
      perf report -i "$work/perf.data" --children --stdio --sort sym --percent-limit 2 -g none
    } 2>/dev/null | grep -v -e '^#' -e '^$' >"$report" || true
    log "perf report: $report"
  fi
}

# --- serving and freshness (one loaded `strata up`) --------------------------------------------

bench_up() {
  ingest_topic
  local dd="$work/up-data" addr upid
  addr="127.0.0.1:$(free_port)"
  # Kept answers off (`serve.answer-cache = 0`): every answer of the serving, freshness and soak
  # parts is computed; kept answers are measured on their own (`kept_*`, in serving_alone).
  spawn up env STRATA__SERVE__ANSWER_CACHE=0 "$STRATA" up --brokers "$BROKERS" \
    --topic "$INGEST_TOPIC" --data-dir "$dd" --http "$addr" --admin-key "$ADMIN_KEY" --partitions 4
  upid=$last_pid
  wait_http "http://$addr/healthz" "$upid" "$work/up.log"
  log "strata up: loading $ingest_total events"
  "$BENCH" watch --url "http://$addr" --brokers "$BROKERS" --topic "$INGEST_TOPIC" --pid "$upid" \
    --label "up load" >"$work/up-load.txt" || { tail -n 30 "$work/up.log" >&2; die "strata up failed"; }
  log "strata up: waiting for the archiver to reach the end"
  "$BENCH" wait-group --brokers "$BROKERS" --topic "$INGEST_TOPIC" \
    --group "strata.$INGEST_TOPIC.archive" >"$work/up-archive.txt" ||
    { tail -n 30 "$work/up.log" >&2; die "the archiver did not reach the end"; }
  log "strata up: batch run"
  "$BENCH" batch --url "http://$addr" --admin-key "$ADMIN_KEY" >"$work/up-batch.txt" ||
    { tail -n 30 "$work/up.log" >&2; die "the batch run failed"; }
  for _ in $(seq 1 100); do
    curl -sf "http://$addr/v1/status" | grep -q '"batch":{' && break
    sleep 0.1
  done
  log "strata up: batch version $(val version "$work/up-batch.txt") over $(val events "$work/up-batch.txt") events in $(calc "$(val secs "$work/up-batch.txt")" 1) s"
  if wants serving; then bench_serving "$addr" "$upid"; fi
  if wants freshness; then bench_freshness "$addr" "$upid"; fi
  if wants soak; then bench_soak "$addr" "$upid"; fi
  stop_pid "$upid"
}

# A steady stream (2,000 events/s of a new seed) and, beside it, a steady query load at 80% of
# the measured maximum over a mix of the read routes with a new key each request, for
# $soak_secs s, sampled every 10 s (smoke: 5 s): no answer may fail and resident memory must
# not grow from the middle third of the samples to the last (at most +25% plus 32 MiB); in a
# full run also p99 (at most doubled plus 5 ms) and the rate (at least 95% of the offered one).
bench_soak() { # address pid (of the loaded `strata up`)
  local addr="$1" upid="$2" gpid interval=10
  [ "$smoke" = 1 ] && interval=5
  settle "$upid" "strata up"
  note_load soak
  log "soak: ${soak_secs} s of 2,000 events/s and 80% of the maximum query rate"
  spawn soak-stream "$STRATA" generate --brokers "$BROKERS" --topic "$INGEST_TOPIC" --seed 97 \
    --count $((2000 * (soak_secs + 20))) --rate 2000
  gpid=$last_pid
  # The maximum is measured under the moving stream too: kept answers last only while the state
  # stands, so a maximum taken before the stream flows is a cache's.
  sleep 5
  local users=$((events / 40)) items=$((events / 400)) devices=$((events / 4000))
  [ "$users" -ge 50 ] || users=50; [ "$users" -le 200000 ] || users=200000
  [ "$items" -ge 20 ] || items=20; [ "$items" -le 20000 ] || items=20000
  [ "$devices" -ge 5 ] || devices=5; [ "$devices" -le 5000 ] || devices=5000
  "$BENCH" soak --url "http://$addr" --pid "$upid" --secs "$soak_secs" --interval-secs "$interval" \
    --items "$items" --users "$users" --devices "$devices" >"$work/soak.txt" 2> >(tee "$work/soak.log" >&2) ||
    die "the soak run failed"
  stop_pid "$gpid"
  local k
  for k in max_rps target_rps achieved_rps; do figure "soak.$k" "$(calc "$(val "$k" "$work/soak.txt")")" req/s; done
  for k in p99_ms_mid p99_ms_last p99_ms_max; do figure "soak.$k" "$(calc "$(val "$k" "$work/soak.txt")" 2)" ms; done
  for k in rss_mib_mid rss_mib_last rss_mib_max; do figure "soak.$k" "$(calc "$(val "$k" "$work/soak.txt")" 1)" MiB; done
  figure soak.requests "$(val requests "$work/soak.txt")" count
  figure soak.errors "$(val errors "$work/soak.txt")" count
  local e p99m p99l rssm rssl
  e=$(val errors "$work/soak.txt") p99m=$(val p99_ms_mid "$work/soak.txt") p99l=$(val p99_ms_last "$work/soak.txt")
  rssm=$(val rss_mib_mid "$work/soak.txt") rssl=$(val rss_mib_last "$work/soak.txt")
  if [ "$e" = 0 ]; then check soak.errors ok "no failed answer"; else check soak.errors fail "$e failed answers"; fi
  local got want
  got=$(val achieved_rps "$work/soak.txt") want=$(val target_rps "$work/soak.txt")
  grep '^service_' "$work/soak.txt" | sed 's/=/ /' | while read -r k v; do figure "soak.$k" "$v" ms; done
  if awk "BEGIN { exit !(($rssl) <= 1.25 * ($rssm) + 32) }"; then
    check soak.rss_growth ok "RSS ${rssm} MiB (middle third) -> ${rssl} MiB (last third)"
  else
    check soak.rss_growth fail "RSS ${rssm} MiB (middle third) -> ${rssl} MiB (last third)"
  fi
  # Six samples of 5 s cannot tell a trend from one stall: the smoke run reports the rest.
  if [ "$smoke" = 1 ]; then
    log "soak (smoke): $(calc "$got") of $(calc "$want") req/s offered; p99 ${p99m} -> ${p99l} ms (not checked in a smoke run)"
    return 0
  fi
  if awk "BEGIN { exit !(($got) >= 0.95 * ($want)) }"; then
    check soak.sustained ok "$(calc "$got") of $(calc "$want") req/s offered"
  else
    check soak.sustained fail "$(calc "$got") of $(calc "$want") req/s offered: the server fell behind"
  fi
  if awk "BEGIN { exit !(($p99l) <= 2 * ($p99m) + 5) }"; then
    check soak.p99_growth ok "p99 ${p99m} ms (middle third) -> ${p99l} ms (last third)"
  else
    check soak.p99_growth fail "p99 ${p99m} ms (middle third) -> ${p99l} ms (last third)"
  fi
}

# The serving layer's answers since its start, kept and computed: "kept computed".
answer_counts() { # base url
  curl -sf "$1/metrics" | awk '
    /^strata_answers_total\{source="kept"\}/ { k = $2 }
    /^strata_answers_total\{source="computed"\}/ { c = $2 }
    END { printf "%d %d\n", k, c }'
}

# A wrk script choosing each request as a web app's page views would: another key each request,
# over every generated item or user, uniformly or by a Zipf law (the key of rank k asked for in
# proportion to 1/k; the generator makes low-numbered items and users the most active), or
# another combination of a ranking's parameters.
spread_script() { # file kind(items|item_recs|user_recs|top_items|trending) mix(uniform|zipf) items users
  local zipf=false
  [ "$3" = zipf ] && zipf=true
  cat >"$1" <<EOF
local kind, zipf, n_items, n_users = "$2", $zipf, $4, $5
local cdf = {}
local function zipf_table(n)
  local c, s = {}, 0
  for k = 1, n do s = s + 1 / k; c[k] = s end
  for k = 1, n do c[k] = c[k] / s end
  return c
end
local function draw(n)
  if not zipf then return math.random(0, n - 1) end
  local c = cdf[n]
  if not c then c = zipf_table(n); cdf[n] = c end
  local u, lo, hi = math.random(), 1, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if c[mid] < u then lo = mid + 1 else hi = mid end
  end
  return lo - 1
end
local function pick(t) return t[math.random(#t)] end
local types = {"view", "add_to_cart", "purchase", "rating"}
local windows = {"1h", "24h", "7d", "all"}
local categories = {"books", "electronics", "garden", "toys", "kitchen", "sports", "music",
  "games", "beauty", "office", "pets", "travel"}
local spans = {{"1h", "24h"}, {"1h", "7d"}, {"24h", "7d"}}
init = function() math.randomseed(os.time() + math.floor(os.clock() * 1e6)) end
request = function()
  local p
  if kind == "items" then p = "/v1/items/i" .. draw(n_items)
  elseif kind == "item_recs" then p = "/v1/recommendations/items/i" .. draw(n_items)
  elseif kind == "user_recs" then p = "/v1/recommendations/users/u" .. draw(n_users)
  elseif kind == "top_items" then
    p = "/v1/insights/top-items?type=" .. pick(types) .. "&window=" .. pick(windows)
      .. "&limit=" .. pick({10, 20, 50})
    if math.random(13) <= 12 then p = p .. "&category=" .. pick(categories) end
  else
    local s = pick(spans)
    p = "/v1/insights/trending?type=" .. pick(types) .. "&window=" .. s[1] .. "&baseline=" .. s[2]
      .. "&min_support=" .. pick({1, 3, 5}) .. "&limit=" .. pick({10, 20})
  end
  return wrk.format(nil, p)
end
EOF
}

# wrk against one route of `strata up`, its figures and the share of its answers that were kept
# (served from memory) rather than computed.
serving_run() { # name address path [script]
  local name="$1" addr="$2" path="$3" script="${4:-}" before after kept computed
  before=$(answer_counts "http://$addr")
  run_wrk "$name" "http://$addr$path" $script
  after=$(answer_counts "http://$addr")
  kept=$(( ${after% *} - ${before% *} )) computed=$(( ${after#* } - ${before#* } ))
  figure "serving.$name.requests" "$wrk_requests" count
  figure "serving.$name.rps" "$(calc "$wrk_rps")" req/s
  figure "serving.$name.p99" "$wrk_p99" ms
  figure "serving.$name.kept_share" "$(ratio "$kept" "$((kept + computed))")" ratio
  figure "serving.$name.rps_vs_hello" "$(ratio "$wrk_rps" "$hello_rps")" ratio
  figure "serving.$name.p99_vs_hello" "$(ratio "$wrk_p99" "$hello_p99")" ratio
  figure "serving.$name.socket_errors" "$wrk_socket_errors" count
  if [ "$wrk_non2xx" = 0 ]; then
    check "serving.$name.answers" ok "every answer 2xx"
  else
    check "serving.$name.answers" fail "$wrk_non2xx non-2xx answers"
  fi
}

# Milliseconds of the first request of each route after a batch version loads (nothing of the
# new version computed yet), then the milliseconds the serving layer took to load it.
serving_cold() { # address
  local addr="$1" before version name path
  before=$(curl -sf "http://$addr/v1/status" | jq -r '.batch.version')
  "$BENCH" batch --url "http://$addr" --admin-key "$ADMIN_KEY" >"$work/cold-batch.txt" ||
    { tail -n 30 "$work/up.log" >&2; die "the batch run failed"; }
  for _ in $(seq 1 1000); do
    version=$(curl -sf "http://$addr/v1/status" | jq -r '.batch.version')
    [ "$version" != "$before" ] && break
    sleep 0.01
  done
  [ "$version" != "$before" ] || die "batch version $before still served after the run"
  figure serving.swap.load_ms "$(curl -sf "http://$addr/v1/status" | jq -r '.batch.load_ms')" ms
  for spec in "items=/v1/items/i7" "item_recs=/v1/recommendations/items/i3" \
              "user_recs=/v1/recommendations/users/u11" \
              "top_items=/v1/insights/top-items?window=24h&type=purchase&category=toys" \
              "trending=/v1/insights/trending?window=1h&baseline=24h&type=view"; do
    name="${spec%%=*}" path="${spec#*=}"
    figure "serving.cold.$name" "$(calc "$(curl -sf -o /dev/null -w '%{time_total}' "http://$addr$path" || echo nan) * 1000" 1)" ms
  done
}

bench_serving() { # address pid (of the loaded `strata up`)
  local addr="$1" upid="$2" hello_addr hpid spid
  settle "$upid" "strata up"
  note_load serving
  # Alone, on an idle server: one URL asked three times (a new query parameter each time, so
  # each is computed).
  local spec name path
  for spec in "items=/v1/items/i1" "top_items=/v1/insights/top-items?window=24h" \
              "user_recs=/v1/recommendations/users/u1" "item_recs=/v1/recommendations/items/i1"; do
    name="${spec%%=*}" path="${spec#*=}"
    curl -sf -o /dev/null "http://$addr$path" || die "GET $path does not answer 200"
    figure "serving.$name.single" "$(single_ms "http://$addr$path")" ms
  done
  # Everything else under a live stream of 2,000 events/s (each speed flush moves the state,
  # so kept answers last only until the next one), the hello-world peer too.
  local stream_secs=$(( 12 * (wrk_secs + 3) + 60 ))
  log "serving: a live stream of 2,000 events/s for at most ${stream_secs} s"
  spawn serving-stream "$STRATA" generate --brokers "$BROKERS" --topic "$INGEST_TOPIC" --seed 96 \
    --count $((2000 * stream_secs)) --rate 2000
  spid=$last_pid
  sleep 3
  hello_addr="127.0.0.1:$(free_port)"
  spawn hello "$BENCH" hello --addr "$hello_addr"
  hpid=$last_pid
  wait_http "http://$hello_addr/" "$hpid" "$work/hello.log"
  figure serving.hello.single "$(single_ms "http://$hello_addr/")" ms
  run_wrk hello "http://$hello_addr/"
  stop_pid "$hpid"
  hello_rps="$wrk_rps" hello_p99="$wrk_p99"
  figure serving.hello.rps "$(calc "$hello_rps")" req/s
  figure serving.hello.p99 "$hello_p99" ms
  [ "$wrk_non2xx" = 0 ] || check serving.hello.answers fail "$wrk_non2xx non-2xx answers"
  # Computed answers: keys spread over every generated item and user (events / 400 items and
  # events / 40 users, as in common/src/generate.rs; a user without a history gets the top items).
  local users=$((events / 40)) items=$((events / 400)) kind mix
  [ "$users" -ge 50 ] || users=50; [ "$users" -le 200000 ] || users=200000
  [ "$items" -ge 20 ] || items=20; [ "$items" -le 20000 ] || items=20000
  for kind in items item_recs user_recs top_items trending; do
    for mix in uniform zipf; do
      case "$kind.$mix" in top_items.zipf|trending.zipf) continue ;; esac
      spread_script "$work/$kind-$mix.lua" "$kind" "$mix" "$items" "$users"
      serving_run "${kind}_$mix" "$addr" / "$work/$kind-$mix.lua"
    done
  done
  stop_pid "$spid"
  serving_cold "$addr"
  serving_alone "$users" "$items"
}

# The serving layer as a process of its own (`strata serve` following the loaded `strata up`'s
# data directory, as a separate serving host would): its memory at start, after the newest
# version loads, and its peak (VmHWM) after each spread route has been asked for wrk's span
# (uniform keys; the stream has stopped, so each key's answer is computed once and then kept).
serving_alone() { # users items
  local users="$1" items="$2" kind rss
  start_serve serve-alone "$INGEST_TOPIC" "$work/up-data"
  for _ in $(seq 1 600); do
    curl -sf "http://$serve_addr/v1/status" | grep -q '"batch":{' && break
    sleep 0.1
  done
  curl -sf "http://$serve_addr/v1/status" | grep -q '"batch":{' ||
    die "strata serve did not load the batch version"
  figure serving.alone.load_ms "$(curl -sf "http://$serve_addr/v1/status" | jq -r '.batch.load_ms')" ms
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$serve_pid/status")
  figure serving.alone.loaded_rss "$(calc "${rss:-nan} / 1024" 1)" MiB
  for kind in items item_recs user_recs top_items trending; do
    spread_script "$work/alone-$kind.lua" "$kind" uniform "$items" "$users"
    run_wrk "alone_$kind" "http://$serve_addr/" "$work/alone-$kind.lua"
    figure "serving.alone.${kind}.rps" "$(calc "$wrk_rps")" req/s
  done
  rss=$(awk '/^VmHWM:/ { print $2 }' "/proc/$serve_pid/status")
  figure serving.alone.peak_rss "$(calc "${rss:-nan} / 1024" 1)" MiB
  # Kept answers, for comparison only (this server keeps them, `strata up` above does not): one
  # URL over and over on a state that does not move, so all but the first are kept.
  local spec name path
  for spec in "items=/v1/items/i1" "top_items=/v1/insights/top-items?window=24h" \
              "user_recs=/v1/recommendations/users/u1"; do
    name="${spec%%=*}" path="${spec#*=}"
    serving_run "kept_$name" "$serve_addr" "$path"
  done
  stop_pid "$serve_pid"
}

bench_freshness() { # address pid (of the loaded `strata up`)
  local rate
  for rate in $fresh_rates; do freshness_at "$1" "$2" "$rate"; done
}

freshness_at() { # address pid rate
  local addr="$1" upid="$2" rate="$3" n="freshness.$3"
  settle "$upid" "strata up"
  note_load "freshness.$rate"
  log "freshness at $rate events/s for $fresh_secs s"
  "$BENCH" freshness --brokers "$BROKERS" --topic "$INGEST_TOPIC" --url "http://$addr" \
    --rate "$rate" --secs "$fresh_secs" --sample "$fresh_sample" --patience-secs 60 \
    >"$work/freshness-$rate.txt" ||
    { tail -n 30 "$work/up.log" >&2; die "the freshness probe failed"; }
  local f="$work/freshness-$rate.txt"
  figure "$n.p50" "$(calc "$(val p50_ms "$f")" 1)" ms
  figure "$n.p90" "$(calc "$(val p90_ms "$f")" 1)" ms
  figure "$n.p99" "$(calc "$(val p99_ms "$f")" 1)" ms
  figure "$n.max" "$(calc "$(val max_ms "$f")" 1)" ms
  figure "$n.rate_sent" "$(calc "$(val rate_sent "$f")")" events/s
  figure "$n.rate_acked" "$(calc "$(val rate_acked "$f")")" events/s
  figure "$n.raw_p50" "$(calc "$(val raw_p50_ms "$f")" 1)" ms
  figure "$n.raw_p99" "$(calc "$(val raw_p99_ms "$f")" 1)" ms
  figure "$n.p50_vs_raw" "$(ratio "$(val p50_ms "$f")" "$(val raw_p50_ms "$f")")" ratio
  figure "$n.p99_vs_raw" "$(ratio "$(val p99_ms "$f")" "$(val raw_p99_ms "$f")")" ratio
  figure "$n.ack_p50" "$(calc "$(val ack_p50_ms "$f")" 1)" ms
  figure "$n.ack_p99" "$(calc "$(val ack_p99_ms "$f")" 1)" ms
  figure "$n.probes" "$(val probes "$f")" count
  figure "$n.probe_requests" "$(calc "$(val probe_requests_per_sec "$f")")" req/s
  local timeouts failed
  timeouts=$(val timeouts "$f") failed=$(val failed_sends "$f")
  figure "$n.timeouts" "$timeouts" count
  if [ "$failed" = 0 ]; then
    check "$n.sends" ok "every event accepted by the producer"
  else
    check "$n.sends" fail "$failed sends failed"
  fi
  # Not visible within 60 s: a figure at full load; broken at the smoke run's trickle.
  if [ "$timeouts" = 0 ]; then
    check "$n.visible" ok "every one of $(val probes "$f") probes became visible"
  elif [ "$smoke" = 1 ]; then
    check "$n.visible" fail "$timeouts of $(val probes "$f") probes not visible after 60 s"
  else
    log "freshness: $timeouts of $(val probes "$f") probes not visible after 60 s"
  fi
}

# --- recovery --------------------------------------------------------------------------------

# Two speed instances in one consumer group and serving layers mirroring them (decision record
# 0013): the time from start to a serving layer covering a backlog of $backlog events (consumed
# by the instances and pulled into its mirror), then the time a second serving layer, started
# with an empty mirror, takes to pull that whole tail from the instances at rest (its start
# included), and that its answers equal a recomputation from scratch (strata verify).
bench_cluster() {
  local topic="bench-cluster" d="$work/cluster" t0 total secs pids_here=() a b port
  local key="bench-cluster-admin-key"
  # Spawns a mirroring `strata serve` on ADDR ($last_pid), waits until it covers the topic's
  # $total messages (timed from T0), and reports the time and rate as figure NAME.
  cluster_serve() { # name addr t0 figure label [serve args...]
    local name="$1" addr="$2" since="$3" fig="$4" label="$5"; shift 5
    spawn "$name" STRATA__SERVE__SPEED=cluster "$STRATA" serve --brokers "$BROKERS" \
      --topic "$topic" --data-dir "$d/arch" --http "$addr" "$@"
    pids_here+=("$last_pid")
    "$BENCH" watch --url "http://$addr" --brokers "$BROKERS" --topic "$topic" --until-sum "$total" \
      --started-at-ns "$since" --label "cluster: $label" >"$work/$name.txt" ||
      { tail -n 30 "$work/$name.log" >&2; die "cluster: $label did not happen"; }
    secs=$(val secs "$work/$name.txt")
    figure "$fig" "$(calc "$secs" 3)" s
    figure "${fig}_rate" "$(calc "$total / $secs")" events/s
  }
  produce "$topic" "$backlog" 3
  "$BENCH" end-offsets --brokers "$BROKERS" --topic "$topic" >"$work/cluster-ends.txt"
  total=$(val total "$work/cluster-ends.txt")
  note_load cluster
  t0=$(now_ns)
  for n in 1 2; do
    port=$(free_port)
    spawn "cluster-speed$n" STRATA__SPEED__HTTP="127.0.0.1:$port" \
      "$STRATA" speed --brokers "$BROKERS" --topic "$topic" --data-dir "$d/speed$n"
    pids_here+=("$last_pid")
  done
  a="127.0.0.1:$(free_port)"
  cluster_serve cluster-serve1 "$a" "$t0" cluster.consume_and_mirror "consumed and mirrored"
  b="127.0.0.1:$(free_port)"
  cluster_serve cluster-serve2 "$b" "$(now_ns)" cluster.mirror_fill "a new mirror filled" \
    --admin-key "$key"
  local serve2=$last_pid
  figure cluster.mirror_bytes "$(du -sb "$d/arch/serve/speed-mirror-$serve2" | cut -f 1)" bytes
  # Freshness through the cluster: from the produce call to the first answer of the second
  # serving layer that holds the probe, a stream of 5,000 events/s into the two instances
  # (each pull adds up to 100 ms).
  log "cluster: freshness at 5000 events/s for $fresh_secs s"
  "$BENCH" freshness --brokers "$BROKERS" --topic "$topic" --url "http://$b" --rate 5000 \
    --secs "$fresh_secs" --sample "$fresh_sample" --patience-secs 60 >"$work/cluster-fresh.txt" ||
    { tail -n 30 "$work/cluster-serve2.log" >&2; die "the cluster freshness probe failed"; }
  figure cluster.freshness.5000.p50 "$(calc "$(val p50_ms "$work/cluster-fresh.txt")" 1)" ms
  figure cluster.freshness.5000.p99 "$(calc "$(val p99_ms "$work/cluster-fresh.txt")" 1)" ms
  figure cluster.freshness.5000.raw_p50 "$(calc "$(val raw_p50_ms "$work/cluster-fresh.txt")" 1)" ms
  figure cluster.freshness.5000.probes "$(val probes "$work/cluster-fresh.txt")" count
  if "$STRATA" verify --brokers "$BROKERS" --topic "$topic" --data-dir "$d/arch" --url "http://$b" --admin-key "$key" \
      >"$work/cluster-verify.txt" 2>&1 && grep -q ' 0 differences' "$work/cluster-verify.txt"; then
    check cluster.verify ok "$(grep -m 1 'keys compared' "$work/cluster-verify.txt")"
  else
    tail -n 5 "$work/cluster-verify.txt" >&2
    check cluster.verify fail "$(tail -n 1 "$work/cluster-verify.txt")"
  fi
  local p
  for p in "${pids_here[@]}"; do stop_pid "$p"; done
  rm -rf "$d"
}

bench_recovery() {
  local topic="bench-recovery" dd="$work/recovery-data" head=$((backlog / 10)) t0 spid
  [ "$head" -ge 2 ] || head=2
  produce "$topic" "$head" 1
  note_load recovery
  start_serve recovery-serve "$topic" "$dd"
  spawn recovery-speed "$STRATA" speed --brokers "$BROKERS" --topic "$topic" --data-dir "$dd"
  spid=$last_pid
  "$BENCH" watch --url "http://$serve_addr" --brokers "$BROKERS" --topic "$topic" \
    --until-sum $((head / 2)) --poll-ms 5 --pid "$spid" --label "recovery head" \
    >"$work/recovery-head.txt" || { tail -n 30 "$work/recovery-speed.log" >&2; die "speed failed"; }
  kill9 "$spid"
  sleep 0.5
  "$BENCH" watch --url "http://$serve_addr" --brokers "$BROKERS" --topic "$topic" --until-sum 0 \
    --label "recovery stored" >"$work/recovery-stored.txt"
  local stored; stored=$(val sum "$work/recovery-stored.txt")
  log "recovery: strata speed killed (SIGKILL) with offsets $(val offsets "$work/recovery-stored.txt") stored"
  produce "$topic" "$backlog" 2
  "$BENCH" end-offsets --brokers "$BROKERS" --topic "$topic" >"$work/recovery-ends.txt"
  local total; total=$(val total "$work/recovery-ends.txt")
  local pending=$((total - ${stored%.*}))
  log "recovery: restarting strata speed with $pending events pending"
  t0=$(now_ns)
  spawn recovery-restart "$STRATA" speed --brokers "$BROKERS" --topic "$topic" --data-dir "$dd"
  spid=$last_pid
  "$BENCH" watch --url "http://$serve_addr" --brokers "$BROKERS" --topic "$topic" \
    --started-at-ns "$t0" --pid "$spid" --label "recovery" >"$work/recovery.txt" ||
    { tail -n 30 "$work/recovery-restart.log" >&2; die "the restarted speed layer failed"; }
  local r="$work/recovery.txt" secs
  secs=$(val secs "$r")
  figure recovery.catchup "$(calc "$secs" 3)" s
  figure recovery.backlog "$pending" events
  figure recovery.stored_at_kill "${stored%.*}" events
  figure recovery.catchup_rate "$(calc "$pending / $secs")" events/s
  # Resumed, not rebuilt: the stored offsets never went back below those at the kill...
  local lowest; lowest=$(val min_sum "$r")
  if [ "${stored%.*}" -gt 0 ] && [ "${lowest%.*}" -ge "${stored%.*}" ]; then
    check recovery.resumed ok "stored offsets never below the $stored at the kill (lowest seen $lowest)"
  else
    check recovery.resumed fail "stored $stored at the kill, lowest seen after the restart $lowest"
  fi
  # ...and the restarted process's first progress line (after 5 s) has every offset past 0.
  local line=""
  for _ in $(seq 1 100); do
    line=$(grep -m 1 'speed layer progress' "$work/recovery-restart.log" || true)
    [ -n "$line" ] && break
    sleep 0.1
  done
  local offsets; offsets=$(sed -n 's/.*offsets=\({[^}]*}\).*/\1/p' <<<"$line")
  if [ -n "$offsets" ] && ! grep -qE '(^|[{ ,])[0-9]+: 0([,}])' <<<"$offsets"; then
    check recovery.first_progress ok "first progress line after the restart: offsets=$offsets"
  else
    check recovery.first_progress fail "first progress line after the restart: ${line:-none}"
  fi
  local counted; counted=$(calc "$(val accepted "$r") + $(val rejected "$r")")
  if [ "$counted" = "$total" ]; then
    check recovery.counts ok "accepted + rejected = $counted = messages in the topic"
  else
    check recovery.counts fail "accepted + rejected = $counted, topic holds $total"
  fi
  stop_pid "$spid"
  stop_pid "$serve_pid"
}

# --- batch recompute, DuckDB beside it --------------------------------------------------------

# Python with DuckDB (PyPI), once, into $STRATA_PY; its interpreter in $PY.
duckdb_python() {
  py_install duckdb "$DUCKDB_VERSION"
  PY="$STRATA_PY/bin/python"
}

# Seconds the last recompute in LOG took, the version written and published included (the
# `with_publish_ms` of its "published batch version" line).
recompute_secs() { # log
  local ms
  ms=$(sed -n 's/.*published batch version.*with_publish_ms=\([0-9]*\).*/\1/p' "$1" | tail -n 1)
  calc "${ms:-nan} / 1000" 3
}

# The same recompute on Apache DataFusion in the strata-engine process, and on a Ballista
# cluster of a scheduler and two executors (one task slot each) on this host, each run after a
# local one on the same master dataset; every version's view files must equal the local one's.
bench_engines() { # data-dir strata-batch-command...
  local dd="$1"; shift
  local cmd=("$@") r sched port eng lo=() df=() bl=() spids=() v_local v
  sched="127.0.0.1:$(free_port)"
  spawn engine-scheduler "$ENGINE" scheduler --bind "$sched"
  spids+=("$last_pid")
  for k in 1 2; do
    port=$(free_port)
    spawn "engine-executor-$k" "$ENGINE" executor --scheduler "$sched" --port "$port" --slots 1 --work-dir "$work/executor-$k"
    spids+=("$last_pid")
  done
  sleep 3
  same_views() { # v1 v2
    local a b f
    a="$dd/batch/versions/$(printf %010d "$1")" b="$dd/batch/versions/$(printf %010d "$2")"
    for f in "$a"/*; do
      case "$(basename "$f")" in manifest.json|dedupe.*) continue ;; esac
      cmp -s "$f" "$b/$(basename "$f")" || { echo "$(basename "$f")"; return 1; }
    done
  }
  for r in $(seq 1 "$runs"); do
    for eng in local datafusion "df://$sched"; do
      STRATA__BATCH__KEEP_VERSIONS=100 STRATA__BATCH__ENGINE="$eng" "${cmd[@]}" >"$work/engine-$r.log" 2>&1 ||
        { tail -n 30 "$work/engine-$r.log" >&2; die "strata batch --once on $eng failed"; }
      v=$(sed -n 's/.*"version": *\([0-9]*\).*/\1/p' "$dd/batch/CURRENT" 2>/dev/null | head -n 1)
      case "$eng" in
        local) v_local=$v; lo+=("$(recompute_secs "$work/engine-$r.log")") ;;
        datafusion) df+=("$(recompute_secs "$work/engine-$r.log")") ;;
        *) bl+=("$(recompute_secs "$work/engine-$r.log")") ;;
      esac
      if [ "$eng" != local ]; then
        if diff_file=$(same_views "$v_local" "$v"); then
          check "batch.engine_equal.$r.${eng%%:*}" ok "version $v equals the local version $v_local"
        else
          check "batch.engine_equal.$r.${eng%%:*}" fail "$diff_file of version $v differs from the local version $v_local"
        fi
      fi
      log "batch engines run $r/$runs: $eng version $v"
    done
    log "batch engines run $r/$runs: local ${lo[-1]} s, datafusion ${df[-1]} s, ballista ${bl[-1]} s"
  done
  figure batch.local_recompute_beside_engines "$(calc "$(median "${lo[@]}")" 3)" s "$(join_by , "${lo[@]}")"
  figure batch.datafusion_recompute "$(calc "$(median "${df[@]}")" 3)" s "$(join_by , "${df[@]}")"
  figure batch.ballista_recompute "$(calc "$(median "${bl[@]}")" 3)" s "$(join_by , "${bl[@]}")"
  for p in "${spids[@]}"; do stop_pid "$p"; done
}

bench_batch() {
  ingest_topic
  duckdb_python
  # Block size 1: the version covers every archived event, as DuckDB reads every file.
  local dd="$work/batch-data" r t0 strata=() duck=() joins=()
  local cmd=("$STRATA" batch --once --brokers "$BROKERS" --topic "$INGEST_TOPIC" --data-dir "$dd" --block-size 1)
  note_load batch
  log "batch: archiving $ingest_total events into the master dataset (strata batch --once)"
  t0=$(now_ns)
  "${cmd[@]}" >>"$work/batch-archive.log" 2>&1 || { tail -n 30 "$work/batch-archive.log" >&2; die "strata batch --once failed"; }
  figure batch.archive_and_recompute "$(calc "($(now_ns) - $t0) / 1e9" 3)" s
  figure batch.master_bytes "$(du -sb "$dd/master" | cut -f 1)" bytes
  # Equal work on both sides, over the same span: read the master dataset, dedupe, compute every
  # view of a batch version, write the result (Strata: its version, published; DuckDB: every
  # result table to Parquet). DuckDB's distinct users are estimates, as Strata's are; its exact
  # counts and the rows compare-batch reads are fetched after its timer stops.
  for r in $(seq 1 "$runs"); do
    log "batch run $r/$runs: strata recompute (strata batch --once, nothing new to archive)"
    "${cmd[@]}" >"$work/batch-$r.log" 2>&1 || { tail -n 30 "$work/batch-$r.log" >&2; die "strata batch --once failed"; }
    strata+=("$(recompute_secs "$work/batch-$r.log")")
    log "batch run $r/$runs: strata recompute and publish ${strata[-1]} s; duckdb"
    rm -rf "$work/duckdb-out"
    "$PY" "$STRATA_ROOT/bench/duckdb_views.py" "$dd/master" "$work/duckdb-$r.json" --threads "$(nproc)" \
      --out-dir "$work/duckdb-out" >"$work/duckdb-$r.txt" || die "the duckdb peer failed"
    duck+=("$(awk '$1 == "duckdb.views" { print $2 }' "$work/duckdb-$r.txt")")
    joins+=("$(awk '$1 == "duckdb.cooccurrence_self_join" { print $2 }' "$work/duckdb-$r.txt")")
    log "batch run $r/$runs: duckdb views and write ${duck[-1]} s (apart: item-pair self-join ${joins[-1]} s)"
  done
  local strata_m duck_m joins_m
  strata_m=$(median "${strata[@]}") duck_m=$(median "${duck[@]}") joins_m=$(median "${joins[@]}")
  figure batch.strata_recompute "$(calc "$strata_m" 3)" s "$(join_by , "${strata[@]}")"
  figure batch.duckdb_views "$(calc "$duck_m" 3)" s "$(join_by , "${duck[@]}")"
  figure batch.duckdb_cooccurrence_self_join "$(calc "$joins_m" 3)" s "$(join_by , "${joins[@]}")"
  figure batch.strata_vs_duckdb "$(ratio "$strata_m" "$duck_m")" ratio
  bench_engines "$dd" "${cmd[@]}"
  if "$BENCH" compare-batch --data-dir "$dd" --duckdb "$work/duckdb-1.json" >"$work/compare.txt" 2>"$work/compare.err"; then
    check batch.equal ok "$(tr '\n' ' ' <"$work/compare.txt")"
  else
    cat "$work/compare.err" >&2
    check batch.equal fail "$(tail -n 1 "$work/compare.err")"
  fi
  rm -rf "$dd" "$work/duckdb-out"
}

# --- hostile ---------------------------------------------------------------------------------

# `strata speed` over H messages, half of them malformed: the rejected count, the DLQ and the
# accepted and duplicate counts all equal what the generator says it produced.
bench_hostile() {
  local topic="bench-hostile" dd="$work/hostile-data" spid t0 h="$work/hostile.txt"
  log "producing $hostile_events messages to $topic, half of them malformed (seed 4)"
  t0=$(now_ns)
  RUST_LOG=info "$STRATA" generate --brokers "$BROKERS" --topic "$topic" --partitions 4 \
    --count "$hostile_events" --seed 4 --malformed-rate 0.5 2>&1 | sed -u 's/^/  [generate] /' >&2
  figure hostile.produce "$(calc "$hostile_events / (($(now_ns) - $t0) / 1e9)")" msgs/s
  "$BENCH" gen-counts --seed 4 --count "$hostile_events" --malformed-rate 0.5 >"$work/hostile-truth.txt"
  note_load hostile
  start_serve hostile-serve "$topic" "$dd"
  t0=$(now_ns)
  spawn hostile-speed "$STRATA" speed --brokers "$BROKERS" --topic "$topic" --data-dir "$dd"
  spid=$last_pid
  "$BENCH" watch --url "http://$serve_addr" --brokers "$BROKERS" --topic "$topic" \
    --started-at-ns "$t0" --pid "$spid" --label "hostile" >"$h" ||
    { tail -n 30 "$work/hostile-speed.log" >&2; die "speed failed on the hostile stream"; }
  figure hostile.messages "$hostile_events" count
  figure hostile.malformed "$(val malformed "$work/hostile-truth.txt")" count
  figure hostile.rate "$(calc "$hostile_events / $(val secs "$h")")" msgs/s
  "$BENCH" end-offsets --brokers "$BROKERS" --topic "$topic.dlq" >"$work/hostile-dlq.txt"
  local want_rej want_acc want_dup rej acc dup dlq
  want_rej=$(calc "$(val malformed "$work/hostile-truth.txt")")
  want_acc=$(calc "$(val events "$work/hostile-truth.txt") + $(val copies "$work/hostile-truth.txt")")
  want_dup=$(calc "$(val copies "$work/hostile-truth.txt")")
  rej=$(calc "$(val rejected "$h")") acc=$(calc "$(val accepted "$h")") dup=$(calc "$(val duplicates "$h")")
  dlq=$(calc "$(val total "$work/hostile-dlq.txt")")
  if [ "$rej" = "$want_rej" ] && [ "$dlq" -ge "$want_rej" ] && [ "$acc" = "$want_acc" ] && [ "$dup" = "$want_dup" ]; then
    check hostile.counts ok "rejected $rej, $dlq dead letters, accepted $acc, duplicates $dup: as generated"
  else
    check hostile.counts fail "rejected $rej (want $want_rej), $dlq dead letters, accepted $acc (want $want_acc), duplicates $dup (want $want_dup)"
  fi
  stop_pid "$spid"
  stop_pid "$serve_pid"
  rm -rf "$dd"
}

# --- memory ----------------------------------------------------------------------------------

# `strata speed` over M events spread over 7 days of event time, so that nearly every event
# brings new view keys; its peak resident memory (VmHWM) and the keys its state then holds.
bench_memory() {
  local topic="bench-memory" dd="$work/memory-data" spid hwm
  produce "$topic" "$mem_events" 3 7d
  note_load memory
  start_serve memory-serve "$topic" "$dd"
  spawn memory-speed "$STRATA" speed --brokers "$BROKERS" --topic "$topic" --data-dir "$dd"
  spid=$last_pid
  "$BENCH" watch --url "http://$serve_addr" --brokers "$BROKERS" --topic "$topic" --pid "$spid" \
    --label "memory" >"$work/memory.txt" || { tail -n 30 "$work/memory-speed.log" >&2; die "speed failed"; }
  hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$spid/status")
  stop_pid "$spid"
  stop_pid "$serve_pid"
  "$BENCH" count-keys --speed-dir "$dd/speed" >"$work/memory-keys.txt" || die "counting keys failed"
  figure memory.events "$mem_events" events
  figure memory.speed_block_keys "$(val block_keys "$work/memory-keys.txt")" keys
  figure memory.speed_dedupe_ids "$(val dedupe_ids "$work/memory-keys.txt")" ids
  figure memory.speed_peak_rss "$(calc "${hwm:-nan} / 1024" 1)" MiB
  figure memory.speed_state_bytes "$(du -sb "$dd/speed" | cut -f 1)" bytes
  rm -rf "$dd"
}

# --- retention -------------------------------------------------------------------------------

bench_retention() {
  local dd="$work/retention-data" k
  note_load retention
  log "retention: $retention_events events, 30% old heartbeats and readings, rolled up"
  "$BENCH" retention --data-dir "$dd" --events "$retention_events" >"$work/retention.txt" ||
    die "the retention benchmark failed"
  for k in before.master_bytes after.master_bytes rolled_events rollup_records purged_raw_bytes; do
    figure "retention.$k" "$(val "retention.$k" "$work/retention.txt")" count
  done
  for k in before.recompute_s rollup_s after.recompute_s; do
    figure "retention.$k" "$(val "retention.$k" "$work/retention.txt")" s
  done
  figure retention.bytes_ratio "$(calc "$(val retention.after.master_bytes "$work/retention.txt") / $(val retention.before.master_bytes "$work/retention.txt")" 3)" ratio
  figure retention.recompute_ratio "$(calc "$(val retention.after.recompute_s "$work/retention.txt") / $(val retention.before.recompute_s "$work/retention.txt")" 3)" ratio
  check retention.events ok "the versions before and after count $(val retention.after.version_events "$work/retention.txt") events each"
  rm -rf "$dd"
}

# --- the run ---------------------------------------------------------------------------------

mode=full; [ "$smoke" = 1 ] && mode=smoke
log "bench ($mode): work dir $work, broker 127.0.0.1:$broker_port"
if wants ingest || wants serving || wants freshness || wants soak || wants batch; then
  start_broker main
  if wants ingest; then bench_ingest; fi
  if wants serving || wants freshness || wants soak; then bench_up; fi
  if wants batch; then bench_batch; fi
  stop_broker
fi
if wants memory; then
  start_broker memory
  bench_memory
  stop_broker
fi
if wants recovery; then
  start_broker recovery
  bench_recovery
  stop_broker
fi
if wants cluster; then
  start_broker cluster
  bench_cluster
  stop_broker
fi
if wants hostile; then
  start_broker hostile
  bench_hostile
  stop_broker
fi
if wants retention; then bench_retention; fi

"$BENCH" report --lines "$results" --out "$out" \
  --meta "mode=$mode" --meta "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --meta "commit=$(git -C "$STRATA_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --meta "cpus=$(nproc)" \
  --meta "cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)" \
  --meta "load_at_start=$load_at_start" --meta "load_at_end=$(cut -d ' ' -f 1-3 /proc/loadavg)" \
  --meta "events=$events" --meta "runs=$runs" --meta "fresh_rate=$fresh_rate" \
  --meta "fresh_secs=$fresh_secs" --meta "fresh_sample=$fresh_sample" --meta "wrk_secs=$wrk_secs" --meta "backlog=$backlog" \
  --meta "broker=Apache Kafka $KAFKA_VERSION (KRaft, one node, scripts/broker.sh)" --meta "wrk=$(wrk -v 2>&1 | head -n 1 || true)"
log "results: $out"
log "bench ($mode) finished in $(( $(date +%s) - started ))s"
[ "$failed_checks" = 0 ] || die "$failed_checks correctness checks failed (see above)"

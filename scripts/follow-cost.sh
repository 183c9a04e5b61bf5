#!/usr/bin/env bash
# What a `strata serve` following the speed layer's state costs while the speed layer reads a
# backlog: on a broker of its own, `strata speed` reads N events (default 1,000,000) from
# scratch, a `strata serve` on the same data directory follows it (a RocksDB secondary), and
# `strata-bench watch` polls `GET /v1/status` until the layer has read them all. Prints the time
# taken, both processes' CPU seconds and the serving layer's peak RSS.
#
#   scripts/follow-cost.sh [--events N] [--runs K]
#
# Environment variables reach both processes (e.g. STRATA__SERVE__RUN_BLOCKS=0).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
events=1000000 runs=1
while [ $# -gt 0 ]; do
  case "$1" in
    --events) events="${2:?--events needs a value}"; shift ;;
    --runs) runs="${2:?--runs needs a value}"; shift ;;
    *) die "unknown argument $1" ;;
  esac
  shift
done
cargo build --release -q -p strata -p strata-bench
bin="$CARGO_TARGET_DIR/release"
work="$(mktemp -d -t strata-follow.XXXXXX)"
export STRATA_BROKER_PORT="${STRATA_BROKER_PORT:-29392}"
brokers="127.0.0.1:$STRATA_BROKER_PORT"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$STRATA_ROOT/scripts/broker.sh" stop "$work/broker" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
"$STRATA_ROOT/scripts/broker.sh" start "$work/broker" >/dev/null
"$bin/strata" generate --brokers "$brokers" --topic follow --partitions 4 --count "$events" \
  --seed 1 --malformed-rate 0 >/dev/null 2>&1
cpu() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }
for run in $(seq 1 "$runs"); do
  data="$work/data-$run" group="follow-$run"
  "$bin/strata" serve --brokers "$brokers" --topic follow --group "$group" --data-dir "$data" \
    --http 127.0.0.1:0 >"$work/serve-$run.log" 2>&1 &
  serve=$!
  pids+=("$serve")
  addr=""
  for _ in $(seq 1 100); do
    addr=$(sed -n 's/.*serving layer listening.*addr=\([0-9.:]*\).*/\1/p' "$work/serve-$run.log" | head -1)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || die "strata serve did not start: $(tail -n 5 "$work/serve-$run.log")"
  "$bin/strata" speed --brokers "$brokers" --topic follow --group "$group" --data-dir "$data" \
    >"$work/speed-$run.log" 2>&1 &
  speed=$!
  pids+=("$speed")
  out=$("$bin/strata-bench" watch --url "http://$addr" --brokers "$brokers" --topic follow \
    --pid "$speed" --label follow 2>/dev/null)
  secs=$(sed -n 's/^secs=//p' <<<"$out")
  echo "run=$run secs=$secs serve_cpu_s=$(cpu "$serve") speed_cpu_s=$(cpu "$speed")" \
    "serve_peak_rss_mib=$(awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$serve/status")"
  kill "$speed" "$serve"
  wait "$speed" "$serve" 2>/dev/null || true
done

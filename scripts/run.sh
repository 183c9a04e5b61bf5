#!/usr/bin/env bash
# Runs Strata end to end on local defaults: installs what is missing, builds, starts a broker and
# `strata up`, produces demo events, runs a batch, and prints URLs to try. Ctrl-C stops it all.
#
#   STRATA_HTTP        listen address (default 127.0.0.1:8080)
#   STRATA_ADMIN_KEY   admin key (default: a random one, printed)
#   STRATA_DEMO_EVENTS demo events to produce (default 200000)
#   STRATA_DATA        where the broker's and Strata's data go (default .data)
#   STRATA_BROKER_PORT the broker's client port (default 9092)
#   STRATA_BIN         a strata binary to run instead of building one
#
# Stopping (Ctrl-C, or SIGINT/SIGTERM/SIGHUP to this script or its whole process group) goes in
# order: `strata up` first (its state flushed, within its shutdown-timeout-secs), then the broker.
# Both run in sessions of their own, so a signal to the group reaches only this script, which
# passes one SIGTERM on to each in turn.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$STRATA_ROOT"

"$STRATA_ROOT/scripts/deps.sh"
bin="${STRATA_BIN:-}"
if [ -z "$bin" ]; then
  log "building (release)"
  cargo build --release --quiet -p strata
  bin="$CARGO_TARGET_DIR/release/strata"
fi

data="${STRATA_DATA:-$STRATA_ROOT/.data}"
port="${STRATA_BROKER_PORT:-9092}"
export STRATA_BROKER_PORT="$port"
http="${STRATA_HTTP:-127.0.0.1:8080}"
key="${STRATA_ADMIN_KEY:-local-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}"
events="${STRATA_DEMO_EVENTS:-200000}"
mkdir -p "$data"

"$STRATA_ROOT/scripts/broker.sh" start "$data/broker"
strata_pid=""
stop_all() {
  trap '' INT TERM HUP  # one stop, in order, however many signals arrive meanwhile
  if [ -n "$strata_pid" ] && kill -0 "$strata_pid" 2>/dev/null; then
    log "stopping strata up (pid $strata_pid)"
    kill -TERM "$strata_pid" 2>/dev/null || true
    code=0
    wait "$strata_pid" 2>/dev/null || code=$?
    log "strata up stopped (exit $code)"
  fi
  "$STRATA_ROOT/scripts/broker.sh" stop "$data/broker" || true
}
trap stop_all EXIT
trap 'exit 0' INT TERM HUP

STRATA_ADMIN_KEY="$key" setsid "$bin" up --data-dir "$data/strata" --http "$http" --batch-every 10m \
  --brokers "127.0.0.1:$port" >>"$data/strata.log" 2>&1 </dev/null &
strata_pid=$!
for _ in $(seq 1 100); do
  curl -sf "http://$http/healthz" >/dev/null 2>&1 && break
  kill -0 "$strata_pid" 2>/dev/null || { tail -n 30 "$data/strata.log"; die "strata up exited"; }
  sleep 0.1
done
log "strata up is running (pid $strata_pid, log $data/strata.log)"

"$bin" generate --count "$events" --seed "$RANDOM" --patterns --data-dir "$data/strata" --brokers "127.0.0.1:$port"
sleep 2
curl -sf -X POST -H "Authorization: Bearer $key" "http://$http/v1/admin/batch" >/dev/null &&
  log "batch recompute requested"
sleep 3

cat <<MSG

Strata is up. Try:
  curl http://$http/v1/status
  curl 'http://$http/v1/insights/top-items?type=purchase&limit=5'
  curl http://$http/v1/items/i0
  curl 'http://$http/v1/insights/trending?window=1h&baseline=7d&limit=5'
  curl 'http://$http/v1/insights/timeseries?metric=events&bucket=minute'
  curl 'http://$http/v1/recommendations/items/p-a?basis=purchase'
  curl http://$http/v1/recommendations/users/u1
  curl http://$http/v1/devices/health
  curl http://$http/v1/devices/p-hot/health
  curl -X POST -H 'Authorization: Bearer $key' http://$http/v1/admin/batch
More events:  $bin generate --count 100000 --rate 5000 --brokers 127.0.0.1:$port
Admin key:    $key
Ctrl-C stops Strata and the broker (data stays in $data).
MSG
wait "$strata_pid"

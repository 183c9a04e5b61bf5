#!/usr/bin/env bash
# Starts, stops or reports on a local Kafka-protocol broker on 127.0.0.1.
#
#   scripts/broker.sh start [DATA_DIR]   install if missing, start, wait until it accepts clients
#   scripts/broker.sh stop  [DATA_DIR]   stop it cleanly (its data stays in DATA_DIR)
#   scripts/broker.sh status [DATA_DIR]
#
# DATA_DIR defaults to $STRATA_BROKER_DIR or .data/broker; the port to $STRATA_BROKER_PORT or 9092.
# The broker is tansu with SQLite storage (data survives restarts). Strata itself only speaks the
# Kafka protocol: point --brokers at Apache Kafka or Redpanda instead and skip this script.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

cmd="${1:-status}"
dir="${2:-${STRATA_BROKER_DIR:-$STRATA_ROOT/.data/broker}}"
port="${STRATA_BROKER_PORT:-9092}"
pidfile="$dir/broker.pid"

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

case "$cmd" in
  start)
    if running; then log "broker already running (pid $(cat "$pidfile"), port $port)"; exit 0; fi
    listening && die "port $port is taken by another process"
    [ -x "$TANSU_BIN" ] || "$STRATA_ROOT/scripts/deps.sh"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    pidfile="$dir/broker.pid"
    (cd "$dir" && exec nohup "$TANSU_BIN" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine "sqlite://tansu.db" >>"$dir/broker.log" 2>&1 </dev/null) &
    echo $! >"$pidfile"
    for _ in $(seq 1 100); do
      listening && { log "broker up on 127.0.0.1:$port (pid $(cat "$pidfile"), data in $dir)"; exit 0; }
      running || break
      sleep 0.1
    done
    tail -n 20 "$dir/broker.log" >&2 || true
    die "broker did not start"
    ;;
  stop)
    if ! running; then log "broker not running"; rm -f "$pidfile"; exit 0; fi
    pid="$(cat "$pidfile")"
    kill -TERM "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "broker did not stop on TERM; killing"; kill -KILL "$pid"; }
    rm -f "$pidfile"
    log "broker stopped"
    ;;
  status)
    if running; then echo "running (pid $(cat "$pidfile"), port $port, data in $dir)"; else echo "stopped"; exit 1; fi
    ;;
  *) die "usage: $0 start|stop|status [DATA_DIR]" ;;
esac

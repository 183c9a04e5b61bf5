#!/usr/bin/env bash
# Starts, stops or reports on a local Apache Kafka broker on 127.0.0.1: one KRaft node that is
# both broker and controller (docs/decisions/0007-apache-kafka.md).
#
#   scripts/broker.sh start  [DATA_DIR]   install if missing, format once, start, wait until ready
#   scripts/broker.sh stop   [DATA_DIR]   stop it cleanly (its data stays in DATA_DIR)
#   scripts/broker.sh status [DATA_DIR]
#
# DATA_DIR defaults to $STRATA_BROKER_DIR or .data/broker. The client port is $STRATA_BROKER_PORT
# (default 9092); the controller's is $STRATA_BROKER_CONTROLLER_PORT, else a free one chosen at the
# first start and kept in DATA_DIR. Optional, read at every start:
#   STRATA_BROKER_PROPERTIES  a file of broker properties added last (they win): more listeners,
#                             TLS, SASL, ...; @PORT@ and @CONTROLLER_PORT@ in it stand for the two
#                             ports above (a `listeners=` line must repeat PLAINTEXT and CONTROLLER)
#   STRATA_BROKER_SCRAM       SCRAM credentials created when the storage is formatted, e.g.
#                             'SCRAM-SHA-256=[name=strata,password=secret]'
#   STRATA_BROKER_HEAP        the JVM's heap (default 1g)
# The broker logs to DATA_DIR/broker.log. Strata itself only speaks the Kafka protocol: point
# --brokers at any Kafka cluster instead and skip this script.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

cmd="${1:-status}"
dir="${2:-${STRATA_BROKER_DIR:-$STRATA_ROOT/.data/broker}}"
port="${STRATA_BROKER_PORT:-9092}"
pidfile="$dir/broker.pid"

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
kafka() { java -cp "$KAFKA_HOME/libs/*" "$@"; }

case "$cmd" in
  start)
    if running; then log "broker already running (pid $(cat "$pidfile"), port $port)"; exit 0; fi
    listening "$port" && die "port $port is taken by another process"
    kafka_installed || "$STRATA_ROOT/scripts/deps.sh"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    pidfile="$dir/broker.pid"
    cport="${STRATA_BROKER_CONTROLLER_PORT:-$(cat "$dir/controller.port" 2>/dev/null || free_port)}"
    echo "$cport" >"$dir/controller.port"
    cat >"$dir/server.properties" <<PROPS
# Written by scripts/broker.sh at each start.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL
log.dirs=$dir/data
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# One node: the broker's heartbeats go to its own controller. After a crash its old registration
# must expire before it may serve again; 2 s instead of Kafka's 9 halves a restart after kill -9.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=2000
PROPS
    if [ -n "${STRATA_BROKER_PROPERTIES:-}" ]; then
      { echo "# From $STRATA_BROKER_PROPERTIES"
        sed -e "s/@PORT@/$port/g" -e "s/@CONTROLLER_PORT@/$cport/g" "$STRATA_BROKER_PROPERTIES"; } >>"$dir/server.properties"
    fi
    cat >"$dir/log4j2.properties" <<'LOG'
status = warn
appender.file.type = Console
appender.file.name = OUT
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.out.ref = OUT
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = info
LOG
    if [ ! -f "$dir/data/meta.properties" ]; then
      scram=()
      [ -n "${STRATA_BROKER_SCRAM:-}" ] && scram=(--add-scram "$STRATA_BROKER_SCRAM")
      kafka kafka.tools.StorageTool format --standalone -t "$(kafka kafka.tools.StorageTool random-uuid)" \
        -c "$dir/server.properties" "${scram[@]}" >>"$dir/broker.log" 2>&1 ||
        { tail -n 20 "$dir/broker.log" >&2; die "formatting the broker's storage in $dir/data failed"; }
    fi
    lines_before=$(wc -l <"$dir/broker.log" 2>/dev/null || echo 0)
    heap="${STRATA_BROKER_HEAP:-1g}"
    # The JVM's class-data archive of Kafka's classes (written by the first clean stop, kept
    # with the jars) takes about 2 s off each start; a JVM that cannot use it starts without.
    if [ -s "$KAFKA_HOME/kafka.jsa" ]; then
      share="-XX:SharedArchiveFile=$KAFKA_HOME/kafka.jsa"
    else
      share="-XX:ArchiveClassesAtExit=$dir/kafka.jsa.new"
    fi
    # In a session of its own, so that a signal to the caller's process group (Ctrl-C in
    # scripts/run.sh) does not stop the broker under clients that are still stopping: whoever
    # started it stops it, last (`stop` below).
    (exec setsid java "$share" -Xms256m "-Xmx$heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
        "-Dlog4j2.configurationFile=$dir/log4j2.properties" "-Dkafka.logs.dir=$dir" \
        -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$dir/server.properties" >>"$dir/broker.log" 2>&1 </dev/null) &
    echo $! >"$pidfile"
    # Ready once the node says it started and the client port accepts connections.
    for _ in $(seq 1 600); do
      if tail -n +"$((lines_before + 1))" "$dir/broker.log" | grep -q 'Kafka Server started' && listening "$port"; then
        log "Apache Kafka $KAFKA_VERSION up on 127.0.0.1:$port (pid $(cat "$pidfile"), data in $dir)"
        exit 0
      fi
      running || break
      sleep 0.1
    done
    tail -n 30 "$dir/broker.log" >&2 || true
    running && kill -KILL "$(cat "$pidfile")"
    rm -f "$pidfile"
    die "the broker did not start (log: $dir/broker.log)"
    ;;
  stop)
    if ! running; then log "broker not running"; rm -f "$pidfile"; exit 0; fi
    pid="$(cat "$pidfile")"
    kill -TERM "$pid"
    # A controlled shutdown takes a few seconds; after 30 it is killed.
    for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "broker did not stop on TERM within 30 s; killing"; kill -KILL "$pid"; }
    rm -f "$pidfile"
    if [ -s "$dir/kafka.jsa.new" ] && [ ! -s "$KAFKA_HOME/kafka.jsa" ]; then
      cp "$dir/kafka.jsa.new" "$KAFKA_HOME/kafka.jsa.$$" && mv -f "$KAFKA_HOME/kafka.jsa.$$" "$KAFKA_HOME/kafka.jsa"
    fi
    rm -f "$dir/kafka.jsa.new"
    log "broker stopped"
    ;;
  status)
    if running; then echo "running (pid $(cat "$pidfile"), port $port, data in $dir)"; else echo "stopped"; exit 1; fi
    ;;
  *) die "usage: $0 start|stop|status [DATA_DIR]" ;;
esac

# Shared settings for Strata's scripts. Source it; do not run it.
# STRATA_CACHE holds tools and build output reused across checkouts (default ~/.cache/strata).
STRATA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STRATA_CACHE="${STRATA_CACHE:-$HOME/.cache/strata}"
# The local broker: Apache Kafka from its Maven Central artifacts (docs/decisions/0007-apache-kafka.md).
KAFKA_VERSION="4.4.0"
KAFKA_LOG4J_VERSION="2.25.2"
KAFKA_HOME="$STRATA_CACHE/tools/kafka-$KAFKA_VERSION"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$STRATA_CACHE/target}"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# True when every jar the broker was installed with is still there, with its size.
kafka_installed() {
  [ -f "$KAFKA_HOME/jars.txt" ] || return 1
  local name size
  while read -r name size; do
    [ -f "$KAFKA_HOME/libs/$name" ] && [ "$(stat -c %s "$KAFKA_HOME/libs/$name")" = "$size" ] || return 1
  done <"$KAFKA_HOME/jars.txt"
}

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

# Python tools from PyPI (schemathesis for the API contract test, DuckDB for the batch benchmark)
# live in one virtual environment under the cache, made once.
STRATA_PY="$STRATA_CACHE/tools/py"
SCHEMATHESIS_VERSION="4.32.5"

# Installs PACKAGE==VERSION into $STRATA_PY unless that version is there.
py_install() { # package version
  [ "$("$STRATA_PY/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)" = "$2" ] && return 0
  log "installing $1 $2 (PyPI) into $STRATA_PY"
  if [ ! -x "$STRATA_PY/bin/pip" ]; then
    if ! python3 -m venv "$STRATA_PY" >/dev/null 2>&1; then
      log "installing python3-venv with apt-get"
      export DEBIAN_FRONTEND=noninteractive
      local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
      $sudo apt-get update -qq
      $sudo apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$STRATA_PY"
      python3 -m venv "$STRATA_PY"
    fi
  fi
  "$STRATA_PY/bin/pip" install --quiet --disable-pip-version-check "$1==$2"
}

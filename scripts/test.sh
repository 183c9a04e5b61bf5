#!/usr/bin/env bash
# Runs every test: installs what is missing, starts a fresh Kafka-protocol broker on 127.0.0.1
# (unless STRATA_TEST_BROKERS names one), runs the unit, property and end-to-end tests, stops
# the broker. Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p strata-common`).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$STRATA_ROOT"

"$STRATA_ROOT/scripts/deps.sh"

broker_dir=""
cleanup() {
  if [ -n "$broker_dir" ]; then
    STRATA_BROKER_PORT="$port" "$STRATA_ROOT/scripts/broker.sh" stop "$broker_dir" || true
    rm -rf "$broker_dir"
  fi
}
trap cleanup EXIT

if [ -z "${STRATA_TEST_BROKERS:-}" ]; then
  port="${STRATA_TEST_BROKER_PORT:-19092}"
  broker_dir="$(mktemp -d -t strata-test-broker.XXXXXX)"
  STRATA_BROKER_PORT="$port" "$STRATA_ROOT/scripts/broker.sh" start "$broker_dir"
  export STRATA_TEST_BROKERS="127.0.0.1:$port"
fi
log "testing against the broker at $STRATA_TEST_BROKERS"

started=$(date +%s)
cargo test --release --workspace "$@"
log "tests passed in $(( $(date +%s) - started ))s"

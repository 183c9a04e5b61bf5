#!/usr/bin/env bash
# Runs every test: installs what is missing, runs the unit, property and golden tests, a short
# fuzzing run of each libFuzzer target (STRATA_FUZZ_SECONDS each, default 15), then each
# end-to-end suite (strata/tests/e2e/e2e_*.rs: modules of one test binary, `e2e`) against a fresh Apache Kafka broker on 127.0.0.1 started
# by scripts/broker.sh (port STRATA_TEST_BROKER_PORT, default 19092), unless STRATA_TEST_BROKERS
# names one to use.
# Extra arguments run `cargo test --release --workspace ARGS` against one broker instead;
# `--test e2e_NAME [-- ARGS]` runs that one end-to-end suite (e.g. `scripts/test.sh --test e2e_up`).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$STRATA_ROOT"

"$STRATA_ROOT/scripts/deps.sh"

port="${STRATA_TEST_BROKER_PORT:-19092}"
broker_dir=""
stop_broker() {
  if [ -n "$broker_dir" ]; then
    STRATA_BROKER_PORT="$port" "$STRATA_ROOT/scripts/broker.sh" stop "$broker_dir" || true
    rm -rf "$broker_dir"
    broker_dir=""
  fi
}
trap stop_broker EXIT

# One fresh broker for the end-to-end suites (each suite uses topics of its own), unless
# STRATA_TEST_BROKERS names one to use. e2e_broker, e2e_secure, e2e_undecodable and e2e_shutdown run brokers of their own.
start_broker() {
  [ -n "${STRATA_TEST_BROKERS:-}" ] && return
  broker_dir="$(mktemp -d -t strata-test-broker.XXXXXX)"
  STRATA_BROKER_PORT="$port" "$STRATA_ROOT/scripts/broker.sh" start "$broker_dir"
  export STRATA_TEST_BROKERS="127.0.0.1:$port"
}
export STRATA_NODE_MODULES="${STRATA_NODE_MODULES:-$STRATA_CACHE/tools/node/node_modules}"

started=$(date +%s)
all=1; [ $# -eq 0 ] || all=0
if [ "$all" = 0 ]; then
  start_broker
  if [ "$1" = --test ] && [ $# -ge 2 ] && [ -f "$STRATA_ROOT/strata/tests/e2e/$2.rs" ]; then
    suite="$2"
    shift 2
    [ "${1:-}" != -- ] || shift
    cargo test --release --workspace --test e2e -- "$suite::" "$@"
  else
    cargo test --release --workspace "$@"
  fi
else
  # Every test binary in one build first, so that cargo compiles them side by side on every
  # core instead of one suite at a time below. Every cargo call here selects the whole
  # workspace, so that all of them resolve the same features and share that one build.
  cargo test --release --workspace --no-run
  # Everything that needs no broker: every crate's unit tests, doc tests and the integration
  # tests that are not end-to-end suites (those are the one test binary strata/tests/e2e/).
  others=()
  for suite in "$STRATA_ROOT"/*/tests/*.rs; do
    others+=(--test "$(basename "$suite" .rs)")
  done
  cargo test --release --workspace --lib --bins "${others[@]}"
  cargo test --release --workspace --doc
  # The libFuzzer targets (fuzz/, a workspace of their own): built with SanitizerCoverage on the
  # stable toolchain and run for a short, bounded time each; a crash fails the run.
  "$STRATA_ROOT/scripts/fuzz.sh" --seconds "${STRATA_FUZZ_SECONDS:-15}"
  # Then each end-to-end suite against the broker, one at a time, by its module path. A suite
  # file that strata/tests/e2e/main.rs does not declare would run no test: that fails here.
  start_broker
  for suite in "$STRATA_ROOT"/strata/tests/e2e/e2e_*.rs; do
    name="$(basename "$suite" .rs)"
    grep -qx "mod $name;" "$STRATA_ROOT/strata/tests/e2e/main.rs" ||
      die "strata/tests/e2e/main.rs does not declare the suite $name (mod $name;)"
    log "end-to-end suite $name"
    cargo test --release --workspace --test e2e -- "$name::"
  done
fi
[ "$all" = 0 ] || "$STRATA_ROOT/scripts/bench.sh" --smoke >/dev/null  # the benchmark harness still runs
log "tests passed in $(( $(date +%s) - started ))s"

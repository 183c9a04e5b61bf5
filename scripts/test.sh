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
    # The suites run the workspace's binaries (`strata-engine` too, which is not strata's own).
    cargo build --release --workspace --bins
    cargo test --release --workspace --test e2e -- "$suite::" "$@"
  else
    cargo test --release --workspace "$@"
  fi
else
  # Every test binary in one build first, so that cargo compiles them side by side on every
  # core instead of one suite at a time below. Every cargo call here selects the whole
  # workspace, so that all of them resolve the same features and share that one build.
  cargo test --release --workspace --all-targets --no-run
  # The suites run the workspace's binaries (`strata-engine` too, which is not strata's own).
  cargo build --release --workspace --bins
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
  # Then the end-to-end suites, each by its module path, in two lanes side by side: three
  # that spend most of their time waiting on brokers of their own that they stop, kill, pause,
  # restart or feed by hand (e2e_broker, e2e_shutdown, e2e_undecodable: about half of the
  # suites' time), beside all the others. STRATA_TEST_LANES=1 runs them all one after another. A suite file that
  # strata/tests/e2e/main.rs does not declare would run no test: that fails here.
  start_broker
  own_brokers=" e2e_broker e2e_shutdown e2e_undecodable "
  lane_own=()
  lane_shared=()
  for suite in "$STRATA_ROOT"/strata/tests/e2e/e2e_*.rs; do
    name="$(basename "$suite" .rs)"
    grep -qx "mod $name;" "$STRATA_ROOT/strata/tests/e2e/main.rs" ||
      die "strata/tests/e2e/main.rs does not declare the suite $name (mod $name;)"
    case "$own_brokers" in *" $name "*) lane_own+=("$name") ;; *) lane_shared+=("$name") ;; esac
  done
  run_suites() { # suite...
    local name t0
    for name in "$@"; do
      t0=$(date +%s)
      log "end-to-end suite $name"
      if ! cargo test --release --workspace --test e2e -- "$name::"; then
        log "end-to-end suite $name FAILED after $(( $(date +%s) - t0 )) s"
        return 1
      fi
      log "end-to-end suite $name passed in $(( $(date +%s) - t0 )) s"
    done
  }
  if [ "${STRATA_TEST_LANES:-2}" = 1 ]; then
    run_suites "${lane_own[@]}" "${lane_shared[@]}"
  else
    lane_log="$(mktemp -t strata-e2e-lane.XXXXXX)"
    log "end-to-end suites in two lanes: ${lane_own[*]} (brokers of their own; output below when done) beside ${lane_shared[*]}"
    run_suites "${lane_own[@]}" >"$lane_log" 2>&1 &
    lane_pid=$!
    shared_rc=0
    run_suites "${lane_shared[@]}" || shared_rc=$?
    own_rc=0
    wait "$lane_pid" || own_rc=$?
    log "the lane of ${lane_own[*]}:"
    cat "$lane_log"
    rm -f "$lane_log"
    [ "$shared_rc" = 0 ] && [ "$own_rc" = 0 ] || die "an end-to-end suite failed (see above)"
  fi
fi
[ "$all" = 0 ] || "$STRATA_ROOT/scripts/bench.sh" --smoke >/dev/null  # the benchmark harness still runs
log "tests passed in $(( $(date +%s) - started ))s"

#!/bin/sh
# RUSTC_WRAPPER for scripts/fuzz.sh: adds SanitizerCoverage (the instrumentation cargo-fuzz asks
# for), `--cfg fuzzing`, debug assertions and overflow checks to Strata's own crates and the fuzz
# targets, and to nothing else, so that every dependency is the very build the main workspace
# made (same flags, same fingerprint) and is reused from the shared target directory. Build
# scripts are left alone. Cargo runs it as: sancov-rustc.sh RUSTC ARGS...
rustc="$1"
shift
case "${CARGO_PKG_NAME:-}:${CARGO_CRATE_NAME:-}" in
  *:build_script_*) ;;
  strata-common:* | strata-serving:* | strata-fuzz:*)
    exec "$rustc" "$@" --cfg fuzzing -Cpasses=sancov-module \
      -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
      -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares \
      -Cdebug-assertions -Coverflow-checks ;;
esac
exec "$rustc" "$@"

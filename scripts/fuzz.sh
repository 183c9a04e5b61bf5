#!/usr/bin/env bash
# Runs the libFuzzer targets under fuzz/ one at a time, one libFuzzer job each.
#
#   scripts/fuzz.sh [--seconds N] [--fork J] [--all-crates | --asan] [TARGET...]
#                   (default: 600 seconds; event_decode query_routes; --fork J: J libFuzzer
#                   jobs side by side, libFuzzer's fork mode, one total; not with --asan)
#
# By default the targets are built with the stable toolchain: rustc's SanitizerCoverage pass
# (`-Cpasses=sancov-module`, the same instrumentation cargo-fuzz asks for), `--cfg fuzzing`,
# debug assertions and overflow checks on Strata's own crates (strata-common, strata-serving and
# the targets; scripts/sancov-rustc.sh adds them), linked with libfuzzer-sys's libFuzzer; no
# sanitizer, so a panic or an abort is what counts as a crash. The build goes into
# $CARGO_TARGET_DIR beside the main one and reuses its dependencies, uninstrumented: coverage
# guides the fuzzer through Strata's code only, at about three times the rate of a fully
# instrumented build. `--all-crates` instruments every crate (the parsers of serde_json and
# warp too) in $STRATA_CACHE/fuzz-target, a build of its own. `--asan` runs the targets through
# cargo-fuzz with AddressSanitizer, which needs the nightly toolchain (cargo-fuzz is then
# installed into $STRATA_CACHE/tools when missing; builds into $STRATA_CACHE/fuzz-target-asan).
# New inputs go to a
# working corpus in $STRATA_CACHE/fuzz-corpus/<target>, seeded from fuzz/corpus/<target> and
# fuzz/regressions/<target>, so the checked-in corpus stays small; logs go to
# $STRATA_CACHE/fuzz-logs/<target>.log, crashes to fuzz/artifacts/<target>/.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

seconds=600
asan=0
all_crates=0
fork=0
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) [ $# -ge 2 ] || die "--seconds needs a value"; seconds="$2"; shift 2 ;;
    --seconds=*) seconds="${1#--seconds=}"; shift ;;
    --asan) asan=1; shift ;;
    --all-crates) all_crates=1; shift ;;
    --fork) [ $# -ge 2 ] || die "--fork needs a value"; fork="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) targets+=("$1"); shift ;;
  esac
done
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || die "--seconds must be a positive whole number; got $seconds"
[[ "$fork" =~ ^[0-9]+$ ]] || die "--fork must be a whole number; got $fork"
[ ${#targets[@]} -gt 0 ] || targets=(event_decode query_routes)

command -v cargo >/dev/null || die "cargo not found: install Rust with rustup first"
cd "$STRATA_ROOT"
if [ "$asan" = 1 ]; then
  cargo +nightly --version >/dev/null 2>&1 || die "--asan needs the nightly toolchain: rustup toolchain install nightly"
  export PATH="$STRATA_CACHE/tools/bin:$PATH"
  if ! command -v cargo-fuzz >/dev/null; then
    log "installing cargo-fuzz into $STRATA_CACHE/tools (once)"
    cargo install cargo-fuzz --locked --root "$STRATA_CACHE/tools" --quiet
  fi
  export CARGO_TARGET_DIR="$STRATA_CACHE/fuzz-target-asan"
elif [ "$all_crates" = 1 ]; then
  # Every crate instrumented, dependencies too (serde_json's parser, warp's filters): coverage
  # guidance through them as well, at about a third of the execution rate, in a target
  # directory of its own (--target keeps the instrumentation off build scripts and proc macros).
  host="$(rustc -vV | sed -n 's/^host: //p')"
  export CARGO_TARGET_DIR="$STRATA_CACHE/fuzz-target"
  log "building the fuzz targets (stable, SanitizerCoverage on every crate) into $CARGO_TARGET_DIR"
  RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks" \
    cargo build --release --manifest-path fuzz/Cargo.toml --target "$host" --bins
  bin_dir="$CARGO_TARGET_DIR/$host/release"
else
  # Into the main target directory, with the instrumentation added by a RUSTC_WRAPPER to
  # Strata's own crates only (scripts/sancov-rustc.sh): every dependency is then the main
  # build's, already compiled, instead of a second, instrumented build of the whole tree.
  # fuzz/Cargo.lock pins every package the two share to the main lock's version.
  lock_pairs() { awk -F'"' '/^name = /{n=$2} /^version = /{print n, $2}' "$1" | sort -u; }
  drift="$(comm -23 <(lock_pairs fuzz/Cargo.lock) <(lock_pairs Cargo.lock) | cut -d' ' -f1 | sort -u |
    comm -12 - <(lock_pairs Cargo.lock | cut -d' ' -f1 | sort -u) | tr '\n' ' ')"
  [ -z "$drift" ] || log "warning: fuzz/Cargo.lock pins other versions than Cargo.lock of: ${drift% }; those are built twice (copy Cargo.lock to fuzz/ and build again to align them)"
  log "building the fuzz targets (stable, SanitizerCoverage on Strata's crates) into $CARGO_TARGET_DIR"
  # (.ci/run's clippy wrapper is for the main workspace only.)
  env -u RUSTC_WORKSPACE_WRAPPER RUSTC_WRAPPER="$STRATA_ROOT/scripts/sancov-rustc.sh" \
    cargo build --release --manifest-path fuzz/Cargo.toml --bins
  bin_dir="$CARGO_TARGET_DIR/release"
fi
mkdir -p "$STRATA_CACHE/fuzz-logs"
failed=()
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_targets/$t.rs" ] || die "no fuzz target $t (see fuzz/fuzz_targets/)"
  work="$STRATA_CACHE/fuzz-corpus/$t"
  logf="$STRATA_CACHE/fuzz-logs/$t.log"
  mkdir -p "$work" "fuzz/corpus/$t"
  seeds=("fuzz/corpus/$t")
  [ -d "fuzz/regressions/$t" ] && seeds+=("fuzz/regressions/$t")
  log "$t: building and fuzzing for $seconds s (log: $logf)"
  rc=0
  if [ "$asan" = 1 ]; then
    cargo +nightly fuzz run "$t" "$work" "${seeds[@]}" -- -max_total_time="$seconds" >"$logf" 2>&1 || rc=$?
  else
    mkdir -p "fuzz/artifacts/$t"
    fork_args=()
    [ "$fork" -eq 0 ] || fork_args=(-fork="$fork")
    "$bin_dir/$t" -artifact_prefix="fuzz/artifacts/$t/" -max_total_time="$seconds" "${fork_args[@]}" \
      "$work" "${seeds[@]}" >"$logf" 2>&1 || rc=$?
  fi
  runs="$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1/p' "$logf" | tail -1)"
  secs="$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\2/p' "$logf" | tail -1)"
  last="$(grep -E '^#[0-9]+' "$logf" | tail -1 || true)"
  # Fork mode prints no "Done" line: its last status line counts every job's executions.
  if [ -z "$runs" ] && [ "$fork" -gt 0 ] && [ -n "$last" ]; then
    runs="$(sed -n 's/^#\([0-9]*\).*/\1/p' <<<"$last")"
    secs="$(sed -n 's/.* time: \([0-9]*\)s.*/\1/p' <<<"$last")"
  fi
  execs="$(sed -n 's/.*exec\/s: \([0-9]*\).*/\1/p' <<<"$last")"
  cov="$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")"
  if [ "$rc" -eq 0 ]; then
    printf '%s: %s executions in %s s (%s exec/s, cov %s), no crash\n' \
      "$t" "${runs:-?}" "${secs:-?}" "${execs:-?}" "${cov:-?}"
  else
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$logf" | tail -1)"
    runs="${last%%[^#0-9]*}"
    runs="${runs#\#}"
    why="$(grep -a -m1 -A1 'panicked at' "$logf" | tail -1 | cut -c1-300 || true)"
    if [ -n "$runs" ]; then when="after $runs executions (${execs:-?} exec/s)"; else when="while loading the corpus"; fi
    printf '%s: FAILED (exit %s) %s; reproducer: %s; see %s\n' \
      "$t" "$rc" "$when" "${artifact:-none written (build error?)}" "$logf"
    [ -z "$why" ] || printf '  %s\n' "$why"
    failed+=("$t")
  fi
done
[ ${#failed[@]} -eq 0 ] || die "fuzzing failed: ${failed[*]}"

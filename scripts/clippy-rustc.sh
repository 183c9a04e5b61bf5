#!/bin/sh
# RUSTC_WORKSPACE_WRAPPER that compiles the workspace's own crates with clippy-driver and
# `-D warnings`: what `cargo clippy` does, but in a real build, so that one compilation both
# lints and builds them (.ci/run sets it for all of scripts/test.sh). Cargo runs it as:
# clippy-rustc.sh RUSTC ARGS...; dependencies are compiled by rustc as usual.
driver="$("$1" --print sysroot)/bin/clippy-driver"
if [ ! -x "$driver" ]; then
  echo "clippy-rustc.sh: $driver not found: rustup component add clippy" >&2
  exit 1
fi
exec "$driver" "$@" -D warnings

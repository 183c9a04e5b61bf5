# Shared settings for Strata's scripts. Source it; do not run it.
# STRATA_CACHE holds tools and build output reused across checkouts (default ~/.cache/strata).
STRATA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STRATA_CACHE="${STRATA_CACHE:-$HOME/.cache/strata}"
TANSU_VERSION="0.6.0"
TANSU_BIN="$STRATA_CACHE/tools/bin/tansu"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$STRATA_CACHE/target}"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

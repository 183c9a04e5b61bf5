#!/usr/bin/env bash
# Installs what building Strata needs and is missing: the distribution's RocksDB and libclang
# (docs/decisions/0001-rocksdb-system-library.md), a C/C++ toolchain, and the Kafka-protocol
# broker used on machines without Apache Kafka (tansu, built once into $STRATA_CACHE).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

need_apt=()
for pkg in librocksdb-dev libclang-dev g++ make curl openssl chromium; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
# Node.js drives Chromium in the dashboard test; a node from elsewhere (nodesource, nvm) will do.
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

command -v cargo >/dev/null || die "cargo not found: install Rust with rustup first"

# playwright-core (no browser download: the test drives Debian's /usr/bin/chromium), once.
if [ ! -f "$STRATA_CACHE/tools/node/node_modules/playwright-core/package.json" ]; then
  log "installing playwright-core into $STRATA_CACHE/tools/node"
  mkdir -p "$STRATA_CACHE/tools/node"
  npm install --prefix "$STRATA_CACHE/tools/node" --no-audit --no-fund --silent playwright-core@1 >/dev/null
fi

if [ "${1:-}" != "--no-broker" ] && [ ! -x "$TANSU_BIN" ]; then
  log "building the tansu $TANSU_VERSION broker into $STRATA_CACHE/tools (about 10 minutes, once)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
    --root "$STRATA_CACHE/tools" --quiet
fi

#!/usr/bin/env bash
# Installs what building, testing and benchmarking Strata need and is missing: the distribution's
# RocksDB and libclang (docs/decisions/0001-rocksdb-system-library.md), OpenSSL and zstd for
# rdkafka's TLS, SASL and zstd support, a C/C++ toolchain, the tools the scripts call (curl, jq,
# wrk, openssl, Chromium and Node for the dashboard test, schemathesis for the API contract test),
# a JDK and Maven, and the local broker:
# Apache Kafka $KAFKA_VERSION from its Maven Central artifacts, fetched once into
# $STRATA_CACHE/tools (docs/decisions/0007-apache-kafka.md). `--no-broker` skips the broker.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

need_apt=()
for pkg in librocksdb-dev libclang-dev libssl-dev libzstd-dev pkg-config g++ make curl jq wrk openssl chromium; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
# Node.js drives Chromium in the dashboard test; a node from elsewhere (nodesource, nvm) will do.
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
# The broker runs on Java 17 or newer; any JDK on the PATH will do.
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need_apt+=(maven)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

command -v cargo >/dev/null || die "cargo not found: install Rust with rustup first"
# rustfmt and clippy, which .ci/run uses (rustup's default profile has them; the minimal one not).
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    command -v rustup >/dev/null || die "cargo $component is missing and rustup is not there to add it"
    log "adding the $component component with rustup"
    rustup component add "$component"
  fi
done

# playwright-core (no browser download: the test drives Debian's /usr/bin/chromium), once.
if [ ! -f "$STRATA_CACHE/tools/node/node_modules/playwright-core/package.json" ]; then
  log "installing playwright-core into $STRATA_CACHE/tools/node"
  mkdir -p "$STRATA_CACHE/tools/node"
  npm install --prefix "$STRATA_CACHE/tools/node" --no-audit --no-fund --silent playwright-core@1 >/dev/null
fi

# schemathesis (PyPI), for the API contract test (strata/tests/e2e/e2e_api.rs), once.
py_install schemathesis "$SCHEMATHESIS_VERSION"

# Apache Kafka: the broker jar and its runtime dependencies, plus the log4j binding (without it
# the broker logs nothing), resolved by Maven from a throwaway pom. jars.txt records every jar and
# its size; a cached copy is used only when all of them are there.
if [ "${1:-}" != "--no-broker" ] && ! kafka_installed; then
  log "fetching Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_HOME (once)"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  cat >"$tmp/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>strata.tools</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$KAFKA_LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$KAFKA_LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
  mvn -q -B -Dstyle.color=never -f "$tmp/pom.xml" -Dmaven.repo.local="$STRATA_CACHE/tools/m2" \
    dependency:copy-dependencies -DoutputDirectory="$tmp/libs" -DincludeScope=runtime
  [ -f "$tmp/libs/kafka_2.13-$KAFKA_VERSION.jar" ] || die "Maven did not fetch kafka_2.13-$KAFKA_VERSION.jar"
  rm -rf "$KAFKA_HOME"
  mkdir -p "$KAFKA_HOME"
  mv "$tmp/libs" "$KAFKA_HOME/libs"
  (cd "$KAFKA_HOME/libs" && for j in *.jar; do printf '%s %s\n' "$j" "$(stat -c %s "$j")"; done) >"$KAFKA_HOME/jars.txt"
  kafka_installed || die "the Kafka installation in $KAFKA_HOME is incomplete"
  log "Apache Kafka $KAFKA_VERSION installed ($(wc -l <"$KAFKA_HOME/jars.txt") jars)"
fi

#!/usr/bin/env bash
# Runs every Warren test on a fresh Debian machine: Rust unit and lapin integration tests
# (the storage suite and crash tests on SQLite and on MariaDB included), then the pika suite
# against the built `warren` binary. Installs and starts what it needs: a throwaway MariaDB
# (scripts/mariadb.sh; Debian's mariadb-server is installed when missing) unless
# WARREN_TEST_MYSQL_URL names a reachable server, a 3-node MariaDB Galera cluster
# (scripts/galera.sh, for the cluster tests), a Python venv with the pinned pika and pytest,
# rabbitmqadmin v2 (cargo install, a few minutes the first time), and Debian's chromium and
# chromedriver for the console's browser test. Brokers under test run
# on free ports with temporary data directories.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every temporary file of the run (test brokers' data directories, pytest's tmp_path) goes
# under target/test-tmp, emptied before and after, so no run leaves data in /tmp.
export TMPDIR="$PWD/target/test-tmp"
rm -rf "$TMPDIR"
mkdir -p "$TMPDIR"

echo "== mariadb"
WARREN_TEST_MYSQL_URL=$(scripts/mariadb.sh)
export WARREN_TEST_MYSQL_URL
stop_mariadb() {
    if [ -f target/mariadb/pid ]; then
        kill "$(cat target/mariadb/pid)" 2>/dev/null || true
    fi
    scripts/galera.sh stop || true
    rm -rf "$TMPDIR"
}
trap stop_mariadb EXIT

echo "== galera (3 MariaDB nodes, for the cluster tests)"
WARREN_TEST_GALERA_URLS=$(scripts/galera.sh | paste -sd, -)
export WARREN_TEST_GALERA_URLS

# A one-off build gains nothing from incremental caches and they cost gigabytes of disk.
export CARGO_INCREMENTAL=0

echo "== cargo build"
cargo build --workspace --all-targets

echo "== cargo test"
cargo test --workspace

echo "== rabbitmqadmin v2 (RabbitMQ's CLI for the management API; built once into target/tools)"
RABBITMQADMIN_VERSION=2.35.0
tools="$PWD/target/tools"
if ! "$tools/bin/rabbitmqadmin" --version 2>/dev/null | grep -qF "$RABBITMQADMIN_VERSION"; then
    cargo install --locked --quiet rabbitmqadmin --version "$RABBITMQADMIN_VERSION" --root "$tools"
fi
export RABBITMQADMIN_BIN="$tools/bin/rabbitmqadmin"

echo "== chromium and chromedriver (the console's browser test)"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium chromium-driver
fi

echo "== python tests (pika, and the console in headless chromium)"
venv=target/pytest-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
WARREN_BIN="$PWD/target/debug/warren" "$venv/bin/python" -m pytest -q tests/python
echo "== all tests passed"

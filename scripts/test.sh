#!/usr/bin/env bash
# Runs every Warren test on a fresh Debian machine: Rust unit and lapin integration tests, then
# the pika suite against the built `warren` binary. Installs what it needs (a Python venv with
# the pinned pika and pytest) and starts the broker itself on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo build"
cargo build --workspace --all-targets

echo "== cargo test"
cargo test --workspace

echo "== python tests (pika)"
venv=target/pytest-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
WARREN_BIN="$PWD/target/debug/warren" "$venv/bin/python" -m pytest -q tests/python
echo "== all tests passed"

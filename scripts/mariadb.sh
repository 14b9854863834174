#!/usr/bin/env bash
# Makes a MariaDB/MySQL server reachable for the tests and prints its URL
# (mysql://user:pass@host:port, a user allowed to create databases) on stdout.
#   - WARREN_TEST_MYSQL_URL already set and answering: that server is used.
#   - otherwise Debian's mariadb-server is installed when missing, and a throwaway server is
#     started on a free loopback port with its data in target/mariadb (wiped each run).
# The throwaway server's pid is written to target/mariadb/pid; scripts/test.sh stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "mariadb.sh: $*" >&2; }

answers() { # url
    python3 - "$1" <<'PY' >/dev/null 2>&1
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
socket.create_connection((u.hostname or "127.0.0.1", u.port or 3306), timeout=2).close()
PY
}

if [ -n "${WARREN_TEST_MYSQL_URL:-}" ] && answers "$WARREN_TEST_MYSQL_URL"; then
    log "using $WARREN_TEST_MYSQL_URL"
    echo "$WARREN_TEST_MYSQL_URL"
    exit 0
fi

if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ]; then
    log "installing mariadb-server from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q >&2
    $SUDO apt-get install -y -q --no-install-recommends mariadb-server >&2
    # The package may start a system instance; the tests use their own.
fi
MARIADBD=$(command -v mariadbd || echo /usr/sbin/mariadbd)
INSTALL_DB=$(command -v mariadb-install-db || echo /usr/bin/mariadb-install-db)

dir="$PWD/target/mariadb"
if [ -f "$dir/pid" ]; then
    kill "$(cat "$dir/pid")" 2>/dev/null || true
    sleep 1
fi
rm -rf "$dir"
mkdir -p "$dir/data"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
user=$(id -un)

"$INSTALL_DB" --no-defaults --datadir="$dir/data" --user="$user" \
    --auth-root-authentication-method=normal --skip-test-db >"$dir/install.log" 2>&1 \
    || { cat "$dir/install.log" >&2; exit 1; }
"$MARIADBD" --no-defaults --datadir="$dir/data" --user="$user" \
    --bind-address=127.0.0.1 --port="$port" --socket="$dir/sock" --pid-file="$dir/mariadbd.pid" \
    --skip-name-resolve --innodb-buffer-pool-size=128M --innodb-flush-log-at-trx-commit=1 \
    --max-allowed-packet=16M --log-error="$dir/error.log" >/dev/null 2>&1 &
echo $! >"$dir/pid"

for _ in $(seq 1 60); do
    if mariadb --no-defaults --socket="$dir/sock" -uroot -e "SELECT 1" >/dev/null 2>&1; then
        mariadb --no-defaults --socket="$dir/sock" -uroot -e \
            "CREATE USER 'warren'@'127.0.0.1' IDENTIFIED BY 'warren';
             GRANT ALL PRIVILEGES ON *.* TO 'warren'@'127.0.0.1';"
        log "throwaway MariaDB on 127.0.0.1:$port (data in $dir)"
        echo "mysql://warren:warren@127.0.0.1:$port"
        exit 0
    fi
    sleep 0.5
done
log "MariaDB did not start:"
cat "$dir/error.log" >&2 || true
exit 1

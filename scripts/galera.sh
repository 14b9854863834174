#!/usr/bin/env bash
# Starts a throwaway 3-node MariaDB Galera cluster on loopback ports from Debian's packages
# (mariadb-server and galera-4, installed when missing), data under target/galera/nodeN.
# Prints one URL per node (mysql://warren:warren@127.0.0.1:PORT), one per line, on stdout.
# `scripts/galera.sh stop` stops it. Node N's pid is in target/galera/nodeN/pid, so a test can
# kill one database node under load.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "galera.sh: $*" >&2; }
root="$PWD/target/galera"

stop_all() {
    for n in 1 2 3; do
        if [ -f "$root/node$n/pid" ]; then
            kill "$(cat "$root/node$n/pid")" 2>/dev/null || true
        fi
    done
}

if [ "${1:-}" = "stop" ]; then
    stop_all
    exit 0
fi

if ! command -v mariadbd >/dev/null 2>&1 && [ ! -x /usr/sbin/mariadbd ] \
    || [ ! -f /usr/lib/galera/libgalera_smm.so ]; then
    log "installing mariadb-server and galera-4 from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q >&2
    $SUDO apt-get install -y -q --no-install-recommends mariadb-server galera-4 rsync >&2
fi
MARIADBD=$(command -v mariadbd || echo /usr/sbin/mariadbd)
INSTALL_DB=$(command -v mariadb-install-db || echo /usr/bin/mariadb-install-db)
user=$(id -un)

stop_all
sleep 1
rm -rf "$root"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -a sql gcomm
for n in 1 2 3; do
    sql[$n]=$(free_port)
    gcomm[$n]=$(free_port)
done
peers="127.0.0.1:${gcomm[1]},127.0.0.1:${gcomm[2]},127.0.0.1:${gcomm[3]}"

start_node() { # n [--wsrep-new-cluster]
    local n=$1 dir="$root/node$1"
    shift
    "$MARIADBD" --no-defaults --datadir="$dir/data" --user="$user" \
        --bind-address=127.0.0.1 --port="${sql[$n]}" --socket="$dir/sock" \
        --pid-file="$dir/mariadbd.pid" --skip-name-resolve --log-error="$dir/error.log" \
        --innodb-buffer-pool-size=64M --max-allowed-packet=16M \
        --binlog-format=ROW --default-storage-engine=InnoDB --innodb-autoinc-lock-mode=2 \
        --wsrep-on=ON --wsrep-provider=/usr/lib/galera/libgalera_smm.so \
        --wsrep-cluster-name=warren-test --wsrep-node-name="node$n" \
        --wsrep-node-address="127.0.0.1:${gcomm[$n]}" \
        --wsrep-provider-options="gmcast.listen_addr=tcp://127.0.0.1:${gcomm[$n]};ist.recv_addr=127.0.0.1:$(free_port);gcache.size=64M" \
        --wsrep-cluster-address="gcomm://$peers" \
        --wsrep-sst-method=rsync --wsrep-sst-receive-address="127.0.0.1:$(free_port)" \
        "$@" >/dev/null 2>&1 &
    echo $! >"$dir/pid"
}

wait_node() { # n
    local dir="$root/node$1"
    for _ in $(seq 1 120); do
        if mariadb --no-defaults --socket="$dir/sock" -uroot -N -e \
            "SHOW STATUS LIKE 'wsrep_ready'" 2>/dev/null | grep -q ON; then
            return 0
        fi
        sleep 0.5
    done
    log "node $1 did not join:"
    tail -30 "$dir/error.log" >&2 || true
    stop_all
    exit 1
}

# Node 1 is initialised and bootstrapped alone, given the test user, and shut down cleanly;
# nodes 2 and 3 start from copies of its data, so they join at nearly the same state and only
# the last few writes are transferred. The transfer runs rsync as a daemon whose user is
# `nobody`, so the data directories are made writable for it.
mkdir -p "$root/node1/data"
"$INSTALL_DB" --no-defaults --datadir="$root/node1/data" --user="$user" \
    --auth-root-authentication-method=normal --skip-test-db \
    >"$root/node1/install.log" 2>&1 || { cat "$root/node1/install.log" >&2; exit 1; }
start_node 1 --wsrep-new-cluster
wait_node 1
mariadb --no-defaults --socket="$root/node1/sock" -uroot -e \
    "CREATE USER 'warren'@'127.0.0.1' IDENTIFIED BY 'warren';
     GRANT ALL PRIVILEGES ON *.* TO 'warren'@'127.0.0.1';"
mariadb-admin --no-defaults --socket="$root/node1/sock" -uroot shutdown
for _ in $(seq 1 60); do
    kill -0 "$(cat "$root/node1/pid")" 2>/dev/null || break
    sleep 0.5
done
for n in 2 3; do
    mkdir -p "$root/node$n"
    cp -a "$root/node1/data" "$root/node$n/data"
done
chmod -R a+rwX "$root"
start_node 1 --wsrep-new-cluster
wait_node 1
for n in 2 3; do
    start_node "$n"
    wait_node "$n"
done
size=$(mariadb --no-defaults --socket="$root/node1/sock" -uroot -N -e \
    "SHOW STATUS LIKE 'wsrep_cluster_size'" | awk '{print $2}')
log "Galera cluster of $size nodes on 127.0.0.1:${sql[1]},${sql[2]},${sql[3]} (data in $root)"
for n in 1 2 3; do
    echo "mysql://warren:warren@127.0.0.1:${sql[$n]}"
done

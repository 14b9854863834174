#!/usr/bin/env bash
# Warren vs RabbitMQ, measured with warren-perf: every case runs against both brokers, one
# discarded warm-up then 3 measured runs, each on a freshly started broker with a fresh data
# directory; medians go to bench/results/<date>.md with a PNG chart. See bench/README.md.
#
#   bench/run.sh [--only S1,S2] [--duration N] [--runs N] [--quick | --full] [--keep]
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WARREN=$TARGET/release/warren
PERF=$TARGET/release/warren-perf
REPORT=$ROOT/bench/report.py
RABBIT_SERVER=/usr/lib/rabbitmq/bin/rabbitmq-server
WARREN_PORT=${WARREN_PORT:-5690}
RABBIT_PORT=${RABBIT_PORT:-5691}
RABBIT_DIST_PORT=${RABBIT_DIST_PORT:-25691}
RUNS=3

ONLY=""
DURATION=15
BACKLOG=1000000
KEEP=0

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --only) ONLY=${2:?--only needs a list}; shift 2 ;;
        --duration) DURATION=${2:?--duration needs seconds}; shift 2 ;;
        --runs) RUNS=${2:?--runs needs a count}; shift 2 ;;
        --quick) BACKLOG=1000000; shift ;;
        --full) BACKLOG=10000000; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "unknown option $1" >&2; usage 2 ;;
    esac
done

log() { echo "[bench $(date +%T)] $*" >&2; }

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

# ---- tools -------------------------------------------------------------------------------

apt_install() {
    log "installing $* (apt-get)"
    apt-get install -y -q "$@" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null; }
}

[ -x "$RABBIT_SERVER" ] || apt_install rabbitmq-server
command -v gnuplot >/dev/null || apt_install gnuplot-nox
command -v python3 >/dev/null || { echo "python3 is needed" >&2; exit 1; }

log "building release binaries"
(cd "$ROOT" && cargo build --release -q -p warren-broker -p warren-perf)

# Many connections (S4, S8) need many descriptors, for the brokers and for warren-perf.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log "open files limit: $(ulimit -n)"

# ---- brokers -----------------------------------------------------------------------------

WORK=$(mktemp -d /tmp/warren-bench.XXXXXX)
RAW=$WORK/raw
mkdir -p "$RAW"
EPMD_BEFORE=0
pgrep -x epmd >/dev/null && EPMD_BEFORE=1
BROKER_PID=""   # the process to watch (beam.smp for RabbitMQ)
STARTED_PID=""  # the process we started
BROKER_DIR=""
BROKER_N=0
WARREN_MYSQL=""  # set for the cases that run Warren on MariaDB: mysql://warren:warren@host:port
WARREN_DB=""
MYSQL_PORT=""

wait_port() {
    local port=$1 i
    for i in $(seq 1 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        if ! kill -0 "$STARTED_PID" 2>/dev/null; then
            echo "the broker exited while starting; see $BROKER_DIR" >&2; return 1
        fi
        sleep 0.1
    done
    echo "port $port did not open in 60 s" >&2
    return 1
}

start_warren() {
    BROKER_N=$((BROKER_N + 1))
    BROKER_DIR=$WORK/warren-$BROKER_N
    mkdir -p "$BROKER_DIR"
    local -a storage=()
    if [ -n "$WARREN_MYSQL" ]; then
        # A fresh database per run on the bench's MariaDB server.
        local db="warren_bench_$$_$BROKER_N"
        mariadb --no-defaults -h127.0.0.1 -P"$MYSQL_PORT" -uwarren -pwarren \
            -e "DROP DATABASE IF EXISTS $db; CREATE DATABASE $db"
        storage=(--storage "$WARREN_MYSQL/$db")
        WARREN_DB=$db
    fi
    "$WARREN" --amqp-listen "127.0.0.1:$WARREN_PORT" --data-dir "$BROKER_DIR/data" "${storage[@]}" \
        --http-listen "" --prometheus-listen "" \
        >"$BROKER_DIR/warren.log" 2>&1 &
    STARTED_PID=$!
    BROKER_PID=$STARTED_PID
    wait_port "$WARREN_PORT"
}

start_rabbitmq() {
    BROKER_N=$((BROKER_N + 1))
    BROKER_DIR=$WORK/rabbitmq-$BROKER_N
    mkdir -p "$BROKER_DIR"
    env HOME="$BROKER_DIR" \
        RABBITMQ_NODENAME="warrenbench$$n$BROKER_N@localhost" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$RABBIT_PORT" \
        RABBITMQ_DIST_PORT="$RABBIT_DIST_PORT" \
        RABBITMQ_MNESIA_BASE="$BROKER_DIR/mnesia" \
        RABBITMQ_LOG_BASE="$BROKER_DIR/log" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$BROKER_DIR/enabled_plugins" \
        RABBITMQ_CONFIG_FILE="$BROKER_DIR/rabbitmq" \
        "$RABBIT_SERVER" >"$BROKER_DIR/out.log" 2>&1 &
    STARTED_PID=$!
    wait_port "$RABBIT_PORT"
    BROKER_PID=$(pgrep -f -- "beam.smp.*-home $BROKER_DIR( |$)" | head -1)
    [ -n "$BROKER_PID" ] || { echo "cannot find RabbitMQ's beam.smp" >&2; return 1; }
}

stop_broker() {
    [ -n "$STARTED_PID" ] || return 0
    kill -TERM "$BROKER_PID" 2>/dev/null || true
    local i
    for i in $(seq 1 300); do
        kill -0 "$BROKER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$BROKER_PID" "$STARTED_PID" 2>/dev/null || true
    wait "$STARTED_PID" 2>/dev/null || true
    rm -rf "$BROKER_DIR"
    if [ -n "$WARREN_DB" ]; then
        mariadb --no-defaults -h127.0.0.1 -P"$MYSQL_PORT" -uwarren -pwarren \
            -e "DROP DATABASE IF EXISTS $WARREN_DB" || true
        WARREN_DB=""
    fi
    STARTED_PID=""
    BROKER_PID=""
}

cleanup() {
    stop_broker
    if [ -n "$MYSQL_PORT" ] && [ -f "$ROOT/target/mariadb/pid" ]; then
        kill "$(cat "$ROOT/target/mariadb/pid")" 2>/dev/null || true
    fi
    if [ "$EPMD_BEFORE" = 0 ] && pgrep -x epmd >/dev/null; then epmd -kill >/dev/null 2>&1 || true; fi
    if [ "$KEEP" = 1 ]; then log "raw results kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

uri() {
    case "$1" in
        warren) echo "amqp://guest:guest@127.0.0.1:$WARREN_PORT/%2f" ;;
        rabbitmq) echo "amqp://guest:guest@127.0.0.1:$RABBIT_PORT/%2f" ;;
    esac
}

# perf_run BROKER OUT.json ARGS...: one warren-perf run against the running broker; a mismatch
# between consumed and confirmed is reported loudly (and recorded in the JSON).
perf_run() {
    local broker=$1 out=$2
    shift 2
    timeout $((DURATION + 900)) "$PERF" --uri "$(uri "$broker")" --json \
        --watch-pid "$BROKER_PID" --id "$(basename "${out%.json}")" "$@" \
        >"$out" 2>"${out%.json}.log" || {
        echo "warren-perf failed against $broker: $(tail -1 "${out%.json}.log")" >&2
        return 1
    }
    python3 "$REPORT" check "$out" >&2 || log "MISMATCH against $broker"
}

# run_case ID SCENARIO METRICS "DESCRIPTION" [--fill "FILL ARGS"] -- ARGS...
# Runs ARGS against each broker: a warm-up, then $RUNS measured runs, each on a fresh broker.
# With --fill, every run first publishes with FILL ARGS (no consumer) and ARGS consume what it
# confirmed (or sent): @FILLED@ in ARGS stands for that count. METRICS is a comma-separated list
# of report.py metric names; "fill:" ones are read from the fill run.
run_case() {
    local id=$1 scen=$2 metrics=$3 desc=$4
    shift 4
    local fill=""
    if [ "${1:-}" = --fill ]; then fill=$2; shift 2; fi
    [ "${1:-}" = -- ] && shift
    local shown="$*"
    [ -n "$fill" ] && shown="$* (after $fill)"
    printf '%s\t%s\t%s\t%s\t%s\n' "$id" "$scen" "$desc" "$metrics" "$shown" >>"$RAW/cases.tsv"
    local broker n dir name count
    local -a args
    for broker in warren rabbitmq; do
        dir=$RAW/$id/$broker
        mkdir -p "$dir"
        for n in $(seq 0 "$RUNS"); do
            if [ "$n" = 0 ]; then name=warmup; else name=run-$n; fi
            log "$scen $id on $broker: $([ "$n" = 0 ] && echo warm-up || echo "run $n of $RUNS")"
            "start_$broker"
            args=("$@")
            if [ -n "$fill" ]; then
                # shellcheck disable=SC2086 # the fill arguments are meant to be split
                perf_run "$broker" "$dir/fill-${name#run-}.json" $fill || true
                count=$(python3 "$REPORT" filled "$dir/fill-${name#run-}.json" 2>/dev/null || echo 0)
                args=("${args[@]//@FILLED@/$count}")
            fi
            perf_run "$broker" "$dir/$name.json" "${args[@]}" || true
            if [ -n "$fill" ]; then
                python3 "$REPORT" check "$dir/$name.json" "$count" >&2 || log "MISMATCH against $broker"
            fi
            stop_broker
        done
    done
}

D=$DURATION
# Consume-only and drain runs stop at their count; this only bounds a run that lost messages.
SAFETY=$((DURATION * 20 + 300))
if wanted S1; then
    run_case s1-16b S1 receive_rate "transient 16 B, autoack" -- -x1 -y1 -s16 -a -z "$D"
    run_case s1-1kib S1 receive_rate "transient 1 KiB, autoack" -- -x1 -y1 -s1024 -a -z "$D"
    run_case s1-publish S1 send_rate "publish only, 16 B" -- -x1 -y0 -s16 -u s1-publish -z "$D"
    run_case s1-consume S1 receive_rate "consume only (queue pre-filled for $D s), 16 B" \
        --fill "-x1 -y0 -s16 -u s1-consume -z $D" -- -x0 -y1 -a -u s1-consume -D @FILLED@ -z "$SAFETY"
fi
if wanted S2; then
    run_case s2-persistent S2 receive_rate "persistent 1 KiB, confirms, durable queue" -- \
        -x1 -y1 -s1024 -f persistent -c1000 -q1000 -A100 -u s2 -z "$D"
    # The same with Warren's store on MariaDB (scripts/mariadb.sh starts a throwaway server).
    WARREN_MYSQL=$(cd "$ROOT" && env -u WARREN_TEST_MYSQL_URL scripts/mariadb.sh)
    MYSQL_PORT=${WARREN_MYSQL##*:}
    run_case s2-persistent-mariadb S2 receive_rate \
        "persistent 1 KiB, confirms, durable queue; Warren's store on MariaDB" -- \
        -x1 -y1 -s1024 -f persistent -c1000 -q1000 -A100 -u s2 -z "$D"
    WARREN_MYSQL=""
fi
if wanted S3; then
    for r in 1000 10000 50000; do
        run_case "s3-transient-r$r" S3 consumer_p99 "latency at $r msg/s, transient 16 B" -- \
            -x1 -y1 -s16 -r "$r" -a -z "$D"
        run_case "s3-persistent-r$r" S3 consumer_p99 "latency at $r msg/s, persistent 16 B" -- \
            -x1 -y1 -s16 -r "$r" -f persistent -c1000 -q1000 -u "s3-$r" -z "$D"
    done
fi
if wanted S4; then
    run_case s4-1000q S4 consumer_p99,receive_rate \
        "1000 queues, 1000 producers at 10 msg/s, 1000 consumers" -- \
        --queue-pattern 's4-%d' --queue-pattern-from 1 --queue-pattern-to 1000 \
        -x1000 -y1000 -s16 -r10 -z "$D"
    run_case s4-64x64x64 S4 receive_rate "64 queues, 64 producers, 64 consumers, flat out" -- \
        --queue-pattern 's4x-%d' --queue-pattern-from 1 --queue-pattern-to 64 \
        -x64 -y64 -s16 -z "$D"
fi
if wanted S5; then
    for s in 16 1024; do
        run_case "s5-fanout-${s}b" S5 receive_rate "amq.fanout to 10 queues, 10 consumers, $s B" -- \
            -e amq.fanout --queue-pattern 's5-%d' --queue-pattern-from 1 --queue-pattern-to 10 \
            -x1 -y10 -s "$s" -z "$D"
    done
fi
if wanted S6; then
    run_case s6-1mib-transient S6 receive_rate "1 MiB transient, confirms 10" -- \
        -x1 -y1 -s1048576 -c10 -z "$D"
    run_case s6-1mib-persistent S6 receive_rate "1 MiB persistent, confirms 10" -- \
        -x1 -y1 -s1048576 -f persistent -c10 -u s6 -z "$D"
fi
if wanted S7; then
    run_case s7-backlog S7 fill:send_rate,receive_rate \
        "backlog: publish $BACKLOG x 1 KiB with no consumer, then drain" \
        --fill "-x1 -y0 -s1024 -c1000 -C $BACKLOG -u s7" -- \
        -x0 -y1 -q1000 -A100 -u s7 -D @FILLED@ -z "$SAFETY"
fi
if wanted S8; then
    run_case s8-idle-connections S8 connect_rate,rss_per_conn "10,000 idle connections" -- \
        -x0 -y0 --connections 10000 -z 5
fi

[ -s "$RAW/cases.tsv" ] || { echo "no scenario selected (--only $ONLY)" >&2; exit 2; }

# ---- report ------------------------------------------------------------------------------

{
    echo "date=$(date '+%F %H:%M')"
    echo "machine=$(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -r)"
    echo "warren=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "rabbitmq=$(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null || echo '?')"
    echo "duration=$DURATION"
    echo "runs=$RUNS"
} >"$RAW/meta.txt"

mkdir -p "$ROOT/bench/results"
OUT=$ROOT/bench/results/$(date +%F).md
[ -e "$OUT" ] && OUT=$ROOT/bench/results/$(date +%F-%H%M).md
python3 "$REPORT" summarize "$RAW" "$OUT"
log "wrote $OUT"

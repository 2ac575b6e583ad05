#!/usr/bin/env bash
# A local multi-node snapshotd cluster on one machine: each node gets its own
# loopback address (127.0.0.<10+id>), port, Unix socket and arena directory.
#
#   local-cluster.sh start  DIR NODES PARITY   write DIR/cluster.toml + secret, start every node
#   local-cluster.sh node   DIR ID [--fresh]   (re)start one node; --fresh: empty arena (a replacement)
#   local-cluster.sh kill   DIR ID             kill -9 one node
#   local-cluster.sh stop   DIR                SIGTERM every node, wait, remove arenas
#   local-cluster.sh socket DIR ID             print a node's Unix socket path
#   local-cluster.sh arena  DIR ID             print a node's arena directory
#
# Environment: SNAPSHOTD (binary; default: .build/release/snapshotd, else
# .build/debug/snapshotd), BASE_PORT (default 7400), BUDGET (default 4GiB),
# KEEP (default 2), HEARTBEAT_MS / FAILURE_MS (default 200 / 1500), LOG_LEVEL.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
binary=${SNAPSHOTD:-}
if [ -z "$binary" ]; then
    if [ -x "$here/.build/release/snapshotd" ]; then binary="$here/.build/release/snapshotd"; else binary="$here/.build/debug/snapshotd"; fi
fi
base_port=${BASE_PORT:-7400}

address() { echo "127.0.0.$((10 + $1)):$((base_port + $1))"; }
arena() { echo "/dev/shm/snapshotd-$(basename "$1")-node$2"; }

start_node() {
    local dir=$1 id=$2 fresh=${3:-}
    if [ -f "$dir/node$id.pid" ] && kill -0 "$(cat "$dir/node$id.pid")" 2>/dev/null; then
        echo "node $id is already running" >&2
        return 1
    fi
    if [ "$fresh" = "--fresh" ]; then rm -rf "$(arena "$dir" "$id")"; fi
    rm -f "$dir/node$id.sock"  # a killed node leaves its socket file behind
    "$binary" --node-id "$id" --cluster-file "$dir/cluster.toml" \
        --shared-secret-file "$dir/secret" --unix-socket "$dir/node$id.sock" \
        --arena-directory "$(arena "$dir" "$id")" --memory-budget "${BUDGET:-4GiB}" --keep "${KEEP:-2}" \
        --log-level "${LOG_LEVEL:-info}" >>"$dir/node$id.log" 2>&1 &
    echo $! >"$dir/node$id.pid"
    for _ in $(seq 1 200); do
        [ -S "$dir/node$id.sock" ] && return 0
        kill -0 "$(cat "$dir/node$id.pid")" 2>/dev/null || break
        sleep 0.05
    done
    echo "node $id did not start; see $dir/node$id.log" >&2
    tail -5 "$dir/node$id.log" >&2
    return 1
}

case "${1:-}" in
start)
    dir=$2 nodes=$3 parity=$4
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/secret"
    chmod 600 "$dir/secret"
    {
        echo "heartbeat_interval_ms = ${HEARTBEAT_MS:-200}"
        echo "failure_timeout_ms = ${FAILURE_MS:-1500}"
        for id in $(seq 0 $((nodes - 1))); do printf '[[node]]\nid = %d\naddress = "%s"\n' "$id" "$(address "$id")"; done
        printf '[[group]]\nnodes = [%s]\nparity = %d\n' "$(seq -s, 0 $((nodes - 1)))" "$parity"
    } >"$dir/cluster.toml"
    echo "$nodes" >"$dir/nodes"
    for id in $(seq 0 $((nodes - 1))); do start_node "$dir" "$id"; done
    echo "started $nodes nodes, RS($((nodes - parity)),$parity), in $dir"
    ;;
node) start_node "$2" "$3" "${4:-}" ;;
kill)
    pid=$(cat "$2/node$3.pid")
    kill -9 "$pid" 2>/dev/null || true
    # Gone, or a zombie (dead, just not reaped yet by whoever inherited it)…
    while kill -0 "$pid" 2>/dev/null && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; do sleep 0.02; done
    # …and its port closed: other threads may still be exiting behind a zombie leader.
    port_hex=$(printf ':%04X ' "$((base_port + $3))")
    for _ in $(seq 1 500); do
        grep -q "${port_hex}[0-9A-F:]* 0A " /proc/net/tcp 2>/dev/null || break
        sleep 0.02
    done
    rm -f "$2/node$3.pid"
    ;;
stop)
    dir=$2
    for pidfile in "$dir"/node*.pid; do
        [ -f "$pidfile" ] || continue
        kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
    done
    for pidfile in "$dir"/node*.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
    for id in $(seq 0 $(($(cat "$dir/nodes" 2>/dev/null || echo 0) - 1))); do rm -rf "$(arena "$dir" "$id")"; done
    ;;
socket) echo "$2/node$3.sock" ;;
arena) arena "$(cd "$2" && pwd)" "$3" ;;
*)
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

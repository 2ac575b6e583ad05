#!/usr/bin/env bash
# A local multi-node snapshotd cluster on one machine: each node gets its own
# address, port, Unix socket and arena directory.
#
#   local-cluster.sh start  DIR NODES PARITY   write DIR/cluster.toml + secret, start every node
#   local-cluster.sh node   DIR ID [--fresh]   (re)start one node; --fresh: empty arena (a replacement)
#   local-cluster.sh kill   DIR ID             kill -9 one node
#   local-cluster.sh stop   DIR                SIGTERM every node, wait, remove arenas (and namespaces)
#   local-cluster.sh socket DIR ID             print a node's Unix socket path
#   local-cluster.sh arena  DIR ID             print a node's arena directory
#   local-cluster.sh address DIR ID            print a node's peer address (host:port)
#   local-cluster.sh exec   DIR ID CMD...      run CMD where node ID's network is (its namespace, if any)
#   local-cluster.sh blackhole DIR ID          NETNS only: node ID's link silently drops every packet, both ways
#                                              (a powered-off host: no reset, no ICMP); `node` restarting it lifts it
#   local-cluster.sh repair DIR pipelined|gather   set the repair strategy (read by nodes started later)
#
# Environment: SNAPSHOTD (binary; default: .build/release/snapshotd, else
# .build/debug/snapshotd), BASE_PORT (default 7400), BUDGET (default 4GiB),
# KEEP (default 2), HEARTBEAT_MS / FAILURE_MS (default 200 / 1500), SCRUB_MS
# (scrub interval, default 600000), LOG_LEVEL, FLUSH_DIR / FLUSH_EVERY (durable
# tier: flush every FLUSH_EVERY-th committed step, default 1, into FLUSH_DIR),
# METRICS_PORT (Prometheus endpoint: node ID serves GET /metrics on its own
# address at METRICS_PORT+ID; 0 takes a free port each, which the node's
# "snapshotd ready" log line names; unset: no endpoint).
# At start: NETNS=1 puts every node in its own network namespace (needs root),
# joined by a bridge, with address 198.18.X.(10+id) (RFC 2544 benchmarking
# range); LINK_RATE (e.g. 1gbit) then caps each node's link in each direction
# with a token bucket, so the network, not the CPU, is what a test measures.
# Without NETNS, node ID listens on 127.0.0.(10+id).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
binary=${SNAPSHOTD:-}
if [ -z "$binary" ]; then
    if [ -x "$here/.build/release/snapshotd" ]; then binary="$here/.build/release/snapshotd"; else binary="$here/.build/debug/snapshotd"; fi
fi
# A cluster keeps the BASE_PORT it was started with.
if [ "${1:-}" != start ] && [ -f "${2:-}/base_port" ]; then base_port=$(cat "$2/base_port"); else base_port=${BASE_PORT:-7400}; fi
tag="sn$base_port"  # prefix of namespace, bridge and veth names (≤ 15 characters with the id)
subnet="198.18.$((base_port % 256))"

uses_netns() { [ -f "$1/netns" ]; }
namespace() { echo "$tag-n$1"; }
address() {
    if uses_netns "$1"; then echo "$subnet.$((10 + $2)):$((base_port + $2))"; else echo "127.0.0.$((10 + $2)):$((base_port + $2))"; fi
}
arena() { echo "/dev/shm/snapshotd-$(basename "$1")-node$2"; }
# Sets `prefix` to what runs a command in node ID's network namespace
# (nothing without one).
network_prefix() {
    prefix=()
    if uses_netns "$1"; then prefix=(ip netns exec "$(namespace "$2")"); fi
}
# Runs a command where node ID's network is.
in_network() {
    network_prefix "$1" "$2"
    shift 2
    "${prefix[@]}" "$@"
}

create_network() {
    local dir=$1 nodes=$2 rate=${LINK_RATE:-}
    ip link add "${tag}br" type bridge || { echo "cannot create network namespaces (needs root and CAP_NET_ADMIN)" >&2; return 1; }
    echo "$tag" >"$dir/netns"
    ip addr add "$subnet.1/24" dev "${tag}br"
    ip link set "${tag}br" up
    for id in $(seq 0 $((nodes - 1))); do
        local ns host_end node_end
        ns=$(namespace "$id") host_end="${tag}v$id" node_end="${tag}p$id"
        ip netns add "$ns"
        ip link add "$host_end" type veth peer name "$node_end"
        ip link set "$node_end" netns "$ns"
        ip link set "$host_end" master "${tag}br" up
        ip -n "$ns" addr add "$subnet.$((10 + id))/24" dev "$node_end"
        ip -n "$ns" link set "$node_end" up
        ip -n "$ns" link set lo up
        if [ -n "$rate" ]; then
            # Egress of each end: the node's upload and its download.
            ip netns exec "$ns" tc qdisc add dev "$node_end" root tbf rate "$rate" burst 1mb latency 50ms
            tc qdisc add dev "$host_end" root tbf rate "$rate" burst 1mb latency 50ms
        fi
    done
}

remove_network() {
    local dir=$1
    uses_netns "$dir" || return 0
    for id in $(seq 0 $(($(cat "$dir/nodes" 2>/dev/null || echo 0) - 1))); do
        ip link del "${tag}v$id" 2>/dev/null || true  # both ends of the pair, even if a process still holds the namespace
        ip netns del "$(namespace "$id")" 2>/dev/null || true
    done
    ip link del "${tag}br" 2>/dev/null || true
    rm -f "$dir/netns"
}

# Every packet through node ID's veth is dropped, in both directions: a
# token bucket whose burst is smaller than any packet never sends one (this
# needs only the tbf qdisc that LINK_RATE uses already, not netem).
blackhole() {
    local dir=$1 id=$2
    uses_netns "$dir" || { echo "blackhole needs a cluster started with NETNS=1" >&2; return 1; }
    tc qdisc replace dev "${tag}v$id" root tbf rate 8bit burst 16 limit 1
    ip netns exec "$(namespace "$id")" tc qdisc replace dev "${tag}p$id" root tbf rate 8bit burst 16 limit 1
}

# Lifts a black hole (restores the link cap, if any).
restore_link() {
    local dir=$1 id=$2 rate=${LINK_RATE:-}
    uses_netns "$dir" || return 0
    tc qdisc del dev "${tag}v$id" root 2>/dev/null || true
    ip netns exec "$(namespace "$id")" tc qdisc del dev "${tag}p$id" root 2>/dev/null || true
    if [ -n "$rate" ]; then
        ip netns exec "$(namespace "$id")" tc qdisc add dev "${tag}p$id" root tbf rate "$rate" burst 1mb latency 50ms
        tc qdisc add dev "${tag}v$id" root tbf rate "$rate" burst 1mb latency 50ms
    fi
}

start_node() {
    local dir=$1 id=$2 fresh=${3:-}
    if [ -f "$dir/node$id.pid" ] && kill -0 "$(cat "$dir/node$id.pid")" 2>/dev/null; then
        echo "node $id is already running" >&2
        return 1
    fi
    if [ "$fresh" = "--fresh" ]; then rm -rf "$(arena "$dir" "$id")"; fi
    rm -f "$dir/node$id.sock"  # a killed node leaves its socket file behind
    if [ -f "$dir/blackholed$id" ]; then restore_link "$dir" "$id" && rm -f "$dir/blackholed$id"; fi
    # A plain command, not in_network, so that $! is the daemon's own pid
    # (`ip netns exec` execs it in place).
    local prefix metrics=()
    network_prefix "$dir" "$id"
    if [ -n "${METRICS_PORT:-}" ]; then
        local host
        host=$(address "$dir" "$id")
        host=${host%:*}
        metrics=(--metrics-listen "$host:$((METRICS_PORT == 0 ? 0 : METRICS_PORT + id))")
    fi
    "${prefix[@]}" "$binary" --node-id "$id" --cluster-file "$dir/cluster.toml" "${metrics[@]}" \
        --shared-secret-file "$dir/secret" --peer-secret-file "$dir/peer-secret" --unix-socket "$dir/node$id.sock" \
        --arena-directory "$(arena "$dir" "$id")" --memory-budget "${BUDGET:-4GiB}" --keep "${KEEP:-2}" \
        --scrub-interval-ms "${SCRUB_MS:-600000}" --log-level "${LOG_LEVEL:-info}" \
        ${FLUSH_DIR:+--flush-directory "$FLUSH_DIR" --flush-every-steps "${FLUSH_EVERY:-1}"} >>"$dir/node$id.log" 2>&1 &
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
    echo "$nodes" >"$dir/nodes"
    echo "$base_port" >"$dir/base_port"
    if [ "${NETNS:-0}" = 1 ]; then create_network "$dir" "$nodes"; fi
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/secret"
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/peer-secret"
    chmod 600 "$dir/secret" "$dir/peer-secret"
    {
        echo "heartbeat_interval_ms = ${HEARTBEAT_MS:-200}"
        echo "failure_timeout_ms = ${FAILURE_MS:-1500}"
        echo "repair = \"${REPAIR:-pipelined}\""
        for id in $(seq 0 $((nodes - 1))); do printf '[[node]]\nid = %d\naddress = "%s"\n' "$id" "$(address "$dir" "$id")"; done
        printf '[[group]]\nnodes = [%s]\nparity = %d\n' "$(seq -s, 0 $((nodes - 1)))" "$parity"
    } >"$dir/cluster.toml"
    for id in $(seq 0 $((nodes - 1))); do start_node "$dir" "$id"; done
    echo "started $nodes nodes, RS($((nodes - parity)),$parity), in $dir$(uses_netns "$dir" && echo ", one network namespace each${LINK_RATE:+, links capped at $LINK_RATE}")"
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
        in_network "$2" "$3" grep -q "${port_hex}[0-9A-F:]* 0A " /proc/net/tcp 2>/dev/null || break
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
    remove_network "$dir"
    ;;
socket) echo "$2/node$3.sock" ;;
arena) arena "$(cd "$2" && pwd)" "$3" ;;
address) address "$2" "$3" ;;
exec)
    dir=$2 id=$3
    shift 3
    in_network "$dir" "$id" "$@"
    ;;
blackhole)
    blackhole "$2" "$3"
    touch "$2/blackholed$3"
    ;;
repair)
    case "$3" in pipelined | gather) ;; *) echo "repair strategy must be pipelined or gather" >&2; exit 2 ;; esac
    sed -i "s/^repair = .*/repair = \"$3\"/" "$2/cluster.toml"
    ;;
*)
    sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

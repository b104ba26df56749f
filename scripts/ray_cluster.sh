#!/usr/bin/env bash
# A real two-node Ray cluster on this machine, bound to 127.0.0.1 only, with Ray's token authentication on.
#
#   eval "$(scripts/ray_cluster.sh start)"     # prints `export ...` lines: RAY_ADDRESS, DOWNPOUR_RAY_ADDRESS, ...
#   scripts/ray_cluster.sh stop "$DOWNPOUR_RAY_DIR"
#   scripts/ray_cluster.sh run CMD [ARG...]    # start, run CMD with those variables, stop (even when CMD fails
#                                              # or is interrupted); exit with CMD's status. Without Ray at $RAY,
#                                              # just runs CMD.
#
# `start` runs a head node (`ray start --head --port=<free port> --num-cpus=1 ...`) and a second node
# (`ray start --address=127.0.0.1:<port> --num-cpus=1 ...`), both in the foreground (`--block`) of background
# processes whose ids it writes to DIR/pids; `stop` sends those ids SIGTERM (Ray's own shutdown of each node), waits,
# then SIGKILLs whatever is left of exactly those processes and their children. It never runs `ray stop`, which
# would stop every Ray instance on the machine, other people's included.
#
# Both nodes share one temporary directory (DIR/ray; the second raylet takes its own socket names) and a token
# written to DIR/auth_token, not ~/.ray. Ray resolves 127.0.0.1 to the machine's routable address before binding;
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps the loopback address on the head node, and for the second node (whose
# `ray start` refuses that variable) a three-line launcher keeps it by skipping that resolution. Clients need the
# same variable to reach a loopback-only cluster; `start` exports it.
#
# Environment: RAY (default .venv/bin/ray), RAY_CLUSTER_OBJECT_STORE (bytes per node, default 100 MB),
# RAY_CLUSTER_TIMEOUT (seconds to wait for the nodes, default 90).
set -euo pipefail

RAY=${RAY:-.venv/bin/ray}
PY="$(dirname "$RAY")/python"
STORE=${RAY_CLUSTER_OBJECT_STORE:-100000000}
TIMEOUT=${RAY_CLUSTER_TIMEOUT:-90}

die() { echo "ray_cluster.sh: $*" >&2; exit 1; }

free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The live processes of this cluster, one id a line: the two `ray start --block` processes named in DIR/pids, every
# process whose command line names this cluster's Ray directory (Ray daemonizes its GCS and raylets), and all
# their descendants. Zombies are left out: they hold nothing, and only their parent can reap them.
cluster_pids() {
    local dir=$1 pid ppid stat args
    local -A listed=() parent=() keep=()
    if [[ -f "$dir/pids" ]]; then
        while read -r pid; do [[ -n "$pid" ]] && listed[$pid]=1; done <"$dir/pids"
    fi
    local table
    table=$(ps -eo pid=,ppid=,stat=,args=)
    while read -r pid ppid stat args; do
        [[ $stat == Z* ]] && continue
        parent[$pid]=$ppid
        if [[ -n "${listed[$pid]:-}" || $args == *"$dir/ray/"* ]]; then
            keep[$pid]=1
        fi
    done <<<"$table"
    local changed=1
    while ((changed)); do # add children of kept processes until nothing changes
        changed=0
        for pid in "${!parent[@]}"; do
            if [[ -z "${keep[$pid]:-}" && -n "${keep[${parent[$pid]}]:-}" ]]; then
                keep[$pid]=1
                changed=1
            fi
        done
    done
    for pid in "${!keep[@]}"; do echo "$pid"; done
}

start() {
    local dir=${1:-}
    [[ -x "$RAY" ]] || die "no Ray at $RAY (pip install 'downpour-sgd[ray]', or set RAY=/path/to/ray)"
    if [[ -z "$dir" ]]; then
        dir=$(mktemp -d "${TMPDIR:-/tmp}/downpour-ray.XXXXXX")
    else
        mkdir -p "$dir"
        dir=$(cd "$dir" && pwd)
    fi
    local port
    port=$(free_port)
    umask 077
    "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$dir/auth_token"
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$dir/auth_token"
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=1 # a throw-away cluster: on SIGTERM, no 30 s drain of each node
    local common=(--num-cpus=1 --object-store-memory="$STORE" --disable-usage-stats --temp-dir="$dir/ray" --block)

    # If anything below fails, take down what was started.
    trap 'stop "$dir" >/dev/null 2>&1 || true' ERR

    # --system-config (a hidden `ray start` option), as downpour's own instance: updates up to 1 MiB inline, and actor
    # processes at normal priority (Ray's default nice 15 makes training yield to everything else on the machine).
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "$RAY" start --head --node-ip-address=127.0.0.1 --port="$port" \
        --include-dashboard=false --system-config='{"max_direct_call_object_size": 1048576, "worker_niceness": 0}' \
        "${common[@]}" >"$dir/head.log" 2>&1 &
    echo $! >"$dir/pids"
    local deadline=$((SECONDS + TIMEOUT))
    until [[ -f "$dir/ray/ray_current_cluster" ]]; do
        kill -0 "$(head -1 "$dir/pids")" 2>/dev/null || { cat "$dir/head.log" >&2; false; }
        ((SECONDS < deadline)) || { cat "$dir/head.log" >&2; die "the head node did not start in ${TIMEOUT}s"; }
        sleep 0.5
    done

    "$PY" - start --address="127.0.0.1:$port" --node-ip-address=127.0.0.1 "${common[@]}" >"$dir/node.log" 2>&1 <<'EOF' &
import os
import sys

import ray._private.services as services

services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1: bind this node to loopback only
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # and every process it starts
from ray.scripts.scripts import cli

cli(sys.argv[1:])
EOF
    echo $! >>"$dir/pids"

    # Wait until the cluster reports two alive nodes.
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 timeout "$TIMEOUT" "$PY" - "127.0.0.1:$port" <<'EOF' || { cat "$dir/node.log" >&2; false; }
import logging
import sys
import time

import ray

ray.init(address=sys.argv[1], logging_level=logging.WARNING, log_to_driver=False)
while sum(node["Alive"] for node in ray.nodes()) < 2:
    time.sleep(0.5)
ray.shutdown()
EOF
    trap - ERR
    echo "export RAY_ADDRESS=127.0.0.1:$port"
    echo "export DOWNPOUR_RAY_ADDRESS=127.0.0.1:$port"
    echo "export DOWNPOUR_RAY_DIR=$dir"
    echo "export RAY_AUTH_MODE=token"
    echo "export RAY_AUTH_TOKEN_PATH=$dir/auth_token"
    echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    echo "ray_cluster.sh: 2 nodes at 127.0.0.1:$port (state in $dir)" >&2
}

stop() {
    local dir=${1:-${DOWNPOUR_RAY_DIR:-}}
    [[ -n "$dir" && -d "$dir" ]] || die "stop needs the directory that start printed (DOWNPOUR_RAY_DIR)"
    dir=$(cd "$dir" && pwd)
    [[ -f "$dir/pids" ]] || die "$dir holds no cluster started by this script (no pids file)"
    local pids
    pids=$(cluster_pids "$dir")
    if [[ -n "$pids" ]]; then
        kill -TERM $pids 2>/dev/null || true
        local deadline=$((SECONDS + 15))
        while ((SECONDS < deadline)) && [[ -n "$(cluster_pids "$dir")" ]]; do
            sleep 0.5
        done
        pids=$(cluster_pids "$dir")
        [[ -z "$pids" ]] || kill -KILL $pids 2>/dev/null || true
    fi
    rm -rf "$dir"
    echo "ray_cluster.sh: stopped the cluster in $dir" >&2
}

run() {
    if [[ ! -x "$RAY" ]]; then
        echo "ray_cluster.sh: no Ray at $RAY; running without a cluster" >&2
        exec "$@"
    fi
    local exports
    exports=$(start) || die "could not start the Ray cluster"
    eval "$exports"
    trap 'stop "$DOWNPOUR_RAY_DIR" || true' EXIT
    # CMD runs in the background so that a signal to this script is handled at once (bash defers traps while a
    # foreground command runs): it is passed on to CMD, and the EXIT trap stops the cluster.
    "$@" &
    local child=$! status=0
    trap 'kill -INT "$child" 2>/dev/null; wait "$child"; exit 130' INT
    trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 143' TERM
    wait "$child" || status=$?
    exit "$status"
}

case "${1:-}" in
start) start "${2:-}" ;;
stop) stop "${2:-}" ;;
run)
    shift
    (($#)) || die "usage: $0 run CMD [ARG...]"
    run "$@"
    ;;
*) die "usage: $0 start [DIR] | stop [DIR] | run CMD [ARG...]" ;;
esac

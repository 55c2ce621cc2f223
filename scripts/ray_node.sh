#!/usr/bin/env bash
# Start or stop ONE Ray node on this host, by its own process group. Never `ray stop`: that
# kills every Ray process on the machine, other people's sessions included.
#
#   scripts/ray_node.sh start DIR NAME [ray start args..]   `ray start --block` in a new session
#                                                           (setsid), Ray's temp dir DIR/ray; waits
#                                                           until the node is up
#   scripts/ray_node.sh stop DIR NAME                       SIGTERM its process group (the node
#                                                           stops its own processes), SIGKILL what
#                                                           is left after 45 s
#
# DIR/NAME.pgid and DIR/NAME.log hold the node's process group and its log. The node's workers
# import the package from this checkout (PYTHONPATH). Used by scripts/multinode.sh and by the start
# commands of cluster/local.yaml.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SPECROUTER_VENV:-$REPO/.venv}"
[[ $# -ge 3 ]] || { echo "usage: $0 start|stop DIR NAME [ray start args..]" >&2; exit 2; }
cmd=$1 dir=$2 name=$3
shift 3
pgfile="$dir/$name.pgid"

ours() {  # is process group $1 still a node of DIR? (guards against a recycled process id)
  pgrep -g "$1" -f "$dir/" >/dev/null
}

case "$cmd" in
  start)
    mkdir -p "$dir"
    if [[ -f $pgfile ]] && ours "$(cat "$pgfile")"; then
      echo "[ray_node] $name is already running (process group $(cat "$pgfile"))" >&2; exit 1
    fi
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_worker_niceness=0
    export RAY_enable_worker_prestart=0 RAY_prestart_worker_first_driver=0
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0  # SIGTERM stops the node at once
    setsid "$VENV/bin/ray" start --block --temp-dir="$dir/ray" --disable-usage-stats "$@" \
      >"$dir/$name.log" 2>&1 </dev/null &
    pg=$!
    echo "$pg" >"$pgfile"
    for _ in $(seq 240); do
      if grep -q "Ray runtime started" "$dir/$name.log"; then
        echo "[ray_node] $name up (process group $pg)" >&2; exit 0
      fi
      kill -0 "$pg" 2>/dev/null || break
      sleep 0.5
    done
    echo "[ray_node] $name failed to start:" >&2; tail -20 "$dir/$name.log" >&2
    kill -KILL -- "-$pg" 2>/dev/null || true
    exit 1
    ;;
  stop)
    [[ -f $pgfile ]] || exit 0
    pg=$(cat "$pgfile")
    if ours "$pg"; then
      kill -TERM -- "-$pg" 2>/dev/null || true
      for _ in $(seq 90); do pgrep -g "$pg" >/dev/null || break; sleep 0.5; done
      if pgrep -g "$pg" >/dev/null; then
        kill -KILL -- "-$pg" 2>/dev/null || true; echo "[ray_node] $name killed after 45 s" >&2
      fi
      echo "[ray_node] $name stopped (process group $pg)" >&2
    fi
    rm -f "$pgfile"
    ;;
  *) echo "usage: $0 start|stop DIR NAME [ray start args..]" >&2; exit 2 ;;
esac

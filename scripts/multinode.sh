#!/usr/bin/env bash
# Three Ray nodes on this one machine, standing in for a cluster with two accelerator types:
#   head   127.0.0.2  1 CPU                       (router actor, drivers)
#   small  127.0.0.3  1 CPU, resource accel_small  (drafters)
#   large  127.0.0.4  1 CPU, resource accel_large  (targets)
#
#   scripts/multinode.sh                 up, serve one generation with the drafter pinned to the
#                                        accel_small node and the target to accel_large
#                                        (scripts/cluster_check.py; default chain
#                                        smollm2-135m@int8,smollm2-135m), check, down
#   scripts/multinode.sh run CMD [ARG..]  up, run CMD with RAY_ADDRESS and SPECROUTER_NODE_IP set
#                                        (the head: attach a driver with ray.init(address=...,
#                                        _node_ip_address=...)), down; exits with CMD's status
#   scripts/multinode.sh check [ARG..]   up, scripts/cluster_check.py ARG.., down
#
# Each node is a `ray start --block` in its own process group (setsid), with its own temp dir and
# ports; teardown SIGTERMs exactly those process groups (a trap runs it on any exit), then kills
# whatever is left of them. It never runs `ray stop`, which would kill every Ray process on the
# machine. The nodes' workers import the package from this checkout (PYTHONPATH).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SPECROUTER_VENV:-$REPO/.venv}"
HEAD_IP=127.0.0.2 SMALL_IP=127.0.0.3 LARGE_IP=127.0.0.4

STATE="$(mktemp -d /tmp/srmn.XXXXXX)"  # short: Ray's socket paths live under it
PGIDS=()

log() { echo "[multinode] $*" >&2; }

teardown() {
  local status=$? i pg
  trap - EXIT INT TERM
  for ((i = ${#PGIDS[@]} - 1; i >= 0; i--)); do  # workers first, the head (GCS) last
    pg=${PGIDS[i]}
    kill -TERM -- "-$pg" 2>/dev/null || continue  # `ray start --block` stops its node on SIGTERM
    for _ in $(seq 90); do pgrep -g "$pg" >/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pg" 2>/dev/null && log "process group $pg killed after 45 s"
  done
  if [[ ${KEEP_LOGS:-0} == 1 ]]; then log "logs kept in $STATE"; else rm -rf "$STATE"; fi
  log "stopped ${#PGIDS[@]} nodes (process groups ${PGIDS[*]:-none})"
  exit "$status"
}
trap teardown EXIT INT TERM

free_ports() {  # N distinct free TCP ports
  "$VENV/bin/python" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_worker_niceness=0
export RAY_enable_worker_prestart=0 RAY_prestart_worker_first_driver=0
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0  # SIGTERM stops a node at once (nothing to drain here)
read -r GCS_PORT CLIENT_PORT AGENT_HEAD AGENT_SMALL AGENT_LARGE <<<"$(free_ports 5)"
COMMON=(--block --temp-dir="$STATE/ray" --num-cpus=1 --object-store-memory=$((100 << 20)) --disable-usage-stats)

start_node() {  # name ip agent-port ray-start-args...: start one node and wait until it is up
  local name=$1 ip=$2 agent=$3; shift 3
  setsid "$VENV/bin/ray" start "${COMMON[@]}" --node-ip-address="$ip" --dashboard-agent-listen-port="$agent" "$@" \
    >"$STATE/$name.log" 2>&1 </dev/null &
  PGIDS+=($!)
  for _ in $(seq 240); do
    grep -q "Ray runtime started" "$STATE/$name.log" && { log "$name up on $ip (pgid $!)"; return 0; }
    kill -0 $! 2>/dev/null || break
    sleep 0.5
  done
  log "$name failed to start:"; tail -20 "$STATE/$name.log" >&2; return 1
}

start_node head "$HEAD_IP" "$AGENT_HEAD" --head --port="$GCS_PORT" --ray-client-server-port="$CLIENT_PORT" \
  --include-dashboard=false
start_node small "$SMALL_IP" "$AGENT_SMALL" --address="$HEAD_IP:$GCS_PORT" --resources='{"accel_small": 1}'
start_node large "$LARGE_IP" "$AGENT_LARGE" --address="$HEAD_IP:$GCS_PORT" --resources='{"accel_large": 1}'
export RAY_ADDRESS="$HEAD_IP:$GCS_PORT" SPECROUTER_NODE_IP="$HEAD_IP"

cmd="${1:-check}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  run) "$@" ;;
  check) "$VENV/bin/python" "$REPO/scripts/cluster_check.py" --address "$RAY_ADDRESS" --node-ip "$HEAD_IP" --nodes 3 "$@" ;;
  *) log "usage: $0 [check [ARG..] | run CMD [ARG..]]"; exit 2 ;;
esac

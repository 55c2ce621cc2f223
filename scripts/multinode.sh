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
# Each node is started and stopped by scripts/ray_node.sh: a `ray start --block` in its own process
# group, with this run's temp dir and free ports; teardown (a trap: on any exit) stops the workers
# then the head by their process groups. Never `ray stop`, which kills every Ray process on the
# machine. The nodes' workers import the package from this checkout.
set -euo pipefail
case "${1:-check}" in run | check) ;; *) echo "usage: $0 [check [ARG..] | run CMD [ARG..]]" >&2; exit 2 ;; esac
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SPECROUTER_VENV:-$REPO/.venv}"
HEAD_IP=127.0.0.2 SMALL_IP=127.0.0.3 LARGE_IP=127.0.0.4
NODE="$REPO/scripts/ray_node.sh"

STATE="$(mktemp -d /tmp/srmn.XXXXXX)"  # short: Ray's socket paths live under it
STARTED=()

teardown() {
  local status=$? i groups=""
  trap - EXIT INT TERM
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do  # workers first, the head (GCS) last
    groups+=" $(cat "$STATE/${STARTED[i]}.pgid" 2>/dev/null)"
    bash "$NODE" stop "$STATE" "${STARTED[i]}" || status=1
  done
  if [[ ${KEEP_LOGS:-0} == 1 ]]; then echo "[multinode] logs kept in $STATE" >&2; else rm -rf "$STATE"; fi
  echo "[multinode] stopped ${#STARTED[@]} nodes (process groups${groups:- none})" >&2
  exit "$status"
}
trap teardown EXIT INT TERM

read -r GCS_PORT CLIENT_PORT AGENT_HEAD AGENT_SMALL AGENT_LARGE <<<"$("$VENV/bin/python" -c '
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks:
    s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')"
COMMON=(--num-cpus=1 --object-store-memory=$((100 << 20)))

start_node() {  # name ip agent-port [ray start args..]
  STARTED+=("$1")
  bash "$NODE" start "$STATE" "$1" "${COMMON[@]}" --node-ip-address="$2" --dashboard-agent-listen-port="$3" "${@:4}"
}
start_node head "$HEAD_IP" "$AGENT_HEAD" --head --port="$GCS_PORT" --ray-client-server-port="$CLIENT_PORT" \
  --include-dashboard=false
start_node small "$SMALL_IP" "$AGENT_SMALL" --address="$HEAD_IP:$GCS_PORT" --resources='{"accel_small": 1}'
start_node large "$LARGE_IP" "$AGENT_LARGE" --address="$HEAD_IP:$GCS_PORT" --resources='{"accel_large": 1}'
export RAY_ADDRESS="$HEAD_IP:$GCS_PORT" SPECROUTER_NODE_IP="$HEAD_IP" RAY_AUTH_MODE=disabled

cmd="${1:-check}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  run) "$@" ;;
  check) "$VENV/bin/python" "$REPO/scripts/cluster_check.py" --address "$RAY_ADDRESS" --node-ip "$HEAD_IP" --nodes 3 "$@" ;;
esac

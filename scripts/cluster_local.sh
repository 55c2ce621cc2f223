#!/usr/bin/env bash
# `ray up` on this one machine: Ray's local provider over SSH to loopback addresses
# (cluster/local.yaml: head 127.0.0.5 with accel_small, worker 127.0.0.6 with accel_large).
#
#   scripts/cluster_local.sh               up, check, down (down runs on any exit)
#   scripts/cluster_local.sh up            an sshd of our own on 127.0.0.5/127.0.0.6 (openssh-server
#                                          and rsync from apt if missing; root, key-only), then
#                                          `ray up cluster/local.yaml`; waits for the worker to join
#   scripts/cluster_local.sh check [ARG..]  serve one generation through the running cluster:
#                                          scripts/cluster_check.py, a driver attached to the head
#                                          (default chain smollm2-135m@int8,smollm2-135m: the drafter
#                                          on the head, the target on the worker)
#   scripts/cluster_local.sh down          `ray down`, stop our sshd, and verify: our nodes are gone
#                                          and a bystander Ray node (127.0.0.7, started by `up`, not
#                                          part of the cluster) survived; raylets of other sessions
#                                          that vanished meanwhile are reported
#
# Never `ray stop`: our sshd rewrites the literal `ray stop` that `ray down` sends into a stop of the
# node at the address SSH reached only (scripts/ray_node.sh, by process group). Needs root (sshd,
# apt-get, port 22 on the two loopback addresses; no system sshd is touched). State: /tmp/srcl;
# `ray up` also writes ~/ray_bootstrap_{config.yaml,key.pem} and /tmp/ray/cluster-specrouter-local.*.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${SPECROUTER_VENV:-$REPO/.venv}"
CFG="$REPO/cluster/local.yaml"
STATE=/tmp/srcl SSHD="/tmp/srcl/ssh"  # the key path is also in cluster/local.yaml
BYSTANDER=/tmp/srcl-bystander  # a Ray node outside the cluster: teardown must leave it running
HEAD=127.0.0.5 WORKER=127.0.0.6 GCS_PORT=36390
export RAY_UP_enable_autoscaler_v2=0 RAY_AUTH_MODE=disabled  # with autoscaler v2 the worker never starts

log() { echo "[cluster_local] $*" >&2; }
ssh_to() { ssh -i "$SSHD/id_ed25519" -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
  -o LogLevel=ERROR -o ConnectTimeout=10 "root@$1" "${@:2}"; }
raylets() { pgrep -x raylet | sort || true; }

start_sshd() {
  if [[ ! -x /usr/sbin/sshd ]] || ! command -v rsync >/dev/null; then
    log "installing openssh-server and rsync"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server rsync >/dev/null
  fi
  mkdir -p "$SSHD" /run/sshd
  [[ -f $SSHD/host_ed25519 ]] || ssh-keygen -q -t ed25519 -N "" -f "$SSHD/host_ed25519"
  [[ -f $SSHD/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N "" -f "$SSHD/id_ed25519"
  cp "$SSHD/id_ed25519.pub" "$SSHD/authorized_keys"
  # Every command that arrives runs through this: `ray stop` becomes "stop this address's node".
  cat >"$SSHD/command.sh" <<EOF
#!/bin/bash
ip=\$(echo "\$SSH_CONNECTION" | cut -d' ' -f3)
cmd=\${SSH_ORIGINAL_COMMAND:-}
[[ -n \$cmd ]] || exec bash --login
exec bash -c "\${cmd//ray stop/bash $REPO/scripts/ray_node.sh stop $STATE node-\$ip}"
EOF
  chmod +x "$SSHD/command.sh"
  cat >"$SSHD/sshd_config" <<EOF
ListenAddress $HEAD:22
ListenAddress $WORKER:22
HostKey $SSHD/host_ed25519
PidFile $SSHD/sshd.pid
AuthorizedKeysFile $SSHD/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
SetEnv SPECROUTER_HOME=$REPO
ForceCommand $SSHD/command.sh
EOF
  /usr/sbin/sshd -f "$SSHD/sshd_config" -E "$SSHD/sshd.log"
  for ip in $HEAD $WORKER; do ssh_to "$ip" true; done
  log "sshd up on $HEAD and $WORKER (pid $(cat "$SSHD/sshd.pid"))"
}

stop_sshd() {
  local pid
  pid=$(cat "$SSHD/sshd.pid" 2>/dev/null) || return 0
  if [[ $(ps -o args= -p "$pid" 2>/dev/null) == *"$SSHD/sshd_config"* ]]; then
    pkill -TERM -P "$pid" 2>/dev/null || true  # its open sessions
    kill -TERM "$pid"
    log "sshd stopped (pid $pid)"
  fi
  rm -f "$SSHD/sshd.pid"
}

up() {
  mkdir -p "$STATE"
  raylets >"$STATE/raylets.before"
  bash "$REPO/scripts/ray_node.sh" start "$BYSTANDER" bystander --head --node-ip-address=127.0.0.7 --port=36396 \
    --ray-client-server-port=36397 --dashboard-agent-listen-port=36398 --include-dashboard=false --num-cpus=0 \
    --object-store-memory=$((80 << 20))
  start_sshd
  "$VENV/bin/ray" up "$CFG" -y --no-config-cache
  log "head up; waiting for the autoscaler to start the worker over SSH"
  # One filesystem here: the worker's ray_node.sh log says when it has joined.
  for _ in $(seq 180); do
    grep -qs "Ray runtime started" "$STATE/node-$WORKER.log" && { log "worker joined"; return 0; }
    sleep 1
  done
  log "the worker did not join in 180 s; the head's autoscaler log:"
  tail -30 "$STATE"/ray/session_latest/logs/monitor.log >&2 || true
  return 1
}

check() {
  "$VENV/bin/python" "$REPO/scripts/cluster_check.py" --address "$HEAD:$GCS_PORT" --node-ip "$HEAD" --nodes 2 "$@"
}

down() {
  local failed=0 pid node
  if [[ -f $SSHD/sshd.pid ]]; then
    ssh_to "$WORKER" ray stop || failed=1  # the worker first (rewritten: stops this node only)
    "$VENV/bin/ray" down "$CFG" -y || failed=1  # its `ray stop` on the head is rewritten the same way
  fi
  for node in "node-$WORKER" "node-$HEAD"; do
    if [[ -f $STATE/$node.pgid ]]; then
      log "$node survived ray down; stopping it by its process group"; failed=1
      bash "$REPO/scripts/ray_node.sh" stop "$STATE" "$node"
    fi
  done
  stop_sshd
  rm -f ~/ray_bootstrap_config.yaml ~/ray_bootstrap_key.pem
  if [[ -f $BYSTANDER/bystander.pgid ]]; then
    if pgrep -g "$(cat "$BYSTANDER/bystander.pgid")" -x raylet >/dev/null; then
      log "the bystander Ray node (127.0.0.7, not in the cluster) survived the teardown"
    else
      log "the bystander Ray node was killed by the teardown"; failed=1
    fi
    bash "$REPO/scripts/ray_node.sh" stop "$BYSTANDER" bystander
    rm -rf "$BYSTANDER"
  fi
  if [[ -f $STATE/raylets.before ]]; then  # informative: other sessions also end by themselves
    for pid in $(cat "$STATE/raylets.before"); do
      kill -0 "$pid" 2>/dev/null || log "note: raylet $pid of another session ended meanwhile"
    done
    log "raylets before up: $(tr '\n' ' ' <"$STATE/raylets.before")| after down: $(raylets | tr '\n' ' ')"
  fi
  if [[ ${KEEP_LOGS:-0} == 1 ]]; then log "logs kept in $STATE"; else rm -rf "$STATE"; fi
  return "$failed"
}

cmd="${1:-all}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  up) up ;;
  check) check "$@" ;;
  down) down ;;
  all)
    trap 'status=$?; trap - EXIT; down || status=1; exit $status' EXIT
    up
    check "$@"
    ;;
  *) log "usage: $0 [all [ARG..] | up | check [ARG..] | down]"; exit 2 ;;
esac

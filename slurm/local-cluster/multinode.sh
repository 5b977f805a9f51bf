#!/usr/bin/env bash
# A real 2-node SLURM cluster on one machine: two network namespaces joined by a bridge.
#
# Usage:  slurm/local-cluster/multinode.sh start|stop|status
#         then: export SLURM_CONF=$SATFUSE_SLURM2_BASE/slurm.conf   (printed by start)
#
# Why: code that has only run on one node breaks on the first real allocation (MASTER_ADDR
# = localhost, ranks that only work on 127.0.0.1, one node missing a signal). Here each node
# is a network namespace with its own address and its own hostname, running its own slurmd;
# one slurmctld runs in the root namespace. Both nodes see the same filesystem (namespaces
# only isolate the network), so a run dir under /tmp is the cluster's "shared storage".
#
# start:  installs slurm + munge if missing (apt-get); creates namespaces sfnode1/sfnode2
#         (10.77.0.1, 10.77.0.2, interface eth1), bridge sfbr77 (10.77.0.254), /etc/hosts
#         lines tagged "# satfuse-multinode"; starts munged only if none answers, slurmctld,
#         and one slurmd per namespace (via nsenter + unshare -u: own hostname; `ip netns
#         exec` remounts /sys and breaks slurmd); waits until both nodes are idle; saves PIDs.
#         Safe to run twice: a healthy cluster is reused, a half-dead one is rebuilt.
# stop:   TERM (then KILL) exactly the saved PIDs and the processes left inside our two
#         namespaces (job steps our slurmds started); deletes the namespaces, the bridge and
#         the tagged /etc/hosts lines. munged is stopped only if start started it and no
#         other SLURM daemon still uses it. Safe to run twice.
# status: prints daemons, namespaces and `sinfo`; exit 0 only if both nodes are up.
#
# It never touches the single-node cluster of start.sh: its own base dir
# ($SATFUSE_SLURM2_BASE, default /tmp/satfuse-slurm2), its own ports (6837/6838, override
# with SATFUSE_SLURM2_CTLD_PORT / SATFUSE_SLURM2_SLURMD_PORT) and cluster name.
set -euo pipefail

BASE="${SATFUSE_SLURM2_BASE:-/tmp/satfuse-slurm2}"
CTLD_PORT="${SATFUSE_SLURM2_CTLD_PORT:-6837}"
SLURMD_PORT="${SATFUSE_SLURM2_SLURMD_PORT:-6838}"
WAIT_S="${SATFUSE_SLURM2_WAIT_S:-60}"
NET="10.77.0"
BRIDGE="sfbr77"
CTLD_IP="$NET.254"
NODES=(sfnode1 sfnode2)
TAG="# satfuse-multinode"
CONF="$BASE/slurm.conf"
PIDS="$BASE/run/pids"

log() { echo "multinode.sh: $*" >&2; }
die() { echo "multinode.sh: error: $*" >&2; exit 1; }
# shellcheck source=lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"


node_ip() { echo "$NET.${1#sfnode}"; }
sq() { SLURM_CONF="$CONF" "$@"; }

load_pids() {
  MUNGED_PID="" SLURMCTLD_PID="" SLURMD_sfnode1_PID="" SLURMD_sfnode2_PID=""
  # shellcheck disable=SC1090
  [ -f "$PIDS" ] && . "$PIDS"
  return 0
}

save_pid() {  # save_pid VAR VALUE (appends; the file is sourced by stop/status)
  echo "$1=$2" >> "$PIDS"
}

slurmd_pid_of() { local v="SLURMD_${1}_PID"; echo "${!v:-}"; }

healthy() {  # every saved daemon alive, namespaces present, munge answering
  load_pids
  alive "$SLURMCTLD_PID" slurmctld || return 1
  local n
  for n in "${NODES[@]}"; do
    alive "$(slurmd_pid_of "$n")" slurmd || return 1
    [ -e "/run/netns/$n" ] || return 1
  done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

# ---- network --------------------------------------------------------------------------------

setup_network() {
  command -v ip >/dev/null || die "'ip' (iproute2) is missing: apt-get install -y iproute2"
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge \
    || die "cannot create bridge $BRIDGE (needs root and CAP_NET_ADMIN)"
  ip addr show dev "$BRIDGE" | grep -q "inet $CTLD_IP/" || ip addr add "$CTLD_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local n i peer
  for n in "${NODES[@]}"; do
    i="${n#sfnode}"
    peer="sfv${i}p"
    [ -e "/run/netns/$n" ] || ip netns add "$n" || die "cannot create network namespace $n"
    if ! ip -n "$n" link show eth1 >/dev/null 2>&1; then
      ip link del "$peer" >/dev/null 2>&1 || true
      ip link add "sfv$i" type veth peer name "$peer" || die "cannot create veth pair sfv$i/$peer"
      ip link set "sfv$i" netns "$n"
      ip -n "$n" link set "sfv$i" name eth1
    fi
    ip link set "$peer" master "$BRIDGE"
    ip link set "$peer" up
    ip -n "$n" link set lo up
    ip -n "$n" addr show dev eth1 | grep -q "inet $(node_ip "$n")/" \
      || ip -n "$n" addr add "$(node_ip "$n")/24" dev eth1
    ip -n "$n" link set eth1 up
  done
}

teardown_network() {
  local n i
  for n in "${NODES[@]}"; do
    [ -e "/run/netns/$n" ] && { ip netns del "$n" || log "warning: could not delete namespace $n"; }
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && { ip link del "$BRIDGE" || log "warning: could not delete bridge $BRIDGE"; }
  for n in "${NODES[@]}"; do  # a veth end may linger briefly after its namespace went
    i="${n#sfnode}"
    for _ in $(seq 20); do ip link show "sfv${i}p" >/dev/null 2>&1 || break; ip link del "sfv${i}p" >/dev/null 2>&1 || sleep 0.1; done
  done
}

# /etc/hosts may be a bind mount (no rename onto it): rewrite it in place from a full copy.
hosts_add() {
  local tmp n
  hosts_remove
  tmp="$(mktemp)"
  cat /etc/hosts > "$tmp"
  [ -s "$tmp" ] && [ -n "$(tail -c1 "$tmp")" ] && echo >> "$tmp"  # last line had no newline
  for n in "${NODES[@]}"; do echo "$(node_ip "$n") $n $TAG" >> "$tmp"; done
  cat "$tmp" > /etc/hosts
  rm -f "$tmp"
}

hosts_remove() {
  local tmp
  grep -qF "$TAG" /etc/hosts 2>/dev/null || return 0
  tmp="$(mktemp)"
  grep -vF "$TAG" /etc/hosts > "$tmp" || true
  cat "$tmp" > /etc/hosts
  rm -f "$tmp"
}

# ---- slurm ----------------------------------------------------------------------------------

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
     && command -v sinfo >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munge missing and no apt-get: install Slurm (>= 22.05) and munge by hand"
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || die "apt-get update failed (no network to the Debian mirror?)"
  apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends \
    slurmctld slurmd slurm-client munge >&2 \
    || die "apt-get install of slurmctld slurmd slurm-client munge failed; see the output above"
}

write_conf() {
  local host n tmp
  host="$(hostname -s)"
  rm -rf "$BASE/state" "$BASE/spool"
  mkdir -p "$BASE/state" "$BASE/run" "$BASE/log"
  for n in "${NODES[@]}"; do mkdir -p "$BASE/spool/$n"; done
  tmp="$CONF.tmp.$$"
  {
    echo "# written by slurm/local-cluster/multinode.sh: 2 nodes in network namespaces, state under $BASE"
    cat <<EOF
ClusterName=satfuse2node
SlurmctldHost=$host($CTLD_IP)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MailProg=/bin/true
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=5
InactiveLimit=0
SlurmdTimeout=20
EOF
    for n in "${NODES[@]}"; do
      echo "NodeName=$n NodeAddr=$(node_ip "$n") CPUs=1 RealMemory=1000 State=UNKNOWN"
    done
    echo "PartitionName=p Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } > "$tmp"
  mv "$tmp" "$CONF"
}

start_munged() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already answers; using it"
    save_pid MUNGED_PID ""
    return 0
  fi
  [ -f /etc/munge/munge.key ] || {
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge: /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
  }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge: /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  rm -f /run/munge/munged.pid
  runuser -u munge -- munged </dev/null >"$BASE/log/munged.out" 2>&1 \
    || die "munged failed to start; see $BASE/log/munged.out and /var/log/munge/munged.log"
  local pid=""
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  pid="$(cat /run/munge/munged.pid 2>/dev/null || true)"
  alive "$pid" munged || die "munged did not stay up; see /var/log/munge/munged.log"
  save_pid MUNGED_PID "$pid"
}

start_slurmctld() {
  local pid=""
  rm -f "$BASE/run/slurmctld.pid"
  slurmctld -f "$CONF" </dev/null >"$BASE/log/slurmctld.out" 2>&1 \
    || die "slurmctld failed to start; see $BASE/log/slurmctld.out and $BASE/log/slurmctld.log"
  for _ in $(seq 100); do [ -s "$BASE/run/slurmctld.pid" ] && break; sleep 0.1; done
  pid="$(cat "$BASE/run/slurmctld.pid" 2>/dev/null || true)"
  alive "$pid" slurmctld || die "slurmctld exited right after start; see $BASE/log/slurmctld.log"
  save_pid SLURMCTLD_PID "$pid"
}

start_slurmd() {  # start_slurmd NODE: a slurmd inside the node's namespace, with its hostname
  local n="$1" pid=""
  rm -f "$BASE/run/slurmd-$n.pid"
  # exec chain (nsenter -> unshare -> sh -> slurmd) keeps one PID; setsid detaches it from
  # the caller's session so a test runner's process-group kill does not take the node down.
  setsid nsenter --net="/run/netns/$n" unshare -u \
    sh -c "hostname $n && exec slurmd -D -f '$CONF'" \
    </dev/null >"$BASE/log/slurmd-$n.out" 2>&1 &
  pid=$!
  for _ in $(seq 50); do alive "$pid" slurmd && break; sleep 0.1; done
  alive "$pid" slurmd || die "slurmd for $n did not start; see $BASE/log/slurmd-$n.out and $BASE/log/slurmd-$n.log"
  save_pid "SLURMD_${n}_PID" "$pid"
}

node_states() {  # "NODE STATE" lines, state flags (*~#!%$@^-) stripped
  sq sinfo -h -N -o "%N %T" 2>/dev/null | awk '{gsub(/[*~#!%$@^-]+$/, "", $2); print $1, $2}' || true
}

wait_idle() {
  local i states idle n
  for ((i = 0; i < WAIT_S * 2; i++)); do
    states="$(node_states)"
    idle=0
    for n in "${NODES[@]}"; do
      case "$(awk -v n="$n" '$1 == n {print $2}' <<<"$states")" in
        idle) idle=$((idle + 1)) ;;
        down|drained|draining|drain) sq scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true ;;
      esac
    done
    [ "$idle" = "${#NODES[@]}" ] && return 0
    sleep 0.5
  done
  die "nodes not idle after ${WAIT_S}s (sinfo: $(echo "$states" | tr '\n' ' ')); see $BASE/log/slurmctld.log and $BASE/log/slurmd-*.log"
}

# ---- stop -----------------------------------------------------------------------------------


stop_namespace_procs() {  # job steps (slurmstepd, tasks) our slurmds left in our namespaces
  local n pids
  for n in "${NODES[@]}"; do
    [ -e "/run/netns/$n" ] || continue
    pids="$(ip netns pids "$n" 2>/dev/null | tr '\n' ' ')"
    [ -n "${pids// /}" ] || continue
    log "stopping processes left in namespace $n: $pids"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 30); do [ -z "$(ip netns pids "$n" 2>/dev/null)" ] && break; sleep 0.1; done
    pids="$(ip netns pids "$n" 2>/dev/null | tr '\n' ' ')"
    # shellcheck disable=SC2086
    [ -n "${pids// /}" ] && kill -KILL $pids 2>/dev/null || true
  done
}

other_slurm_daemons() {  # SLURM daemons that are not ours still need munged
  local p ours=" $SLURMCTLD_PID $SLURMD_sfnode1_PID $SLURMD_sfnode2_PID "
  for p in /proc/[0-9]*; do
    case "$(cat "$p/comm" 2>/dev/null)" in
      slurmctld|slurmd|slurmdbd) [[ "$ours" == *" ${p#/proc/} "* ]] || return 0 ;;
    esac
  done
  return 1
}

do_stop() {
  load_pids
  local n
  for n in "${NODES[@]}"; do stop_pid "$(slurmd_pid_of "$n")" slurmd; done
  stop_namespace_procs
  stop_pid "$SLURMCTLD_PID" slurmctld
  if [ -n "$MUNGED_PID" ]; then
    if other_slurm_daemons; then
      log "leaving munged ($MUNGED_PID) running: another SLURM daemon on this machine uses it"
    else
      stop_pid "$MUNGED_PID" munged
    fi
  fi
  teardown_network
  hosts_remove
  rm -f "$PIDS"
  rm -rf "$BASE/state" "$BASE/spool"
  log "2-node cluster stopped (logs kept in $BASE/log)"
}

# ---- start / status -------------------------------------------------------------------------

do_start() {
  [ "$(id -u)" = "0" ] || die "must run as root (network namespaces, /etc/hosts, daemons); run with sudo"
  if healthy; then
    log "2-node cluster already running; reusing it"
    wait_idle
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  if [ -f "$PIDS" ] || [ -e "/run/netns/${NODES[0]}" ] || ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "a previous 2-node cluster is partly there; cleaning it up first"
    do_stop
  fi
  command -v nsenter >/dev/null && command -v unshare >/dev/null && command -v setsid >/dev/null \
    || die "nsenter/unshare/setsid missing: apt-get install -y util-linux"
  install_packages
  mkdir -p "$BASE/run" "$BASE/log"
  setup_network
  hosts_add
  write_conf
  : > "$PIDS"
  start_munged
  start_slurmctld
  local n
  for n in "${NODES[@]}"; do start_slurmd "$n"; done
  wait_idle
  log "2-node cluster up: partition 'p', nodes ${NODES[*]} idle (controller $CTLD_IP:$CTLD_PORT)"
  echo "export SLURM_CONF=$CONF"
}

do_status() {
  load_pids
  local ok=0 n
  alive "$SLURMCTLD_PID" slurmctld && echo "slurmctld: running ($SLURMCTLD_PID)" || { echo "slurmctld: not running"; ok=1; }
  for n in "${NODES[@]}"; do
    if alive "$(slurmd_pid_of "$n")" slurmd; then echo "slurmd $n: running ($(slurmd_pid_of "$n"))"; else echo "slurmd $n: not running"; ok=1; fi
    [ -e "/run/netns/$n" ] && echo "namespace $n: present ($(node_ip "$n"))" || { echo "namespace $n: absent"; ok=1; }
  done
  ip link show "$BRIDGE" >/dev/null 2>&1 && echo "bridge $BRIDGE: present" || { echo "bridge $BRIDGE: absent"; ok=1; }
  echo "hosts lines: $(grep -cF "$TAG" /etc/hosts || true)"
  if [ "$ok" = 0 ]; then
    node_states | sed 's/^/node /'
    [ "$(node_states | awk '$2 ~ /^(idle|mixed|allocated|completing)$/' | wc -l)" = "${#NODES[@]}" ] || ok=1
    echo "export SLURM_CONF=$CONF"
  fi
  return "$ok"
}

case "${1:-}" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  -h|--help|"") sed -n '2,29p' "$0"; [ -n "${1:-}" ] ;;
  *) die "unknown command '$1'; usage: multinode.sh start|stop|status" ;;
esac

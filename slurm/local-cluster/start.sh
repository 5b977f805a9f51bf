#!/usr/bin/env bash
# Start a real single-node SLURM cluster inside this container (no systemd), for tests and CI.
#
# Usage:  slurm/local-cluster/start.sh [--nodes 1|2]
#         then: export SLURM_CONF=$SATFUSE_SLURM_BASE/slurm.conf   (printed at the end)
#
# Why a real cluster: submitit's sbatch scripts, job arrays, dependencies and requeue on
# preemption only prove themselves against slurmctld/slurmd; mocks of SLURM have hidden
# every bug that mattered (signals, requeue delay, exit codes).
#
# What it does: installs Debian's slurm-wlm pieces and munge if missing (apt-get), starts
# munged (unless one already answers), slurmctld and slurmd as background daemons with all
# state under $SATFUSE_SLURM_BASE (default /tmp/satfuse-slurm), saves their PIDs, and waits
# until `sinfo` shows the node idle. Safe to run twice: a cluster it started and that still
# answers is reused. `stop.sh` stops exactly the processes saved here.
#
# --nodes 2 delegates to slurm/local-cluster/multinode.sh start (two nodes in network
# namespaces); stop.sh then delegates to `multinode.sh stop`.
#
# Ports default to 6827/6828 (not SLURM's 6817/6818) so this cluster does not collide with
# another slurmctld on the machine; override with SATFUSE_SLURMCTLD_PORT/SATFUSE_SLURMD_PORT.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
BASE="${SATFUSE_SLURM_BASE:-/tmp/satfuse-slurm}"
CTLD_PORT="${SATFUSE_SLURMCTLD_PORT:-6827}"
SLURMD_PORT="${SATFUSE_SLURMD_PORT:-6828}"
WAIT_S="${SATFUSE_SLURM_WAIT_S:-60}"
NODES=1

die() { echo "start.sh: error: $*" >&2; exit 1; }
log() { echo "start.sh: $*" >&2; }
# shellcheck source=lib.sh
. "$HERE/lib.sh"

while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="${2:-}"; shift 2 || die "--nodes needs a value (1 or 2)" ;;
    --nodes=*) NODES="${1#--nodes=}"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) die "unknown argument '$1'; usage: start.sh [--nodes 1|2]" ;;
  esac
done

if [ "$NODES" = "2" ]; then
  [ -x "$HERE/multinode.sh" ] || [ -f "$HERE/multinode.sh" ] \
    || die "$HERE/multinode.sh not found: the 2-node mode lives there; use --nodes 1"
  mkdir -p "$BASE"
  bash "$HERE/multinode.sh" start
  echo multinode > "$BASE/mode"
  exit 0
fi
[ "$NODES" = "1" ] || die "--nodes must be 1 or 2, got '$NODES'"

[ "$(id -u)" = "0" ] || die "must run as root (it installs packages and starts munged/slurmd); run with sudo"

CONF="$BASE/slurm.conf"
PIDS="$BASE/run/pids"


node_state() { SLURM_CONF="$CONF" sinfo -h -o %T 2>/dev/null | head -1 | tr -d '*~#!%' || true; }

wait_idle() {
  local i state=""
  for ((i = 0; i < WAIT_S * 2; i++)); do
    state="$(node_state)"
    [ "$state" = "idle" ] && return 0
    # a node left DOWN/DRAIN by an earlier run of the same state dir: bring it back
    if [ "$state" = "down" ] || [ "$state" = "drained" ] || [ "$state" = "draining" ]; then
      SLURM_CONF="$CONF" scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
    fi
    sleep 0.5
  done
  die "node not idle after ${WAIT_S}s (state '${state:-no answer}'); see $BASE/log/slurmctld.log and $BASE/log/slurmd.log"
}

print_usage() {
  log "cluster up: partition 'debug', node $(hostname -s) idle"
  echo "export SLURM_CONF=$CONF"
}

# ---- already running (started by us)? reuse it ---------------------------------------------
if [ -f "$PIDS" ]; then
  # shellcheck disable=SC1090
  . "$PIDS"
  HOST="$(hostname -s)"
  if alive "${SLURMCTLD_PID:-}" slurmctld && alive "${SLURMD_PID:-}" slurmd; then
    log "cluster already running (slurmctld $SLURMCTLD_PID, slurmd $SLURMD_PID); reusing it"
    wait_idle
    print_usage
    exit 0
  fi
  log "a previous cluster under $BASE is partly dead; stopping what is left and starting afresh"
  bash "$HERE/stop.sh" >&2 || true
fi

# ---- install --------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sinfo >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munge missing and no apt-get: install Slurm (>= 22.05) and munge by hand"
  log "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || die "apt-get update failed (no network to the Debian mirror?)"
  apt-get install -y -qq -o DPkg::Lock::Timeout=300 --no-install-recommends slurmctld slurmd slurm-client munge >&2 \
    || die "apt-get install of slurmctld slurmd slurm-client munge failed; see the output above"
fi
[ -f /etc/munge/munge.key ] || {
  log "creating /etc/munge/munge.key"
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge: /etc/munge/munge.key 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
}

# ---- config ---------------------------------------------------------------------------------
HOST="$(hostname -s)"
# nproc honours OMP_NUM_THREADS (the test suite sets it to 1): ask for the real count
NCPU="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"
MEM_MB="$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')"
rm -rf "$BASE/state" "$BASE/spool"
mkdir -p "$BASE/state" "$BASE/spool" "$BASE/run" "$BASE/log"
cat > "$CONF.tmp" <<EOF
# written by slurm/local-cluster/start.sh: a single-node test cluster, state under $BASE
ClusterName=satfuselocal
SlurmctldHost=$HOST
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
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=5
InactiveLimit=0
NodeName=$HOST CPUs=$NCPU RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
mv "$CONF.tmp" "$CONF"

# ---- munged ---------------------------------------------------------------------------------
MUNGED_PID=""
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged already answers; using it (stop.sh will leave it running)"
else
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge: /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  rm -f /run/munge/munged.pid
  runuser -u munge -- munged </dev/null >"$BASE/log/munged.out" 2>&1 \
    || die "munged failed to start; see $BASE/log/munged.out and /var/log/munge/munged.log"
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  MUNGED_PID="$(cat /run/munge/munged.pid 2>/dev/null || true)"
  alive "$MUNGED_PID" munged || die "munged did not stay up; see /var/log/munge/munged.log"
fi
echo "MUNGED_PID=$MUNGED_PID" > "$PIDS.tmp" && mv "$PIDS.tmp" "$PIDS"

# ---- slurmctld, slurmd ----------------------------------------------------------------------
start_daemon() {  # start_daemon NAME PIDFILE: daemonizing start, then read its pid file
  local name="$1" pidfile="$2" pid=""
  rm -f "$pidfile"
  "$name" -f "$CONF" </dev/null >"$BASE/log/$name.out" 2>&1 \
    || die "$name failed to start; see $BASE/log/$name.out and $BASE/log/$name.log"
  for _ in $(seq 100); do [ -s "$pidfile" ] && break; sleep 0.1; done
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  alive "$pid" "$name" || die "$name exited right after start; see $BASE/log/$name.log"
  echo "${name^^}_PID=$pid" >> "$PIDS"
}
start_daemon slurmctld "$BASE/run/slurmctld.pid"
start_daemon slurmd "$BASE/run/slurmd.pid"
echo single > "$BASE/mode"
wait_idle
print_usage

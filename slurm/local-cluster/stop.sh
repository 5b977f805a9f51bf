#!/usr/bin/env bash
# Stop the local SLURM cluster started by start.sh: exactly the PIDs it saved, nothing else.
#
# Usage:  slurm/local-cluster/stop.sh [--nodes 1|2]
#
# Each saved daemon (slurmd, slurmctld, and munged only if start.sh started it and no other
# SLURM daemon still uses it) gets TERM,
# then KILL if it is still there after 5 s. A PID is only signalled while it still runs the
# program it was saved for (a recycled PID is left alone). If the 2-node mode was started
# (or --nodes 2 is given) this delegates to `multinode.sh stop`. Safe to run twice.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
BASE="${SATFUSE_SLURM_BASE:-/tmp/satfuse-slurm}"
PIDS="$BASE/run/pids"
NODES=""

log() { echo "stop.sh: $*" >&2; }
# shellcheck source=lib.sh
. "$HERE/lib.sh"

while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="${2:-}"; shift 2 || { log "--nodes needs a value"; exit 1; } ;;
    --nodes=*) NODES="${1#--nodes=}"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) log "unknown argument '$1'; usage: stop.sh [--nodes 1|2]"; exit 1 ;;
  esac
done

MODE="$(cat "$BASE/mode" 2>/dev/null || true)"
if [ "$NODES" = "2" ] || [ "$MODE" = "multinode" ]; then
  if [ -f "$HERE/multinode.sh" ]; then
    bash "$HERE/multinode.sh" stop
  else
    log "$HERE/multinode.sh not found; nothing to stop for the 2-node mode"
  fi
  [ "$MODE" = "multinode" ] && rm -f "$BASE/mode"
  [ "$NODES" = "2" ] && exit 0
fi

if [ ! -f "$PIDS" ]; then
  log "no cluster started from $BASE (no $PIDS); nothing to stop"
  exit 0
fi

MUNGED_PID="" SLURMCTLD_PID="" SLURMD_PID=""
# shellcheck disable=SC1090
. "$PIDS"



# slurmd first (it owns job steps), then the controller, then munged they both talk to.
stop_pid "$SLURMD_PID" slurmd
stop_pid "$SLURMCTLD_PID" slurmctld
others_use_munge() {  # another SLURM daemon (e.g. the 2-node cluster) still needs munged
  local comm
  for comm in /proc/[0-9]*/comm; do
    case "$(cat "$comm" 2>/dev/null)" in slurmctld|slurmd|slurmstepd) return 0 ;; esac
  done
  return 1
}
if [ -n "$MUNGED_PID" ] && others_use_munge; then
  log "leaving munged ($MUNGED_PID) running: other SLURM daemons still use it"
else
  stop_pid "$MUNGED_PID" munged
fi
rm -f "$PIDS"
[ "$MODE" = "single" ] && rm -f "$BASE/mode"
log "cluster under $BASE stopped"

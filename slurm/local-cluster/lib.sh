# Shared by start.sh, stop.sh and multinode.sh (sourced; the caller defines `log`).
# Daemons are stopped by saved PID only, and only while that PID still runs the program we
# started (a recycled PID belonging to something else is left alone).

alive() {  # alive PID NAME: PID runs a program whose command name is NAME
  local pid="$1" name="$2"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

stop_pid() {  # stop_pid PID NAME: TERM, then KILL after 5 s
  local pid="$1" name="$2"
  alive "$pid" "$name" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do alive "$pid" "$name" || { log "stopped $name ($pid)"; return 0; }; sleep 0.1; done
  log "$name ($pid) ignored TERM for 5 s; sending KILL"
  kill -KILL "$pid" 2>/dev/null || true
  for _ in $(seq 20); do alive "$pid" "$name" || return 0; sleep 0.1; done
  log "warning: $name ($pid) still alive after KILL"
}

# shellcheck shell=bash
# Sourced by the other scripts: paths and small helpers. Runtime state lives in $BLAMETRAIL_RUN_DIR.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${BLAMETRAIL_RUN_DIR:-$REPO_DIR/.run}"
CACHE_DIR="${BLAMETRAIL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/blametrail}"
mkdir -p "$RUN_DIR" "$CACHE_DIR"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# free_port [preferred]: the preferred port if nothing listens there, else one the kernel picks.
free_port() {
  python3 - "${1:-0}" <<'PY'
import socket, sys
want = int(sys.argv[1])
for port in ([want] if want else []) + [0]:
    s = socket.socket()
    # Like the servers themselves: a port whose old connections linger in TIME_WAIT is free.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        print(s.getsockname()[1])
        break
    except OSError:
        pass
    finally:
        s.close()
PY
}

# pick_port WHAT [previous]: the previous port of WHAT while it is free (kept across stop/start, so
# clients reconnect); when another process holds it, a new one, and says so on stderr.
pick_port() {
  local what=$1 previous=${2:-} port
  port=$(free_port "$previous")
  if [[ -n "$previous" && "$port" != "$previous" ]]; then
    log "$what port $previous is taken by another process: using $port instead"
  fi
  echo "$port"
}

# write_private FILE COMMAND...: COMMAND's output into FILE, readable by its owner only (secrets).
write_private() {
  local file=$1; shift
  (umask 077 && : > "$file" && chmod 600 "$file" && "$@" > "$file")
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds or the deadline passes.
wait_for() {
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# stop_pid PID SECONDS WHAT: SIGTERM, wait up to SECONDS for the exit, then SIGKILL. Fails (status 1)
# only when it had to kill.
stop_pid() {
  local pid=$1 seconds=$2 what=$3
  pid_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  wait_for "$seconds" "$what exit" bash -c "source '$REPO_DIR/scripts/common.sh'; ! pid_alive $pid" && return 0
  log "$what did not stop in $seconds s: killing it"
  kill -9 "$pid" 2>/dev/null || true
  return 1
}

# pid_alive PID: the process exists and is not a zombie waiting to be reaped.
pid_alive() {
  [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
  local state
  state=$(sed -E 's/.*\) ([A-Z]).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 0
  [[ "$state" != "Z" && "$state" != "X" ]]
}

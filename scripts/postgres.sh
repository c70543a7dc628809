#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on a loopback port: install (apt-get) if missing, initdb, start, stop.
#   scripts/postgres.sh start   -> writes $RUN_DIR/postgres.env (BLAMETRAIL_DATABASE_URL=...)
#   scripts/postgres.sh stop | status
# Safe to run twice, after a crash (stale postmaster.pid) and when 5432 is busy (picks a free port).
# stop keeps the data and postgres.env: the next start comes back on the same port while it is free.
source "$(dirname "$0")/common.sh"

DB_NAME="${BLAMETRAIL_PG_DATABASE:-blametrail}"
DB_USER=blametrail
ENV_FILE="$RUN_DIR/postgres.env"
PG_DIR="${BLAMETRAIL_PG_DIR:-$RUN_DIR/postgres}"

as_pg_user() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [[ -n "$dir" && -x "$dir/initdb" ]] && echo "$dir"
}

ensure_installed() {
  pg_bindir >/dev/null && return 0
  log "PostgreSQL is not installed: installing it with apt-get"
  local sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q postgresql postgresql-client
  pg_bindir >/dev/null || die "PostgreSQL binaries not found after apt-get install"
}

ensure_data_dir() {
  if [[ $(id -u) -eq 0 ]]; then
    # The server refuses to run as root; it runs as the postgres user, who must reach the folder.
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    mkdir -p "$PG_DIR"
    if ! runuser -u postgres -- test -x "$PG_DIR"; then
      PG_DIR="/tmp/blametrail-pg-$(printf '%s' "$RUN_DIR" | md5sum | cut -c1-10)"
      mkdir -p "$PG_DIR"
    fi
    chown postgres: "$PG_DIR"
  else
    mkdir -p "$PG_DIR"
  fi
  chmod 700 "$PG_DIR"
}

data_pid() { [[ -f "$PG_DIR/data/postmaster.pid" ]] && head -n 1 "$PG_DIR/data/postmaster.pid" || true; }

is_running() {
  local pid; pid=$(data_pid)
  pid_alive "$pid" && [[ -f "$ENV_FILE" ]] && "$BIN/pg_isready" -q -h 127.0.0.1 -p "$(port_from_env)"
}

port_from_env() { sed -n 's/^PGPORT=//p' "$ENV_FILE" 2>/dev/null || true; }

start() {
  ensure_installed
  BIN=$(pg_bindir)
  ensure_data_dir
  if is_running; then
    log "already running on port $(port_from_env)"
    cat "$ENV_FILE"; return 0
  fi
  local pid; pid=$(data_pid)
  if [[ -n "$pid" ]] && ! pid_alive "$pid"; then
    log "removing stale postmaster.pid of a crashed run (pid $pid)"
    rm -f "$PG_DIR/data/postmaster.pid"
  elif [[ -n "$pid" ]]; then
    log "stopping a server of an earlier run (pid $pid) whose settings were lost"
    as_pg_user "$BIN/pg_ctl" -D "$PG_DIR/data" stop -m fast -w >/dev/null || kill -9 "$pid" || true
  fi
  if [[ ! -f "$PG_DIR/data/PG_VERSION" ]]; then
    rm -rf "$PG_DIR/data"
    as_pg_user "$BIN/initdb" -D "$PG_DIR/data" -U "$DB_USER" --auth=trust --encoding=UTF8 --no-sync >/dev/null
  fi
  local port; port=$(pick_port PostgreSQL "${BLAMETRAIL_PG_PORT:-$(port_from_env)}")
  as_pg_user "$BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 start \
    -o "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=${BLAMETRAIL_PG_FSYNC:-on} -c max_connections=200" \
    >/dev/null || { tail -n 20 "$PG_DIR/server.log" >&2; die "PostgreSQL did not start"; }
  wait_for 30 "postgres" "$BIN/pg_isready" -q -h 127.0.0.1 -p "$port" || die "PostgreSQL not ready on $port"
  if ! "$BIN/psql" -h 127.0.0.1 -p "$port" -U "$DB_USER" -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'" | grep -q 1; then
    "$BIN/createdb" -h 127.0.0.1 -p "$port" -U "$DB_USER" "$DB_NAME"
  fi
  cat > "$ENV_FILE" <<ENV
PGPORT=$port
PGDATA=$PG_DIR/data
BLAMETRAIL_DATABASE_URL=postgresql+psycopg://$DB_USER@127.0.0.1:$port/$DB_NAME
ENV
  log "PostgreSQL $(basename "$(dirname "$BIN")") listening on 127.0.0.1:$port (data in $PG_DIR)"
  cat "$ENV_FILE"
}

stop() {
  BIN=$(pg_bindir) || { log "not installed"; return 0; }
  ensure_data_dir
  local pid; pid=$(data_pid)
  if pid_alive "$pid"; then
    as_pg_user "$BIN/pg_ctl" -D "$PG_DIR/data" stop -m fast -w -t 60 >/dev/null
    log "stopped"
  else
    log "not running"
  fi
}

status() {
  BIN=$(pg_bindir) || { echo "not installed"; return 1; }
  ensure_data_dir
  if is_running; then echo "running on port $(port_from_env)"; else echo "stopped"; return 1; fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Stops what scripts/up.sh started. --services-only leaves Kafka, Postgres and Prometheus running.
source "$(dirname "$0")/common.sh"

for service in ingest router writer admin; do
  pid_file="$RUN_DIR/$service.pid"
  pid=$(cat "$pid_file" 2>/dev/null || true)
  if pid_alive "$pid"; then
    stop_pid "$pid" 30 "$service" || true
    log "stopped $service"
  fi
  rm -f "$pid_file"
done
if [[ "${1:-}" != "--services-only" ]]; then
  "$REPO_DIR/scripts/prometheus.sh" stop
  "$REPO_DIR/scripts/kafka.sh" stop
  "$REPO_DIR/scripts/postgres.sh" stop
fi

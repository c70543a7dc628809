#!/usr/bin/env bash
# The one test command: lint, type-check, and every test against a real Kafka broker and a real
# PostgreSQL that this script starts (in .run/test, on free loopback ports) and stops again.
#   scripts/test.sh [pytest args...]
source "$(dirname "$0")/common.sh"

BIN=$("$REPO_DIR/scripts/bootstrap.sh")
export PATH="$BIN:$PATH"
export BLAMETRAIL_RUN_DIR="$RUN_DIR/test"
export BLAMETRAIL_PG_DATABASE=blametrail_test
mkdir -p "$BLAMETRAIL_RUN_DIR"

cd "$REPO_DIR"
log "ruff"
ruff check .
ruff format --check .
log "mypy"
mypy

# Debian packages the tests drive: Chromium for the browser tests (Playwright without its own
# browser download), docker-compose to check docker-compose.yml with the real parser (`config -q`),
# prometheus for promtool (the alert rules' checks and unit tests) and the dashboard test, wrk for the
# benchmark harness's smoke test.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v wrk >/dev/null 2>&1 || need+=(wrk)  # the benchmark harness's smoke test
if (( ${#need[@]} )); then
  log "installing ${need[*]} for the tests (apt-get)"
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}" >&2 || die "could not install ${need[*]}"
fi

cleanup() {
  "$REPO_DIR/scripts/kafka.sh" stop || true
  "$REPO_DIR/scripts/postgres.sh" stop || true
}
trap cleanup EXIT
"$REPO_DIR/scripts/postgres.sh" start >/dev/null
"$REPO_DIR/scripts/kafka.sh" start >/dev/null
set -a
source "$BLAMETRAIL_RUN_DIR/postgres.env"
source "$BLAMETRAIL_RUN_DIR/kafka.env"
set +a

log "pytest"
python -m pytest "$@"

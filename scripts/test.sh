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

# The browser tests drive Debian's Chromium (Playwright without its own browser download).
if ! command -v chromium >/dev/null 2>&1; then
  log "installing Chromium for the browser tests (apt-get)"
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium >&2 || die "could not install chromium"
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

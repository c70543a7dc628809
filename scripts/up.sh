#!/usr/bin/env bash
# The whole local stack, without Docker: Postgres, Kafka, migrations, topics, ingest, router,
# writer and admin, a Prometheus scraping them, plus a demo organization with the product page's
# example mappings.
#   scripts/up.sh       (again: restarts the services, keeps data and the demo org)
#   scripts/down.sh     stops it all
source "$(dirname "$0")/common.sh"

BIN=$("$REPO_DIR/scripts/bootstrap.sh")
export PATH="$BIN:$PATH"
LOG_DIR="$RUN_DIR/logs"
mkdir -p "$LOG_DIR"

"$REPO_DIR/scripts/down.sh" --services-only >/dev/null 2>&1 || true
"$REPO_DIR/scripts/postgres.sh" start >/dev/null
"$REPO_DIR/scripts/kafka.sh" start >/dev/null
set -a
source "$RUN_DIR/postgres.env"
source "$RUN_DIR/kafka.env"
BLAMETRAIL_INGEST_PORT=$(free_port "${BLAMETRAIL_INGEST_PORT:-8000}")
BLAMETRAIL_ADMIN_PORT=$(free_port "${BLAMETRAIL_ADMIN_PORT:-8001}")
BLAMETRAIL_ROUTER_METRICS_PORT=$(free_port "${BLAMETRAIL_ROUTER_METRICS_PORT:-9101}")
BLAMETRAIL_WRITER_METRICS_PORT=$(free_port "${BLAMETRAIL_WRITER_METRICS_PORT:-9102}")
BLAMETRAIL_PUBLIC_URL="http://127.0.0.1:$BLAMETRAIL_INGEST_PORT"
BLAMETRAIL_SPOOL_DIR="$RUN_DIR/spool"
set +a
# Everything a shell needs to talk to this stack: `set -a; source .run/stack.env; set +a`
{
  cat "$RUN_DIR/postgres.env" "$RUN_DIR/kafka.env"
  env | grep -E '^BLAMETRAIL_(INGEST_PORT|ADMIN_PORT|ROUTER_METRICS_PORT|WRITER_METRICS_PORT|PUBLIC_URL|SPOOL_DIR)='
} > "$RUN_DIR/stack.env"

blametrail migrate >/dev/null
blametrail topics create >/dev/null

for service in ingest router writer admin; do
  setsid blametrail "$service" > "$LOG_DIR/$service.log" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/$service.pid"
done

http_ok() { python3 -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" "$1" 2>/dev/null; }
wait_for 60 ingest http_ok "http://127.0.0.1:$BLAMETRAIL_INGEST_PORT/readyz" || die "ingest did not start: see $LOG_DIR/ingest.log"
wait_for 60 admin http_ok "http://127.0.0.1:$BLAMETRAIL_ADMIN_PORT/healthz" || die "admin did not start: see $LOG_DIR/admin.log"
wait_for 60 router http_ok "http://127.0.0.1:$BLAMETRAIL_ROUTER_METRICS_PORT/metrics" || die "router did not start: see $LOG_DIR/router.log"
wait_for 60 writer http_ok "http://127.0.0.1:$BLAMETRAIL_WRITER_METRICS_PORT/metrics" || die "writer did not start: see $LOG_DIR/writer.log"
# Prometheus scraping the four services, deploy/alerts.yml loaded (keeps running across up.sh runs).
"$REPO_DIR/scripts/prometheus.sh" start >/dev/null
source "$RUN_DIR/prometheus.env"

# The demo organization: the product page's example configuration.
DEMO_FILE="$RUN_DIR/demo-org.json"
if ! blametrail service list --org demo >/dev/null 2>&1; then
  write_private "$DEMO_FILE" blametrail org create demo --name "Demo Org"
  for service in "Web App" "Payments API" "Email Worker" "Internal Tools"; do
    blametrail service create --org demo "$service" >/dev/null
  done
  blametrail mapping add --org demo frontend --service "Web App" >/dev/null
  blametrail mapping add --org demo payments-api --service "Payments API" >/dev/null
  blametrail mapping add --org demo email-worker --service "Email Worker" >/dev/null
  blametrail mapping add --org demo internal-tools --service "Internal Tools" --inactive >/dev/null
elif [[ ! -f "$DEMO_FILE" ]]; then
  # The org survived but its secrets were not kept: rotate to a known secret (the API token is shown
  # only at creation).
  blametrail org rotate-secret demo | write_private "$DEMO_FILE" python3 -c '
import json, sys
out = json.load(sys.stdin)
out.update(api_token="(shown only when the org was created)", webhook_url=sys.argv[1])
print(json.dumps(out))' "$BLAMETRAIL_PUBLIC_URL/webhooks/sentry/demo"
fi
chmod 600 "$DEMO_FILE"  # also when an older run created it readable by others

read -r SECRET TOKEN < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["client_secret"], d["api_token"].replace(" ", "_"))' "$DEMO_FILE")
WEBHOOK_URL="$BLAMETRAIL_PUBLIC_URL/webhooks/sentry/demo"
SAMPLE="$REPO_DIR/scripts/sample-issue.json"
SIG=$(python3 -c 'import hashlib,hmac,sys; print(hmac.new(sys.argv[1].encode(), open(sys.argv[2],"rb").read(), hashlib.sha256).hexdigest())' "$SECRET" "$SAMPLE")

cat <<MSG

BlameTrail is up (logs in $LOG_DIR; stop with scripts/down.sh).

  ingest     $BLAMETRAIL_PUBLIC_URL   (metrics: /metrics)
  admin      http://127.0.0.1:$BLAMETRAIL_ADMIN_PORT/   (Project Mappings page: sign in with the API token)
  router     metrics http://127.0.0.1:$BLAMETRAIL_ROUTER_METRICS_PORT/metrics
  writer     metrics http://127.0.0.1:$BLAMETRAIL_WRITER_METRICS_PORT/metrics
  prometheus $PROMETHEUS_URL   (alerts: $PROMETHEUS_URL/alerts; config $RUN_DIR/prometheus.yml)
  kafka      $BLAMETRAIL_KAFKA_BOOTSTRAP
  postgres   postgresql://blametrail@127.0.0.1:$PGPORT/blametrail

Demo organization "demo" (frontend, payments-api, email-worker active; internal-tools inactive):
  webhook URL     $WEBHOOK_URL
  client secret   $SECRET
  API token       $TOKEN

Send a signed Sentry issue.created for payments-api:

  curl -sS -X POST '$WEBHOOK_URL' -H 'Content-Type: application/json' -H 'Sentry-Hook-Resource: issue' -H 'Sentry-Hook-Signature: $SIG' --data-binary @$SAMPLE

Then see the incident on "Payments API":

  psql 'postgresql://blametrail@127.0.0.1:$PGPORT/blametrail' -c 'select id, service_id, title, status, event_count from incidents'
MSG

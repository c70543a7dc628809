#!/usr/bin/env bash
# A real Apache Kafka broker (KRaft, combined broker+controller) without Docker.
#   scripts/kafka.sh fetch   -> Maven Central jars into $CACHE_DIR/kafka-$KAFKA_VERSION/libs (once)
#   scripts/kafka.sh start   -> formats storage, starts on free loopback ports, waits until it serves
#                               clients, writes $RUN_DIR/kafka.env (BLAMETRAIL_KAFKA_BOOTSTRAP=...)
#   scripts/kafka.sh stop | status
# Safe to run twice, after a crash (stale pid file) and when 9092 is busy.
# stop keeps the data and kafka.env: the next start comes back on the same ports while they are free.
source "$(dirname "$0")/common.sh"

KAFKA_VERSION="${BLAMETRAIL_KAFKA_VERSION:-4.1.1}"
LOG4J_VERSION=2.24.3
KAFKA_HOME="$CACHE_DIR/kafka-$KAFKA_VERSION"
STATE_DIR="${BLAMETRAIL_KAFKA_DIR:-$RUN_DIR/kafka}"
ENV_FILE="$RUN_DIR/kafka.env"
PID_FILE="$STATE_DIR/kafka.pid"

fetch() {
  [[ -f "$KAFKA_HOME/.complete" ]] && return 0
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch Kafka: apt-get install maven"
  mkdir -p "$KAFKA_HOME"
  cat > "$KAFKA_HOME/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>blametrail.local</groupId><artifactId>kafka-runtime</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
  log "fetching Apache Kafka $KAFKA_VERSION from Maven Central"
  rm -rf "$KAFKA_HOME/libs"
  mvn -q -B -f "$KAFKA_HOME/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$KAFKA_HOME/libs" -DincludeScope=runtime >&2 || die "mvn could not fetch Kafka"
  cat > "$KAFKA_HOME/log4j2.properties" <<'L4J'
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
L4J
  touch "$KAFKA_HOME/.complete"
}

kjava() { java -Xshare:auto -cp "$KAFKA_HOME/libs/*" "$@"; }

env_value() { sed -n "s/^$1=//p" "$ENV_FILE" 2>/dev/null || true; }

broker_pid() { cat "$PID_FILE" 2>/dev/null || true; }

is_running() {
  local pid; pid=$(broker_pid)
  pid_alive "$pid" && [[ -f "$ENV_FILE" ]] && port_open "$(env_value KAFKA_PORT)"
}

write_config() {
  local port=$1 cport=$2
  cat > "$STATE_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$STATE_DIR/data
num.partitions=${BLAMETRAIL_TOPIC_PARTITIONS:-6}
offsets.topic.replication.factor=1
offsets.topic.num.partitions=${BLAMETRAIL_KAFKA_OFFSETS_PARTITIONS:-10}
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
message.max.bytes=${BLAMETRAIL_KAFKA_MAX_MESSAGE_BYTES:-4194304}
replica.fetch.max.bytes=${BLAMETRAIL_KAFKA_MAX_MESSAGE_BYTES:-4194304}
auto.create.topics.enable=false
PROPS
}

start() {
  fetch
  mkdir -p "$STATE_DIR"
  if is_running; then
    log "already running at 127.0.0.1:$(env_value KAFKA_PORT)"
    cat "$ENV_FILE"; return 0
  fi
  local pid; pid=$(broker_pid)
  if pid_alive "$pid"; then
    log "stopping a broker of an earlier run (pid $pid) whose settings were lost"
    stop_pid "$pid" 30 "the old broker" || true
  elif [[ -n "$pid" ]]; then
    log "removing the stale pid file of a crashed run (pid $pid)"
  fi
  rm -f "$PID_FILE"
  local old_port old_cport port cport
  old_port=$(env_value KAFKA_PORT); old_cport=$(env_value KAFKA_CONTROLLER_PORT)
  port=$(pick_port "Kafka broker" "${BLAMETRAIL_KAFKA_PORT:-$old_port}")
  cport=$(pick_port "Kafka controller" "$old_cport")
  # Two free ports picked one after the other can be the same one (seen once after a benchmark had
  # left most ephemeral ports in TIME_WAIT); the broker refuses two listeners on one port.
  local tries=0
  while [[ "$cport" == "$port" ]]; do
    (( ++tries <= 20 )) || die "no second free port for the Kafka controller"
    cport=$(free_port 0)
  done
  # The controller's address is written into the metadata log at format time: the data is kept when
  # the controller comes back on its port (the broker's port may change); otherwise a new, empty cluster.
  write_config "$port" "$cport"
  if [[ "$cport" != "$old_cport" || ! -f "$STATE_DIR/data/meta.properties" ]]; then
    if [[ -f "$STATE_DIR/data/meta.properties" ]]; then
      log "the controller port changed: starting a new, empty cluster (the old one's data is dropped)"
    fi
    rm -rf "$STATE_DIR/data"
    kjava kafka.tools.StorageTool format --standalone --ignore-formatted \
      -t "$(kjava kafka.tools.StorageTool random-uuid)" -c "$STATE_DIR/server.properties" >/dev/null
  fi
  : > "$STATE_DIR/server.log"
  # setsid: the broker outlives this script and is not killed with the caller's process group.
  KAFKA_HEAP="${BLAMETRAIL_KAFKA_HEAP:-768m}"
  setsid java -Xms256m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dkafka.logs.dir="$STATE_DIR" -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" \
    -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$STATE_DIR/server.properties" \
    > "$STATE_DIR/stdout.log" 2>&1 < /dev/null &
  echo $! > "$PID_FILE"
  pid=$!
  if ! wait_for 90 "kafka" bash -c "grep -q 'Kafka Server started' '$STATE_DIR/server.log' && (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null"; then
    tail -n 30 "$STATE_DIR/server.log" "$STATE_DIR/stdout.log" >&2 || true
    kill -9 "$pid" 2>/dev/null || true
    die "Kafka did not start"
  fi
  cat > "$ENV_FILE" <<ENV
KAFKA_PORT=$port
KAFKA_CONTROLLER_PORT=$cport
BLAMETRAIL_KAFKA_BOOTSTRAP=127.0.0.1:$port
ENV
  log "Apache Kafka $KAFKA_VERSION listening on 127.0.0.1:$port (pid $pid, logs in $STATE_DIR)"
  cat "$ENV_FILE"
}

stop() {
  local pid; pid=$(broker_pid)
  if pid_alive "$pid"; then
    stop_pid "$pid" 60 "the broker" || true
    log "stopped"
  else
    log "not running"
  fi
  rm -f "$PID_FILE"
}

status() {
  if is_running; then echo "running at 127.0.0.1:$(env_value KAFKA_PORT)"; else echo "stopped"; return 1; fi
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 fetch|start|stop|status" >&2; exit 2 ;;
esac

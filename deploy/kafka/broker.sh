#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft) from Maven Central jars, run with the machine's JDK.
#   broker.sh start    fetch jars once (cached), format a fresh data dir, start in the
#                      background, return when a metadata request succeeds
#   broker.sh stop     stop the broker this script started (by its pid file), nothing else
#   broker.sh status   exit 0 when our broker is running and answers
#   broker.sh resume   start again on the existing data dir (after a crash or a fault test)
# Environment (defaults in brackets):
#   FRS_KAFKA_PORT [19092]   client port; the controller uses PORT+1
#   FRS_KAFKA_STATE [deploy/kafka/.state]   data dir, pid file and log
#   FRS_KAFKA_JARS  [~/.cache/frs-broker/kafka-<version>]   jar cache
#   FRS_KAFKA_HEAP  [512m]
set -euo pipefail
# shellcheck source=deploy/kafka/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
port=${FRS_KAFKA_PORT:-19092}
cport=$((port + 1))
state=${FRS_KAFKA_STATE:-$here/.state}
heap=${FRS_KAFKA_HEAP:-512m}
pidfile=$state/broker.pid
bootstrap=127.0.0.1:$port

start() {
  pid_running "$pidfile" && { echo "broker already running (pid $(cat "$pidfile")) at $bootstrap"; return 0; }
  fetch
  port_taken "$port" && die "port $port is already in use by another process: set FRS_KAFKA_PORT or stop it"
  rm -rf "$state/data"
  mkdir -p "$state/data"
  sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$cport|g" -e "s|@DATA@|$state/data|g" \
    "$here/server.properties.in" > "$state/server.properties"
  local cluster
  cluster=$(storage_tool random-uuid)
  storage_tool format -t "$cluster" -c "$state/server.properties" >"$state/format.log" 2>&1 \
    || { cat "$state/format.log" >&2; die "storage format failed"; }
  start_java_broker "$state/server.properties" "$state/broker.log" "$pidfile" "$heap"
  if ! wait_ready "$bootstrap" 90; then
    tail -20 "$state/broker.log" >&2
    stop
    die "broker did not become ready"
  fi
}

resume() {
  pid_running "$pidfile" && { echo "broker already running (pid $(cat "$pidfile")) at $bootstrap"; return 0; }
  [ -f "$state/server.properties" ] || die "no broker was formatted in $state: run broker.sh start"
  start_java_broker "$state/server.properties" "$state/broker.log" "$pidfile" "$heap"
  wait_ready "$bootstrap" 90 || { tail -20 "$state/broker.log" >&2; die "broker did not become ready"; }
}

stop() { stop_pidfile "$pidfile" broker; }

status() {
  pid_running "$pidfile" || { echo "broker not running"; return 3; }
  fetch
  wait_ready "$bootstrap" 5
}

case "${1:-}" in
  start) start ;;
  resume) resume ;;
  stop) stop ;;
  status) status ;;
  fetch) fetch ;;
  *) echo "usage: broker.sh start|resume|stop|status|fetch" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft) from Maven Central jars, run with the machine's JDK.
#   broker.sh start    fetch jars once (cached), format a fresh data dir, start in the
#                      background, return when a metadata request succeeds
#   broker.sh stop     stop the broker this script started (by its pid file), nothing else
#   broker.sh status   exit 0 when our broker is running and answers
# Environment (defaults in brackets):
#   FRS_KAFKA_PORT [19092]   client port; the controller uses PORT+1
#   FRS_KAFKA_STATE [deploy/kafka/.state]   data dir, pid file and log
#   FRS_KAFKA_JARS  [~/.cache/frs-broker/kafka-<version>]   jar cache
#   FRS_KAFKA_HEAP  [512m]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")
port=${FRS_KAFKA_PORT:-19092}
cport=$((port + 1))
state=${FRS_KAFKA_STATE:-$here/.state}
jars=${FRS_KAFKA_JARS:-${XDG_CACHE_HOME:-$HOME/.cache}/frs-broker/kafka-$version}
heap=${FRS_KAFKA_HEAP:-512m}
pidfile=$state/broker.pid
bootstrap=127.0.0.1:$port

die() { echo "broker.sh: $*" >&2; exit 1; }

fetch() {
  [ -f "$jars/.complete" ] && return 0
  command -v mvn >/dev/null || die "mvn not found: install Maven (apt-get install maven)"
  echo "fetching Kafka $version jars into $jars (once)" >&2
  mkdir -p "$jars"
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$jars" >&2 || die "mvn could not fetch the Kafka jars"
  touch "$jars/.complete"
}

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

java_opts=(-Xms128m -Xmx"$heap" -XX:+UseG1GC -Djava.awt.headless=true
  -Dlog4j2.configurationFile="$here/log4j2.properties" -cp "$jars/*")
java_cmd() { java "${java_opts[@]}" "$@"; }

wait_ready() {
  java -cp "$jars/*" "$here/WaitReady.java" "$bootstrap" "${1:-90}"
}

start() {
  running && { echo "broker already running (pid $(cat "$pidfile")) at $bootstrap"; return 0; }
  fetch
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is already in use by another process: set FRS_KAFKA_PORT or stop it"
  fi
  rm -rf "$state/data"
  mkdir -p "$state/data"
  sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$cport|g" -e "s|@DATA@|$state/data|g" \
    "$here/server.properties.in" > "$state/server.properties"
  local cluster
  cluster=$(java_cmd kafka.tools.StorageTool random-uuid)
  java_cmd kafka.tools.StorageTool format -t "$cluster" -c "$state/server.properties" >"$state/format.log" 2>&1 \
    || { cat "$state/format.log" >&2; die "storage format failed"; }
  # java itself in the background, so the pid file names the broker, not a subshell.
  java "${java_opts[@]}" kafka.Kafka "$state/server.properties" >"$state/broker.log" 2>&1 &
  echo $! > "$pidfile"
  if ! wait_ready 90; then
    tail -20 "$state/broker.log" >&2
    stop
    die "broker did not become ready"
  fi
}

stop() {
  if ! running; then rm -f "$pidfile"; echo "broker not running"; return 0; fi
  local pid
  pid=$(cat "$pidfile")
  kill -TERM "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  rm -f "$pidfile"
  echo "broker stopped (pid $pid)"
}

status() {
  running || { echo "broker not running"; return 3; }
  fetch
  wait_ready 5
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  fetch) fetch ;;
  *) echo "usage: broker.sh start|stop|status|fetch" >&2; exit 2 ;;
esac

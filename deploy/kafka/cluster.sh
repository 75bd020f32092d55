#!/usr/bin/env bash
# Three KRaft nodes on one machine (each broker+controller, static quorum of three) for
# fault tests: replication factor 3 and min.insync.replicas 2 for every topic.
#   cluster.sh start          format three fresh data dirs with one cluster id, start all,
#                             return when a metadata answer lists all three brokers
#   cluster.sh stop           stop the three nodes this script started (by pid files)
#   cluster.sh status         exit 0 when all three run and the cluster lists three brokers
#   cluster.sh bootstrap      print the bootstrap list
#   cluster.sh kill N [SIG]   send SIG (default KILL) to node N (1..3), fault injection
#   cluster.sh start-node N   start node N again on its existing data dir (after kill)
# Environment (defaults in brackets):
#   FRS_CLUSTER_PORT [29092]  node N's client port is PORT+2(N-1), its controller port +1
#   FRS_CLUSTER_STATE [deploy/kafka/.cluster]  data dirs, pid files, logs
#   FRS_CLUSTER_HEAP [256m]   heap per node
#   FRS_KAFKA_JARS            jar cache shared with broker.sh
set -euo pipefail
# shellcheck source=deploy/kafka/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
base=${FRS_CLUSTER_PORT:-29092}
state=${FRS_CLUSTER_STATE:-$here/.cluster}
heap=${FRS_CLUSTER_HEAP:-256m}
nodes=(1 2 3)

port() { echo $((base + 2 * ($1 - 1))); }
cport() { echo $((base + 2 * ($1 - 1) + 1)); }
pidfile() { echo "$state/node$1/broker.pid"; }
bootstrap() {
  local out=() n
  for n in "${nodes[@]}"; do out+=("127.0.0.1:$(port "$n")"); done
  (IFS=,; echo "${out[*]}")
}
voters() {
  local out=() n
  for n in "${nodes[@]}"; do out+=("$n@127.0.0.1:$(cport "$n")"); done
  (IFS=,; echo "${out[*]}")
}

check_node() { [[ "${1:-}" =~ ^[123]$ ]] || { echo "node must be 1, 2 or 3" >&2; exit 2; }; }

start_node() {
  local n=$1 dir=$state/node$1
  pid_running "$(pidfile "$n")" && { echo "node $n already running (pid $(cat "$(pidfile "$n")"))"; return 0; }
  [ -f "$dir/server.properties" ] || die "node $n was never formatted: run cluster.sh start"
  start_java_broker "$dir/server.properties" "$dir/broker.log" "$(pidfile "$n")" "$heap"
}

start() {
  local n running=0
  for n in "${nodes[@]}"; do pid_running "$(pidfile "$n")" && running=1; done
  [ $running -eq 1 ] && { echo "cluster already running at $(bootstrap)"; return 0; }
  fetch
  for n in "${nodes[@]}"; do
    port_taken "$(port "$n")" && die "port $(port "$n") is in use: set FRS_CLUSTER_PORT"
    port_taken "$(cport "$n")" && die "port $(cport "$n") is in use: set FRS_CLUSTER_PORT"
  done
  local cluster
  cluster=$(storage_tool random-uuid)
  for n in "${nodes[@]}"; do
    local dir=$state/node$n
    rm -rf "$dir"
    mkdir -p "$dir/data"
    sed -e "s|@NODE_ID@|$n|g" -e "s|@VOTERS@|$(voters)|g" -e "s|@PORT@|$(port "$n")|g" \
        -e "s|@CONTROLLER_PORT@|$(cport "$n")|g" -e "s|@DATA@|$dir/data|g" \
        "$here/cluster.properties.in" > "$dir/server.properties"
    # Static quorum: every node formatted with the same cluster id, no --standalone.
    storage_tool format -t "$cluster" -c "$dir/server.properties" >"$dir/format.log" 2>&1 \
      || { cat "$dir/format.log" >&2; die "storage format failed for node $n"; }
  done
  for n in "${nodes[@]}"; do start_node "$n"; done
  if ! wait_ready "$(bootstrap)" 120 3; then
    for n in "${nodes[@]}"; do tail -5 "$state/node$n/broker.log" >&2; done
    stop
    die "cluster did not become ready"
  fi
}

stop() {
  local n
  for n in "${nodes[@]}"; do stop_pidfile "$(pidfile "$n")" "node $n"; done
}

status() {
  local n
  for n in "${nodes[@]}"; do
    pid_running "$(pidfile "$n")" || { echo "node $n not running"; return 3; }
  done
  fetch
  wait_ready "$(bootstrap)" 5 3
}

kill_node() {
  check_node "${1:-}"
  local pf
  pf=$(pidfile "$1")
  pid_running "$pf" || die "node $1 is not running"
  kill "-${2:-KILL}" "$(cat "$pf")"
  echo "sent SIG${2:-KILL} to node $1 (pid $(cat "$pf"))"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  bootstrap) bootstrap ;;
  kill) kill_node "${2:-}" "${3:-KILL}" ;;
  start-node) check_node "${2:-}"; start_node "$2" ;;
  fetch) fetch ;;
  *) echo "usage: cluster.sh start|stop|status|bootstrap|kill N [SIG]|start-node N" >&2; exit 2 ;;
esac

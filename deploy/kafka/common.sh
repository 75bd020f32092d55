# Shared by broker.sh (one node) and cluster.sh (three nodes): Kafka version, jar cache,
# the java command line, readiness wait, and stopping a pid we started.
# shellcheck shell=bash
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")
jars=${FRS_KAFKA_JARS:-${XDG_CACHE_HOME:-$HOME/.cache}/frs-broker/kafka-$version}

# shellcheck source=deploy/java.sh
source "$here/../java.sh"

# JVM flags of every broker we start. C1 only (TieredStopAtLevel=1): on a 2-core machine
# the C2 compiler kept a core's tenth busy for minutes and doubled the broker's CPU per
# probe at 50 probes/s (frs bench pipeline: p99 450 -> 106 ms); steady-state throughput
# of the raw relay was no lower. FRS_KAFKA_JVM_OPTS replaces them.
read -r -a jvm_flags <<< "${FRS_KAFKA_JVM_OPTS:--XX:+UseG1GC -XX:TieredStopAtLevel=1}"

fetch() { fetch_jars "$here/pom.xml" "$jars" "Kafka $version"; }

storage_tool() { java -cp "$jars/*" kafka.tools.StorageTool "$@"; }

wait_ready() {  # wait_ready BOOTSTRAP SECONDS [MIN_NODES]
  java -cp "$jars/*" "$here/WaitReady.java" "$1" "$2" - "${3:-1}"
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_java_broker() {  # start_java_broker PROPERTIES LOG PIDFILE HEAP
  # java itself in the background, so the pid file names the broker, not a subshell.
  java -Xms128m -Xmx"$4" "${jvm_flags[@]}" -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$here/log4j2.properties" -cp "$jars/*" \
    kafka.Kafka "$1" >>"$2" 2>&1 &
  echo $! > "$3"
}

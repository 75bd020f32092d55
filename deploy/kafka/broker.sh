#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft) from Maven Central jars, run with the machine's JDK.
#   broker.sh start    fetch jars once (cached), format a fresh data dir, start in the
#                      background, return when a metadata request succeeds
#   broker.sh stop     stop the broker this script started (by its pid file), nothing else
#   broker.sh status   exit 0 when our broker is running and answers
#   broker.sh resume   start again on the existing data dir (after a crash or a fault test)
#   broker.sh start --secure   (or FRS_KAFKA_SECURE=1) the secured mode: TLS 1.3 on every
#                      listener, SASL SCRAM-SHA-512 users made at format time, ACLs enforced
#                      (StandardAuthorizer, deny when no ACL). See "Secured mode" below.
# Environment (defaults in brackets):
#   FRS_KAFKA_PORT [19092]   client port; the controller uses PORT+1, secured mode's
#                      internal (inter-broker, admin) listener PORT+2
#   FRS_KAFKA_STATE [deploy/kafka/.state]   data dir, pid file and log
#   FRS_KAFKA_JARS  [~/.cache/frs-broker/kafka-<version>]   jar cache
#   FRS_KAFKA_HEAP  [512m]
#   FRS_KAFKA_JVM_OPTS  [-XX:+UseG1GC -XX:TieredStopAtLevel=1]   JVM flags (see common.sh)
set -euo pipefail
# Shared with cluster.sh: $here, $version, $jars (the jar cache), fetch, die.
# shellcheck source=deploy/kafka/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
port=${FRS_KAFKA_PORT:-19092}
cport=$((port + 1))
state=${FRS_KAFKA_STATE:-$here/.state}
heap=${FRS_KAFKA_HEAP:-512m}
pidfile=$state/broker.pid
bootstrap=127.0.0.1:$port
iport=$((port + 2))
secure=${FRS_KAFKA_SECURE:-0}
python=${FRS_PYTHON:-python3}

running() { pid_running "$pidfile"; }

java_opts=(-Xms128m -Xmx"$heap" "${jvm_flags[@]}" -Djava.awt.headless=true
  -Dlog4j2.configurationFile="$here/log4j2.properties")
java_cmd() { java "${java_opts[@]}" -cp "$jars/*" "$@"; }

wait_ready() {
  if [ -f "$state/secure" ]; then
    # Secured: ask over the internal listener as the admin (certificate only).
    java -cp "$jars/*" "$here/WaitReady.java" "127.0.0.1:$iport" "${1:-90}" "$state/admin.properties"
  else
    java -cp "$jars/*" "$here/WaitReady.java" "$bootstrap" "${1:-90}"
  fi
}

# Secured mode. Everything it makes lives in $state (0700): pki/ (CA, certificates, 0600
# keys), secrets/ (SCRAM passwords, 0600), env/<principal>.env (the FRS_KAFKA_* settings a
# client of that identity needs: paths, never secrets), admin.properties (Java admin).
secure_prepare() {
  "$python" -c 'import cryptography' 2>/dev/null \
    || die "secured mode needs Python with cryptography: set FRS_PYTHON (e.g. .venv/bin/python)"
  "$python" "$here/pki.py" "$state" --acls "$here/../../services/kit/acls.json" >&2
  rm -rf "$state/classes" "$state/env"
  mkdir -p "$state/classes" "$state/env"
  # The principal builder that binds each SCRAM user to its own certificate.
  javac -nowarn -d "$state/classes" -cp "$jars/*" "$here/FrsPrincipalBuilder.java" \
    || die "could not compile FrsPrincipalBuilder.java (is a JDK with javac installed?)"
  local pki=$state/pki
  cat > "$state/admin.properties" <<PROPS
bootstrap.servers=127.0.0.1:$iport
security.protocol=SSL
ssl.keystore.type=PEM
ssl.keystore.location=$pki/admin.keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$pki/ca.pem
PROPS
  cat > "$state/env/admin.env" <<ENV
FRS_KAFKA_BOOTSTRAP=127.0.0.1:$iport
FRS_KAFKA_SECURITY_PROTOCOL=SSL
FRS_KAFKA_CA_FILE=$pki/ca.pem
FRS_KAFKA_CERT_FILE=$pki/admin.pem
FRS_KAFKA_KEY_FILE=$pki/admin.key
ENV
  local f name
  for f in "$state"/secrets/*.password; do
    name=$(basename "$f" .password)
    cat > "$state/env/$name.env" <<ENV
FRS_KAFKA_BOOTSTRAP=$bootstrap
FRS_KAFKA_SECURITY_PROTOCOL=SASL_SSL
FRS_KAFKA_CA_FILE=$pki/ca.pem
FRS_KAFKA_CERT_FILE=$pki/$name.pem
FRS_KAFKA_KEY_FILE=$pki/$name.key
FRS_KAFKA_SASL_USERNAME=$name
FRS_KAFKA_SASL_PASSWORD_FILE=$f
ENV
  done
  touch "$state/secure"
}

start() {
  running && { echo "broker already running (pid $(cat "$pidfile")) at $bootstrap"; return 0; }
  fetch
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is already in use by another process: set FRS_KAFKA_PORT or stop it"
  fi
  rm -rf "$state/data"
  mkdir -p "$state/data"
  rm -f "$state/secure"
  local template=$here/server.properties.in
  local broker_opts=(-cp "$jars/*")
  if [ "$secure" = 1 ]; then
    if (exec 3<>"/dev/tcp/127.0.0.1/$iport") 2>/dev/null; then
      die "port $iport (internal listener) is already in use: set FRS_KAFKA_PORT"
    fi
    secure_prepare
    template=$here/server-secure.properties.in
    broker_opts=(-cp "$jars/*:$state/classes" -Dfrs.cert.only=broker,admin)
  fi
  sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$cport|g" -e "s|@DATA@|$state/data|g" \
    -e "s|@INTERNAL_PORT@|$iport|g" -e "s|@PKI@|$state/pki|g" \
    "$template" > "$state/server.properties"
  local cluster
  cluster=$(java_cmd kafka.tools.StorageTool random-uuid)
  if [ "$secure" = 1 ]; then
    java -cp "$jars/*:$state/classes" -Dlog4j2.configurationFile="$here/log4j2.properties" \
      "$here/FormatScram.java" "$cluster" "$state/server.properties" "$state/secrets" \
      >"$state/format.log" 2>&1 || { cat "$state/format.log" >&2; die "storage format failed"; }
  else
    java_cmd kafka.tools.StorageTool format -t "$cluster" -c "$state/server.properties" >"$state/format.log" 2>&1 \
      || { cat "$state/format.log" >&2; die "storage format failed"; }
  fi
  # java itself in the background, so the pid file names the broker, not a subshell.
  java "${java_opts[@]}" "${broker_opts[@]}" kafka.Kafka "$state/server.properties" >"$state/broker.log" 2>&1 &
  echo $! > "$pidfile"
  if ! wait_ready 90; then
    tail -20 "$state/broker.log" >&2
    stop
    die "broker did not become ready"
  fi
}

resume() {
  running && { echo "broker already running (pid $(cat "$pidfile")) at $bootstrap"; return 0; }
  [ -f "$state/server.properties" ] || die "no broker was formatted in $state: run broker.sh start"
  local broker_opts=(-cp "$jars/*")
  [ -f "$state/secure" ] && broker_opts=(-cp "$jars/*:$state/classes" -Dfrs.cert.only=broker,admin)
  java "${java_opts[@]}" "${broker_opts[@]}" kafka.Kafka "$state/server.properties" >>"$state/broker.log" 2>&1 &
  echo $! > "$pidfile"
  wait_ready 90 || { tail -20 "$state/broker.log" >&2; die "broker did not become ready"; }
}

stop() { stop_pidfile "$pidfile" broker; }

status() {
  running || { echo "broker not running"; return 3; }
  fetch
  wait_ready 5
}

[ "${2:-}" = "--secure" ] && secure=1
case "${1:-}" in
  start) start ;;
  resume) resume ;;
  stop) stop ;;
  status) status ;;
  fetch) fetch ;;
  *) echo "usage: broker.sh start [--secure]|resume|stop|status|fetch" >&2; exit 2 ;;
esac

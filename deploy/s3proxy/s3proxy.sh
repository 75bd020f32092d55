#!/usr/bin/env bash
# An S3-compatible server (s3proxy, from Maven Central jars) over a local directory, for
# the vault's S3 backend tests and local runs.
#   s3proxy.sh start    fetch jars once (cached), start in the background on 127.0.0.1,
#                       return when it answers HTTP
#   s3proxy.sh stop     stop the server this script started (by its pid file), nothing else
#   s3proxy.sh status   exit 0 when our server is running and answers
# Environment (defaults in brackets):
#   FRS_S3PROXY_PORT [18089]
#   FRS_S3PROXY_STATE [deploy/s3proxy/.state]   data dir, properties, pid file and log
#   FRS_S3PROXY_JARS  [~/.cache/frs-broker/s3proxy-<version>]   jar cache
#   FRS_S3PROXY_IDENTITY [frs-local]  FRS_S3PROXY_CREDENTIAL [frs-local-secret]
#                     the access key id and secret clients sign with (AWS SigV2/V4)
#   FRS_S3PROXY_HEAP  [256m]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(sed -n 's:.*<s3proxy.version>\(.*\)</s3proxy.version>.*:\1:p' "$here/pom.xml")
port=${FRS_S3PROXY_PORT:-18089}
state=${FRS_S3PROXY_STATE:-$here/.state}
jars=${FRS_S3PROXY_JARS:-${XDG_CACHE_HOME:-$HOME/.cache}/frs-broker/s3proxy-$version}
identity=${FRS_S3PROXY_IDENTITY:-frs-local}
credential=${FRS_S3PROXY_CREDENTIAL:-frs-local-secret}
heap=${FRS_S3PROXY_HEAP:-256m}
pidfile=$state/s3proxy.pid
endpoint=http://127.0.0.1:$port

# shellcheck source=deploy/java.sh
source "$here/../java.sh"

fetch() { fetch_jars "$here/pom.xml" "$jars" "s3proxy $version"; }

running() { pid_running "$pidfile"; }

answers() {
  # Any HTTP status (403 for an unsigned request) means the server is up.
  local code
  code=$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$endpoint/" || true)
  [ -n "$code" ] && [ "$code" != "000" ]
}

wait_ready() {
  local deadline=$((SECONDS + ${1:-60}))
  while [ $SECONDS -lt $deadline ]; do
    running || return 1
    answers && return 0
    sleep 0.3
  done
  return 1
}

start() {
  running && { echo "s3proxy already running (pid $(cat "$pidfile")) at $endpoint"; return 0; }
  fetch
  mkdir -p "$state/data"
  umask 077
  cat > "$state/s3proxy.properties" <<PROPS
s3proxy.endpoint=$endpoint
s3proxy.authorization=aws-v2-or-v4
s3proxy.identity=$identity
s3proxy.credential=$credential
jclouds.provider=filesystem
jclouds.filesystem.basedir=$state/data
PROPS
  nohup bash -c 'exec "$@"' _ java -Xms64m -Xmx"$heap" -Djava.awt.headless=true \
    -Dlogback.configurationFile="$here/logback.xml" -cp "$jars/*" \
    org.gaul.s3proxy.Main --properties "$state/s3proxy.properties" >"$state/s3proxy.log" 2>&1 &
  echo $! > "$pidfile"
  if ! wait_ready 60; then
    tail -20 "$state/s3proxy.log" >&2
    stop
    die "s3proxy did not become ready"
  fi
  echo "s3proxy ready at $endpoint (pid $(cat "$pidfile"))"
}

stop() { stop_pidfile "$pidfile" s3proxy; }

status() {
  running || { echo "s3proxy not running"; return 3; }
  answers || { echo "s3proxy running but not answering at $endpoint"; return 1; }
  echo "s3proxy running at $endpoint"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  fetch) fetch ;;
  *) echo "usage: s3proxy.sh start|stop|status|fetch" >&2; exit 2 ;;
esac

# Shared by the scripts that run Java servers from Maven Central jars (deploy/kafka,
# deploy/s3proxy): fetching a pom's jars once into a cache, and stopping a pid we started.
# shellcheck shell=bash

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

fetch_jars() {  # fetch_jars POM JAR_DIR WHAT: copy the pom's runtime jars once
  [ -f "$2/.complete" ] && return 0
  command -v mvn >/dev/null || die "mvn not found: install Maven (apt-get install maven)"
  echo "fetching $3 jars into $2 (once)" >&2
  mkdir -p "$2"
  mvn -q -B -f "$1" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$2" >&2 || die "mvn could not fetch the $3 jars"
  touch "$2/.complete"
}

# A killed process nobody has reaped yet (a zombie: here PID 1 reaps only now and then)
# still answers kill -0; it runs nothing and holds no port, so it counts as gone.
pid_alive() {  # pid_alive PID
  local stat
  kill -0 "$1" 2>/dev/null || return 1
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat:0:1}" != Z ]
}

pid_running() { [ -f "$1" ] && pid_alive "$(cat "$1")"; }

stop_pidfile() {  # stop_pidfile PIDFILE NAME: TERM, wait up to 20 s, then KILL
  if ! pid_running "$1"; then rm -f "$1"; echo "$2 not running"; return 0; fi
  local pid
  pid=$(cat "$1")
  kill -TERM "$pid"
  for _ in $(seq 1 100); do pid_alive "$pid" || break; sleep 0.2; done
  pid_alive "$pid" && kill -KILL "$pid"
  rm -f "$1"
  echo "$2 stopped (pid $pid)"
}

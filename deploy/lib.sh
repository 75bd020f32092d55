# Shared by up.sh and test.sh: install what is missing, start and stop what we started.
# shellcheck shell=bash
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
PY=$VENV/bin/python

log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

apt_install() {
  # Debian packages, only those whose command is missing.
  local missing=()
  while [ $# -gt 0 ]; do
    command -v "$1" >/dev/null 2>&1 || missing+=("$2")
    shift 2
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "install ${missing[*]} (no apt-get here)"
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_tools() {
  # Go from the machine's toolchain, when there is one (the audit interop test uses it).
  [ -d /usr/local/go/bin ] && PATH=$PATH:/usr/local/go/bin
  apt_install java openjdk-17-jre-headless mvn maven node nodejs npm npm openssl openssl "$@"
  command -v python3.11 >/dev/null || command -v python3 >/dev/null || die "Python 3.11+ is required"
}

ensure_venv() {
  local stamp=$VENV/.frs-installed
  if [ ! -x "$PY" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    log "installing Python dependencies into .venv"
    "$PY" -m pip install -q --upgrade pip >/dev/null
    "$PY" -m pip install -q -e "$ROOT[dev]"
    touch "$stamp"
  fi
}

ensure_npm_tools() {
  local dir=$ROOT/tests/contract
  if [ ! -d "$dir/node_modules/@asyncapi/parser" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules" ]; then
    log "installing npm tools (tests/contract)"
    (cd "$dir" && npm ci --no-audit --no-fund --silent)
  fi
}

# Track every process we start, and stop exactly those, by pid.
STARTED_PIDS=()
start_bg() {  # start_bg NAME LOGFILE CMD...
  local name=$1 logfile=$2
  shift 2
  "$@" >>"$logfile" 2>&1 &
  STARTED_PIDS+=("$!")
  echo "$!" >"$STATE/$name.pid"
}

stop_started() {
  local pid
  for pid in "${STARTED_PIDS[@]:-}"; do
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${STARTED_PIDS[@]:-}"; do
    [ -z "$pid" ] && continue
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  STARTED_PIDS=()
}

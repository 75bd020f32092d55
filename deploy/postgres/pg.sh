#!/usr/bin/env bash
# PostgreSQL for the shared state: Debian's server (installed if missing), one cluster under
# a state dir, on 127.0.0.1 only, SCRAM-SHA-256 passwords, one login role per service.
#   pg.sh start    initdb once, start (pg_ctl -w), create the database `frs`, its owner role
#                  (frs_owner, for `frs db migrate`) and the roles intake, dispatch, results,
#                  audit, and auditor (the auditors' commands: it may only read the audit
#                  log); print the FRS_STATE_URL of each. Data survive a stop and a start.
#   pg.sh stop     stop the server this script started (the data dir's postmaster.pid)
#   pg.sh status   exit 0 when our server runs and answers, 3 when it does not
#   pg.sh env ROLE the settings of ROLE (intake, dispatch, results, audit, auditor, owner)
# Environment (defaults in brackets):
#   FRS_PG_STATE  [.state/postgres]  data/ (the cluster), run/ (its only socket), log/,
#                 secrets/ (one password per role, 0600), env/ (ROLE.env: FRS_STATE_URL and
#                 FRS_STATE_PASSWORD_FILE, 0600)
#   FRS_PG_PORT   [15432]
#   FRS_PG_OSUSER [frs-pg]  the OS user the server runs as when this runs as root (initdb
#                 and postgres refuse root); created as a system user if missing. It must be
#                 able to reach FRS_PG_STATE (every parent directory searchable).
# Passwords go to the server on psql's stdin, never on a command line or in the environment.
set -euo pipefail
die() { echo "pg.sh: $*" >&2; exit 1; }

state=$(realpath -m "${FRS_PG_STATE:-.state/postgres}")
port=${FRS_PG_PORT:-15432}
data=$state/data
run=$state/run
logdir=$state/log
database=frs
owner=frs_owner
services=(intake dispatch results audit auditor)

if [ "$(id -u)" -eq 0 ]; then
  osuser=${FRS_PG_OSUSER:-frs-pg}
else
  osuser=$(id -un)
fi

bindir() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$found" ] && [ -x "$found/initdb" ] && echo "$found"
}

ensure_installed() {
  bindir >/dev/null && return 0
  command -v apt-get >/dev/null || die "install PostgreSQL (no apt-get here)"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  echo "installing Debian's postgresql" >&2
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
  bindir >/dev/null || die "apt-get installed postgresql but no initdb under /usr/lib/postgresql"
}

ensure_osuser() {
  [ "$(id -u)" -eq 0 ] || return 0
  id -u "$osuser" >/dev/null 2>&1 && return 0
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin "$osuser" 2>/dev/null || id -u "$osuser" >/dev/null 2>&1 \
    || die "could not create the system user $osuser"
}

as_pg() {  # run a server binary as the server's OS user, from a directory it may enter
  if [ "$(id -u)" -eq 0 ]; then
    (cd / && runuser -u "$osuser" -- "$@")
  else
    (cd / && "$@")
  fi
}

running() { [ -f "$data/postmaster.pid" ] && as_pg "$(bindir)/pg_ctl" status -D "$data" >/dev/null 2>&1; }

answers() { "$(bindir)/pg_isready" -q -h 127.0.0.1 -p "$port" -d "$database" -t 5; }

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

prepare_dirs() {
  mkdir -p "$state"
  # The state dir is searchable, not listable, by the server's user; each part has one owner.
  chmod 0711 "$state"
  mkdir -p "$data" "$run" "$logdir"
  chmod 0700 "$data" "$run" "$logdir"
  if [ "$(id -u)" -eq 0 ]; then
    chown "$osuser:" "$data" "$run" "$logdir"
  fi
  (umask 077 && mkdir -p "$state/secrets" "$state/env")
  as_pg test -w "$data" \
    || die "the OS user $osuser cannot reach $state: make its parent directories searchable (chmod o+x) or set FRS_PG_STATE elsewhere"
}

init_cluster() {
  local bin
  bin=$(bindir)
  as_pg "$bin/initdb" -D "$data" -U postgres -E UTF8 --locale=C \
    --auth-local=peer --auth-host=scram-sha-256 >"$logdir/initdb.log" 2>&1 \
    || { cat "$logdir/initdb.log" >&2; die "initdb failed"; }
  # The superuser only through the socket in run/, as the OS user that runs the server;
  # every role over 127.0.0.1 with SCRAM-SHA-256; nothing else (no trust, no other host).
  as_pg tee "$data/pg_hba.conf" >/dev/null <<HBA
# TYPE  DATABASE  USER      ADDRESS        METHOD
local   all       postgres                 peer map=frs
host    all       postgres  127.0.0.1/32   reject
host    all       all       127.0.0.1/32   scram-sha-256
HBA
  echo "frs  $osuser  postgres" | as_pg tee "$data/pg_ident.conf" >/dev/null
  echo "include_if_exists = 'frs.conf'" | as_pg tee -a "$data/postgresql.conf" >/dev/null
}

write_conf() {
  # Rewritten at each start: the port and paths may change between runs.
  as_pg tee "$data/frs.conf" >/dev/null <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$run'
unix_socket_permissions = 0700
password_encryption = 'scram-sha-256'
log_line_prefix = '%m [%p] %q%u@%d '
CONF
}

psql_admin() {  # psql_admin DB: SQL on stdin, as the superuser, through the socket in run/
  as_pg "$(bindir)/psql" -X -q -v ON_ERROR_STOP=1 -h "$run" -p "$port" -U postgres -d "$1"
}

password_of() {  # the role's password, made once (hex: nothing to quote)
  local file=$state/secrets/$1.password
  if [ ! -s "$file" ]; then
    (umask 077 && od -An -tx1 -N24 /dev/urandom | tr -d ' \n' > "$file")
  fi
  chmod 0600 "$file"
  cat "$file"
}

bootstrap() {
  local role sql=""
  for role in "$owner" "${services[@]}"; do
    sql+="SELECT format('CREATE ROLE %I', '$role') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$role') \\gexec
ALTER ROLE $role LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD '$(password_of "$role")';
"
  done
  psql_admin postgres <<SQL
$sql
SELECT 'CREATE DATABASE $database OWNER $owner' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$database') \\gexec
-- Only the roles of frs-broker connect, and only to its database.
REVOKE ALL ON DATABASE $database, postgres, template1 FROM PUBLIC;
GRANT CONNECT ON DATABASE $database TO $(IFS=,; echo "${services[*]}");
SQL
  # The owner owns the schema; the services may only use it (each table's grants come with
  # the migration that makes it).
  psql_admin "$database" <<SQL
ALTER SCHEMA public OWNER TO $owner;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO $(IFS=,; echo "${services[*]}");
SQL
}

write_env() {
  local name role
  for name in owner "${services[@]}"; do
    role=$name
    [ "$name" = owner ] && role=$owner
    (umask 077 && cat > "$state/env/$name.env" <<ENV
FRS_STATE_URL=postgresql://$role@127.0.0.1:$port/$database
FRS_STATE_PASSWORD_FILE=$state/secrets/$role.password
ENV
    )
  done
}

print_env() {
  local name
  echo "postgres at 127.0.0.1:$port, database $database (data: $data)"
  echo "each role's settings are in $state/env/ROLE.env (password files 0600 in $state/secrets):"
  for name in "${services[@]}" owner; do
    printf '  %-9s %s\n' "$name" "$(sed -n 's/^FRS_STATE_URL=//p' "$state/env/$name.env")"
  done
}

start() {
  ensure_installed
  if running; then
    echo "postgres already running (pid $(head -1 "$data/postmaster.pid"))"
    print_env
    return 0
  fi
  ensure_osuser
  prepare_dirs
  [ -f "$data/PG_VERSION" ] || init_cluster
  port_taken "$port" && die "port $port is already in use by another process: set FRS_PG_PORT or stop it"
  write_conf
  as_pg "$(bindir)/pg_ctl" start -D "$data" -l "$logdir/postgres.log" -w -t 60 >/dev/null \
    || { tail -20 "$logdir/postgres.log" >&2; die "postgres did not start"; }
  bootstrap
  write_env
  print_env
}

stop() {
  if ! running; then echo "postgres not running"; return 0; fi
  local pid
  pid=$(head -1 "$data/postmaster.pid")
  as_pg "$(bindir)/pg_ctl" stop -D "$data" -m fast -w -t 60 >/dev/null
  echo "postgres stopped (pid $pid)"
}

status() {
  bindir >/dev/null || { echo "postgres not installed"; return 3; }
  running || { echo "postgres not running"; return 3; }
  answers || { echo "postgres running but not answering on 127.0.0.1:$port"; return 3; }
  echo "postgres running (pid $(head -1 "$data/postmaster.pid")) at 127.0.0.1:$port"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env)
    [ -f "$state/env/${2:-}.env" ] || die "no settings for '${2:-}': one of ${services[*]} owner (after pg.sh start)"
    cat "$state/env/$2.env" ;;
  *) echo "usage: pg.sh start|stop|status|env ROLE" >&2; exit 2 ;;
esac

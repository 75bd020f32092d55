#!/usr/bin/env bash
# The whole suite against a real Kafka broker that this script starts and stops.
# Installs what is missing first (Debian packages, .venv, npm tools, Kafka jars).
#   deploy/test.sh                 everything: lint, types, contract, unit, integration, e2e,
#                                  and users (the installed wheel, up.sh and the README as written)
#   deploy/test.sh tests/unit      any pytest arguments narrow the run
# FRS_KAFKA_BOOTSTRAP=host:port uses an existing broker instead of starting one.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
STATE=$(mktemp -d "${TMPDIR:-/tmp}/frs-test.XXXXXX")
export STATE

# prometheus/promtool: the alert-rule tests and the scrape e2e; tcpdump: the loopback
# capture test of the secured bus.
ensure_tools prometheus prometheus promtool prometheus tcpdump tcpdump \
  docker-compose docker-compose kcat kcat
ensure_venv
ensure_npm_tools
deploy/kafka/broker.sh fetch

log "ruff"
"$VENV/bin/ruff" check schemas services tests deploy
log "mypy --strict"
"$VENV/bin/mypy" schemas services
log "architecture contracts (lint-imports; pyproject.toml [tool.importlinter])"
"$VENV/bin/lint-imports"
log "contract: exported schemas match the models, AsyncAPI document validates"
"$PY" -m schemas export --check
node tests/contract/validate-asyncapi.mjs schemas/asyncapi.yaml

own_broker=0
own_pg=0
cleanup() {
  stop_started
  if [ "$own_broker" = 1 ]; then
    FRS_KAFKA_PORT=$KPORT FRS_KAFKA_STATE=$STATE/kafka deploy/kafka/broker.sh stop >&2 || true
  fi
  if [ "$own_pg" = 1 ]; then
    FRS_PG_PORT=$PGPORT FRS_PG_STATE=$PGSTATE/pg deploy/postgres/pg.sh stop >&2 || true
    rm -rf "$PGSTATE"
  fi
  rm -rf "$STATE"
}
trap cleanup EXIT
if [ -z "${FRS_KAFKA_BOOTSTRAP:-}" ]; then
  KPORT=$("$PY" -c 'from tests.conftest import free_port_pair; print(free_port_pair())')
  log "starting Kafka on 127.0.0.1:$KPORT"
  own_broker=1
  FRS_KAFKA_PORT=$KPORT FRS_KAFKA_STATE=$STATE/kafka deploy/kafka/broker.sh start
  export FRS_KAFKA_BOOTSTRAP=127.0.0.1:$KPORT
fi

# PostgreSQL for the shared-state tests (store contracts on both backends, races, roles):
# deploy/postgres/pg.sh (installs Debian's server if missing) in a state dir of its own,
# searchable by the server's OS user, on a free port. FRS_TEST_PG_REQUIRED: here a server
# that cannot start fails those tests instead of skipping them.
PGSTATE=$(mktemp -d "${TMPDIR:-/tmp}/frs-test-pg.XXXXXX")
chmod 0711 "$PGSTATE"
PGPORT=$("$PY" -c 'from tests.helpers import free_port_block; print(free_port_block(1))')
log "starting PostgreSQL on 127.0.0.1:$PGPORT"
own_pg=1
FRS_PG_PORT=$PGPORT FRS_PG_STATE=$PGSTATE/pg deploy/postgres/pg.sh start >/dev/null
export FRS_TEST_PG_STATE=$PGSTATE/pg FRS_TEST_PG_REQUIRED=1

set +e
if [ $# -gt 0 ]; then
  log "pytest $*"
  "$PY" -m pytest -q -p no:cacheprovider "$@"
  rc=$?
else
  # The end-to-end and benchmark tiers each get a broker of their own, so registry
  # entries and consumer groups left by other tiers cannot change what they see.
  log "pytest: unit, integration, contract, chaos"
  "$PY" -m pytest -q -p no:cacheprovider tests --ignore=tests/e2e --ignore=tests/perf \
    --ignore=tests/users
  rc=$?
  # users: up.sh starts its own secured broker, as a user's first run does. The e2e tier
  # runs twice: state in SQLite files, then in PostgreSQL (with the vault on S3).
  for tier in perf e2e e2e:postgresql users; do
    log "pytest: $tier, on a fresh broker"
    store=${tier#*:}
    [ "$store" = "$tier" ] && store=sqlite
    if [ "$own_broker" = 1 ]; then
      env -u FRS_KAFKA_BOOTSTRAP FRS_TEST_STORE="$store" \
        "$PY" -m pytest -q -p no:cacheprovider "tests/${tier%%:*}"
    else
      FRS_TEST_STORE="$store" "$PY" -m pytest -q -p no:cacheprovider "tests/${tier%%:*}"
    fi
    rc2=$?
    [ "$rc" = 0 ] && rc=$rc2
  done
fi
set -e
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
[ "$rc" = 5 ] && echo "no tests were collected" >&2
exit "$rc"

#!/usr/bin/env bash
# Start frs-broker locally: Kafka, every service, then one sample probe through it all.
#   deploy/up.sh          keeps running until Ctrl-C, then stops what it started
#   deploy/up.sh --demo   exits 0 after the sample probe and stops what it started
#   deploy/up.sh --fresh  removes the bus and every service's state first (says what)
#   deploy/up.sh --store postgres   keeps the services' state in PostgreSQL (deploy/postgres/
#                         pg.sh, one role per service) and the vault's ciphertexts in an
#                         S3-compatible server (deploy/s3proxy/s3proxy.sh), as on many hosts:
#                         then only keys stay in a service's state dir. Default: sqlite.
# The bus and the services' state live together in .state/ and are kept together: a second
# run resumes the same bus with the same state. Never a fresh bus with old state.
# Outside roles (upstream, operator, supervisor, auditor) get a client profile each in
# $FRS_PROFILE_DIR (default ~/.config/frs/profiles), so `frs --as ROLE ...` works anywhere.
# The bus is secured by default (TLS, one SCRAM identity per service and role, ACLs from
# services/kit/acls.json); FRS_KAFKA_SECURE=0 runs the plaintext broker instead.
# Installs what is missing first (Debian packages, .venv, Kafka jars). State: .state/
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
demo=0
fresh=0
store=sqlite
usage="usage: deploy/up.sh [--demo] [--fresh] [--store sqlite|postgres]"
while [ $# -gt 0 ]; do
  case "$1" in
    --demo) demo=1 ;;
    --fresh) fresh=1 ;;
    --store) [ $# -ge 2 ] || die "$usage"; store=$2; shift ;;
    --store=*) store=${1#--store=} ;;
    *) die "$usage" ;;
  esac
  shift
done
case "$store" in sqlite|postgres) ;; *) die "--store is sqlite or postgres, not $store" ;; esac
# FRS_UP_STATE moves the whole run (bus and state) elsewhere, e.g. for a test.
STATE=${FRS_UP_STATE:-$ROOT/.state}
export STATE
if [ "$fresh" = 1 ] && [ -d "$STATE" ]; then
  if [ -f "$STATE/kafka/broker.pid" ] && kill -0 "$(cat "$STATE/kafka/broker.pid")" 2>/dev/null; then
    die "a broker from .state is still running (pid $(cat "$STATE/kafka/broker.pid")): stop that deploy/up.sh first"
  fi
  log "--fresh: removing the bus and all state in $STATE: $(cd "$STATE" && ls -A | tr '\n' ' ')"
  rm -rf "$STATE"
fi
# The store is part of the state: a run resumes on the store its state was made with.
if [ -f "$STATE/store" ]; then
  was_store=$(cat "$STATE/store")
elif [ -n "$(ls -A "$STATE" 2>/dev/null | grep -v '^logs$' || true)" ]; then
  was_store=sqlite  # state from before the store was recorded
else
  was_store=$store
fi
[ "$was_store" = "$store" ] || die "the state in $STATE is on $was_store, this run asks for $store: run deploy/up.sh --fresh --store $store"
mkdir -p "$STATE/logs"

ensure_tools
ensure_venv

export FRS_STATE_DIR=$STATE
export FRS_INTAKE_PRIVATE_KEY_FILE=$STATE/keys/intake.key.pem
export FRS_AUDIT_STORE_DIR=$STATE/audit
export FRS_AUDIT_CHECKPOINT_INTERVAL_S=${FRS_AUDIT_CHECKPOINT_INTERVAL_S:-2}
export FRS_KAFKA_PORT=${FRS_KAFKA_PORT:-19092}
export FRS_KAFKA_STATE=$STATE/kafka
secure=${FRS_KAFKA_SECURE:-1}
own_broker=0
# Run a command as one principal of the secured bus: its env file holds the FRS_KAFKA_*
# settings (paths to its certificate, key and password file; no secret itself). exec keeps
# the pid, so start_bg still stops exactly what it started. Plaintext: no identity.
as_principal() {
  local who=$1
  shift
  if [ "$secure" = 1 ] && [ -n "${FRS_KAFKA_STATE:-}" ] && [ -f "$FRS_KAFKA_STATE/secure" ]; then
    set -a
    # shellcheck disable=SC1090
    . "$FRS_KAFKA_STATE/env/$who.env"
    if [ "$who" = intake ]; then
      # The policy gate in the intake process writes decisions as its own principal.
      # shellcheck disable=SC1090
      . <(sed -n 's/^FRS_KAFKA_\(CERT_FILE\|KEY_FILE\|SASL_USERNAME\|SASL_PASSWORD_FILE\)=/FRS_POLICY_KAFKA_\1=/p' \
        "$FRS_KAFKA_STATE/env/policy.env")
    fi
    set +a
  fi
  if [ "$store" = postgres ] && [ -f "${FRS_PG_STATE:-}/env/$who.env" ]; then
    set -a
    # shellcheck disable=SC1090
    . "$FRS_PG_STATE/env/$who.env"  # FRS_STATE_URL and the path of its password file
    set +a
  fi
  exec "$@"
}
own_pg=0
own_s3=0
cleanup() {
  log "stopping services"
  stop_started
  [ "$own_broker" = 1 ] && deploy/kafka/broker.sh stop >&2
  [ "$own_s3" = 1 ] && deploy/s3proxy/s3proxy.sh stop >&2
  [ "$own_pg" = 1 ] && deploy/postgres/pg.sh stop >&2
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${FRS_KAFKA_BOOTSTRAP:-}" ]; then
  own_broker=1
  if [ -f "$FRS_KAFKA_STATE/server.properties" ]; then
    # The bus of an earlier run: resume it, since the services' state in .state is its.
    was=plaintext
    [ -f "$FRS_KAFKA_STATE/secure" ] && was=secured
    now=plaintext
    [ "$secure" = 1 ] && now=secured
    [ "$was" = "$now" ] || die "the bus in .state/kafka is $was, this run asks for $now: run deploy/up.sh --fresh to start over"
    log "resuming the $was bus and the state of the last run (deploy/up.sh --fresh starts over)"
    FRS_PYTHON=$PY deploy/kafka/broker.sh resume
    [ "$secure" = 1 ] || export FRS_KAFKA_BOOTSTRAP=127.0.0.1:$(sed -n 's/^listeners=PLAINTEXT:\/\/127.0.0.1:\([0-9]*\).*/\1/p' "$FRS_KAFKA_STATE/server.properties")
  elif [ "$secure" = 1 ]; then
    [ -z "$(ls -A "$STATE" | grep -v '^logs$' || true)" ] || die "state from an earlier run is in .state without its bus: run deploy/up.sh --fresh"
    log "starting Kafka (secured: TLS, SCRAM, ACLs) on 127.0.0.1:$FRS_KAFKA_PORT"
    FRS_PYTHON=$PY deploy/kafka/broker.sh start --secure
  else
    [ -z "$(ls -A "$STATE" | grep -v '^logs$' || true)" ] || die "state from an earlier run is in .state without its bus: run deploy/up.sh --fresh"
    log "starting Kafka (plaintext) on 127.0.0.1:$FRS_KAFKA_PORT"
    deploy/kafka/broker.sh start
    export FRS_KAFKA_BOOTSTRAP=127.0.0.1:$FRS_KAFKA_PORT
  fi
  if [ "$secure" = 1 ]; then
    (as_principal admin "$PY" -m services.cli topics create >/dev/null)
    (as_principal admin "$PY" -m services.cli acl apply \
      --admin-config "$FRS_KAFKA_STATE/admin.properties")
  fi
else
  secure=0  # someone else's broker: its settings come from the environment
fi
[ "$secure" = 1 ] || "$PY" -m services.cli topics create >/dev/null
echo "$store" >"$STATE/store"

FRS=$VENV/bin/frs
if [ "$store" = postgres ]; then
  # State shared by every instance: PostgreSQL with a role per service, the schema applied
  # by its owner; image ciphertexts in an S3-compatible bucket. The server's OS user must
  # be able to enter the state dir, nobody may list it.
  export FRS_PG_STATE=$STATE/postgres FRS_PG_PORT=${FRS_PG_PORT:-15432}
  chmod 0711 "$STATE"
  log "starting PostgreSQL on 127.0.0.1:$FRS_PG_PORT (state in $FRS_PG_STATE)"
  own_pg=1
  deploy/postgres/pg.sh start >/dev/null
  "$FRS" --as "$FRS_PG_STATE/env/owner.env" db migrate >/dev/null
  export FRS_S3PROXY_STATE=$STATE/s3 FRS_S3PROXY_PORT=${FRS_S3PROXY_PORT:-18089}
  log "starting an S3-compatible server (s3proxy) on 127.0.0.1:$FRS_S3PROXY_PORT for the vault"
  own_s3=1
  deploy/s3proxy/s3proxy.sh start >/dev/null
  export FRS_VAULT_BACKEND=s3 FRS_VAULT_S3_BUCKET=frs-vault \
    FRS_VAULT_S3_ENDPOINT_URL=http://127.0.0.1:$FRS_S3PROXY_PORT \
    AWS_ACCESS_KEY_ID=${FRS_S3PROXY_IDENTITY:-frs-local} \
    AWS_SECRET_ACCESS_KEY=${FRS_S3PROXY_CREDENTIAL:-frs-local-secret} AWS_DEFAULT_REGION=us-east-1
  "$PY" -c 'import os, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["FRS_VAULT_S3_ENDPOINT_URL"])
if "frs-vault" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket="frs-vault")'
fi

# One client profile per outside role: how to reach the bus as that role, and the paths
# its commands need. Plaintext: the same profiles, without an identity. On PostgreSQL the
# auditor reads the audit log where the audit service keeps it.
export FRS_PROFILE_DIR=${FRS_PROFILE_DIR:-${XDG_CONFIG_HOME:-$HOME/.config}/frs/profiles}
for role in upstream operator supervisor auditor; do
  if [ "$secure" = 1 ]; then
    identity=(--env-file "$FRS_KAFKA_STATE/env/$role.env")
  else
    identity=(--set "FRS_KAFKA_BOOTSTRAP=$FRS_KAFKA_BOOTSTRAP")
  fi
  state=()
  if [ "$store" = postgres ] && [ "$role" = auditor ]; then
    reader=$FRS_PG_STATE/env/auditor.env
    [ -f "$reader" ] || reader=$FRS_PG_STATE/env/audit.env
    state=(--set "$(grep '^FRS_STATE_URL=' "$reader")"
           --set "$(grep '^FRS_STATE_PASSWORD_FILE=' "$reader")")
  fi
  "$FRS" profile save "$role" "${identity[@]}" "${state[@]}" \
    --set "FRS_STATE_DIR=$STATE" --set "FRS_AUDIT_STORE_DIR=$FRS_AUDIT_STORE_DIR" \
    --set "FRS_INTAKE_PUBLIC_KEY_FILE=$STATE/keys/intake.key.pub.pem" >/dev/null
done
log "client profiles for upstream, operator, supervisor, auditor in $FRS_PROFILE_DIR"

log "starting a simulated HTTPS vendor that answers on the results webhook"
eval "$("$PY" -m services.simulators.demo --dir "$STATE/demo" --webhook-port "${FRS_DEMO_WEBHOOK_PORT:-8444}" --vendor-port "${FRS_DEMO_VENDOR_PORT:-8443}")"
coproc VENDOR { exec "${VENDOR_CMD[@]}" 2>>"$STATE/logs/vendor.log"; }
STARTED_PIDS+=("$VENDOR_PID")
read -r vendor_line <&"${VENDOR[0]}" || die "the vendor simulator did not start: see .state/logs/vendor.log"
vendor_url=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["url"])' "$vendor_line")

log "starting services (logs in .state/logs/)"
for svc in intake dispatch results audit oversight; do
  start_bg "$svc" "$STATE/logs/$svc.log" as_principal "$svc" "$PY" -m "services.$svc"
done
for _ in $(seq 1 100); do
  [ -f "$STATE/keys/intake.key.pub.pem" ] && [ -f "$STATE/keys/policy-decisions.pub.pem" ] \
    && grep -q '"consumer started"' "$STATE/logs/audit.log" && break
  sleep 0.2
done

as_role() {  # the printed `--as` of a role: a name in the default directory, else a path
  local default=${XDG_CONFIG_HOME:-$HOME/.config}/frs/profiles
  if [ "$FRS_PROFILE_DIR" = "$default" ]; then echo "$1"; else echo "$FRS_PROFILE_DIR/$1.env"; fi
}
UPSTREAM="$FRS --as $(as_role upstream)"
OPERATOR="$FRS --as $(as_role operator)"
SUPERVISOR="$FRS --as $(as_role supervisor)"
AUDITOR="$FRS --as $(as_role auditor)"

# The demo also enrolls the policy gate's public key (made by the intake at its start) in
# frs.registry.trusted_keys: dispatch sends only on decisions signed by an enrolled key.
log "registering a demo case, agent and provider, and trusting the policy gate's key"
$OPERATOR registry demo --endpoint "$vendor_url"
sleep 1  # the services follow the registry topics asynchronously
[ -f "$STATE/sample.jpg" ] || "$PY" -c 'import sys; from skimage import data; from PIL import Image; Image.fromarray(data.astronaut()).save(sys.argv[1], quality=92)' "$STATE/sample.jpg"

log "submitting a sample probe"
request_id=demo-$(date +%s)
$UPSTREAM submit --image "$STATE/sample.jpg" --case CASE-1 --agent agent-7 \
  --purpose human_trafficking --roi ROI-1 --source surveillance --nexus VA \
  --request-id "$request_id"

log "event timeline of $request_id (time, type, topic[partition]@offset, source)"
$AUDITOR timeline "$request_id" --until frs.probe.settled.v1 --wait 90

log "verifying the audit log against its signed checkpoints (frs audit verify)"
sleep "$FRS_AUDIT_CHECKPOINT_INTERVAL_S"  # let the audit service sign the latest leaves
$AUDITOR audit verify --checkpoints-from-kafka
log "accountability report (frs audit report; --format html for a page)"
$AUDITOR audit report

if [ "$demo" = 1 ]; then
  exit 0
fi
if command -v prometheus >/dev/null; then
  log "starting Prometheus on http://127.0.0.1:9090 (rules: deploy/prometheus/alerts.yml)"
  start_bg prometheus "$STATE/logs/prometheus.log" prometheus \
    --config.file=deploy/prometheus/prometheus.yml --storage.tsdb.path="$STATE/prometheus" \
    --web.listen-address=127.0.0.1:9090
fi
# Every command below works pasted as printed, in another shell, from any directory.
cat <<EOF
Running.
  metrics      http://127.0.0.1:9301/metrics (intake, policy) 9302 (dispatch) 9303 (results) 9304 (audit)
  Prometheus   http://127.0.0.1:9090 when installed; dashboard: deploy/grafana/
  logs         $STATE/logs/
  profiles     $FRS_PROFILE_DIR (one per outside role: $FRS profile list)
next steps:
  $UPSTREAM submit --image $STATE/sample.jpg --case CASE-1 --agent agent-7 --purpose human_trafficking --roi ROI-1 --source surveillance --nexus VA
  $AUDITOR timeline $request_id
  $OPERATOR policy explain $request_id
  $SUPERVISOR exigent pending
  $AUDITOR audit verify --checkpoints-from-kafka
  $AUDITOR audit report --format html --out /tmp/frs-report.html
Ctrl-C stops everything this script started.
EOF
wait

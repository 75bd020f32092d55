#!/usr/bin/env bash
# Start frs-broker locally: Kafka, every service, then one sample probe through it all.
#   deploy/up.sh          keeps running until Ctrl-C, then stops what it started
#   deploy/up.sh --demo   exits 0 after the sample probe and stops what it started
# The bus is secured by default (TLS, one SCRAM identity per service and role, ACLs from
# deploy/kafka/acls.json); FRS_KAFKA_SECURE=0 runs the plaintext broker instead.
# Installs what is missing first (Debian packages, .venv, Kafka jars). State: .state/
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
demo=0
[ "${1:-}" = "--demo" ] && demo=1
STATE=$ROOT/.state
export STATE
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
    set +a
  fi
  exec "$@"
}
cleanup() {
  log "stopping services"
  stop_started
  [ "$own_broker" = 1 ] && deploy/kafka/broker.sh stop >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "${FRS_KAFKA_BOOTSTRAP:-}" ]; then
  own_broker=1
  if [ "$secure" = 1 ]; then
    log "starting Kafka (secured: TLS, SCRAM, ACLs) on 127.0.0.1:$FRS_KAFKA_PORT"
    FRS_PYTHON=$PY deploy/kafka/broker.sh start --secure
    (as_principal admin "$PY" -m services.cli topics create >/dev/null)
    (as_principal admin "$PY" -m services.cli acl apply \
      --admin-config "$FRS_KAFKA_STATE/admin.properties")
  else
    log "starting Kafka (plaintext) on 127.0.0.1:$FRS_KAFKA_PORT"
    deploy/kafka/broker.sh start
    export FRS_KAFKA_BOOTSTRAP=127.0.0.1:$FRS_KAFKA_PORT
  fi
else
  secure=0  # someone else's broker: its settings come from the environment
fi
[ "$secure" = 1 ] || "$PY" -m services.cli topics create >/dev/null
rm -rf "$FRS_AUDIT_STORE_DIR"

log "starting a simulated HTTPS vendor that answers on the results webhook"
eval "$("$PY" -m deploy.simulators.demo --dir "$STATE/demo" --webhook-port "${FRS_DEMO_WEBHOOK_PORT:-8444}" --vendor-port "${FRS_DEMO_VENDOR_PORT:-8443}")"
coproc VENDOR { exec "${VENDOR_CMD[@]}" 2>>"$STATE/logs/vendor.log"; }
STARTED_PIDS+=("$VENDOR_PID")
read -r vendor_line <&"${VENDOR[0]}" || die "the vendor simulator did not start: see .state/logs/vendor.log"
vendor_url=$("$PY" -c 'import json,sys; print(json.loads(sys.argv[1])["url"])' "$vendor_line")

log "starting services (logs in .state/logs/)"
for svc in intake dispatch results audit; do
  start_bg "$svc" "$STATE/logs/$svc.log" as_principal "$svc" "$PY" -m "services.$svc"
done
for _ in $(seq 1 100); do
  [ -f "$STATE/keys/intake.key.pub.pem" ] && grep -q '"consumer started"' "$STATE/logs/audit.log" && break
  sleep 0.2
done

log "registering a demo case, agent and provider"
(as_principal operator "$PY" -m services.cli registry demo --endpoint "$vendor_url")
sleep 1  # the services follow the registry topics asynchronously
"$PY" -c 'import sys; from skimage import data; from PIL import Image; Image.fromarray(data.astronaut()).save(sys.argv[1], quality=92)' "$STATE/sample.jpg"

log "submitting a sample probe"
request_id=demo-$(date +%s)
(as_principal upstream "$PY" -m services.cli submit --image "$STATE/sample.jpg" --case CASE-1 --agent agent-7 \
  --purpose human_trafficking --roi ROI-1 --source surveillance --nexus VA \
  --request-id "$request_id" --intake-public-key "$STATE/keys/intake.key.pub.pem")

log "event timeline of $request_id (time, type, topic[partition]@offset, source)"
(as_principal auditor "$PY" -m services.cli timeline "$request_id" \
  --until frs.probe.settled.v1 --wait 90)

log "verifying the audit log against its signed checkpoints (frs audit verify)"
sleep "$FRS_AUDIT_CHECKPOINT_INTERVAL_S"  # let the audit service sign the latest leaves
(as_principal auditor "$PY" -m services.cli audit verify \
  --vkey-file "$STATE/keys/audit-checkpoint.vkey" --checkpoints-from-kafka)
log "accountability report (frs audit report; --format html for a page)"
(as_principal auditor "$PY" -m services.cli audit report)

if [ "$demo" = 1 ]; then
  exit 0
fi
if command -v prometheus >/dev/null; then
  log "starting Prometheus on http://127.0.0.1:9090 (rules: deploy/prometheus/alerts.yml)"
  start_bg prometheus "$STATE/logs/prometheus.log" prometheus \
    --config.file=deploy/prometheus/prometheus.yml --storage.tsdb.path="$STATE/prometheus" \
    --web.listen-address=127.0.0.1:9090
fi
cat <<EOF
Running. Ctrl-C stops everything this script started.
  metrics      http://127.0.0.1:9301/metrics (intake, policy) 9302 (dispatch) 9303 (results) 9304 (audit)
  Prometheus   http://127.0.0.1:9090 when installed; dashboard: deploy/grafana/
  logs         .state/logs/
  audit        frs audit verify --vkey-file .state/keys/audit-checkpoint.vkey
               frs audit report --format html --out report.html
  submit       frs submit --image photo.jpg --case CASE-1 --agent agent-7 --purpose financial_fraud --roi ROI-1 --source mug_shot --intake-public-key .state/keys/intake.key.pub.pem
EOF
wait

#!/usr/bin/env bash
# The chaos tier in full: every fault scenario with >= 1,000 probes in flight, the
# leader kill on the three-node cluster, the skewed-clock purger; each run ends in the
# history check. CI runs the same scenarios in reduced form (tests/chaos, 60 probes).
#   deploy/chaos.sh                    full form (FRS_CHAOS_PROBES=1000)
#   FRS_CHAOS_PROBES=100 deploy/chaos.sh   any size
#   deploy/chaos.sh -k sigkill         pytest arguments narrow the run
# FRS_CHAOS_SEED fixes the random fault points (printed in every scenario's JSON line).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"
ensure_tools
ensure_venv
deploy/kafka/broker.sh fetch
export FRS_CHAOS_PROBES=${FRS_CHAOS_PROBES:-1000}
export FRS_CHAOS_RATE=${FRS_CHAOS_RATE:-100}
export FRS_CHAOS_CLUSTER_MESSAGES=${FRS_CHAOS_CLUSTER_MESSAGES:-20000}
# Every two-of-everything scenario (the suite runs one of them).
export FRS_CHAOS_INSTANCES=${FRS_CHAOS_INSTANCES:-all}
log "chaos tier: $FRS_CHAOS_PROBES probes per scenario at $FRS_CHAOS_RATE/s"
# Each test starts and stops its own brokers (single node, three-node cluster) by pid.
unset FRS_KAFKA_BOOTSTRAP
exec "$PY" -m pytest -q -s -p no:cacheprovider tests/chaos tests/unit/test_chaos_history.py "$@"

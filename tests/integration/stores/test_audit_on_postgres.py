"""The audit service on FRS_STATE_URL=postgresql://…, on the real broker: its leaves, tree,
checkpoints and invariants' state are in the database and no index or segment file is made
(its signing key stays a file); a restart goes on from the same head; the auditor's
commands (verify, proof, report, replay) read the same log as the read-only auditor role;
an unmigrated database stops it at start in one line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from schemas.catalog import AUDITED_TOPICS
from services.kit.migrate import latest
from services.kit.reader import read_topic
from tests.conftest import ROOT, ServiceProcess
from tests.helpers import log_text, wait_for
from tests.integration.audit.conftest import audit_env
from tests.integration.audit.test_audit_log import publish, rejected
from tests.integration.stores import test_services_on_postgres as services_on_pg
from tests.integration.stores.test_audit_store_contract import empty_audit_tables
from tests.integration.stores.test_services_on_postgres import on_postgres, rows
from tests.pg import PgServer

pytestmark = pytest.mark.integration
unmigrated = services_on_pg.unmigrated  # the fixture: a server no migration ran on


def frs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], check=False,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def leaves(server: PgServer) -> int:
    return int(rows(server, "audit", "SELECT COUNT(*) FROM audit_leaves")[0][0])


def test_the_audit_log_lives_in_the_database_and_the_auditor_reads_it(
        services: dict[str, ServiceProcess], service_env: dict[str, str],
        kafka_bootstrap: str, pg_migrated: PgServer) -> None:
    empty_audit_tables(pg_migrated)
    env = {**audit_env(service_env, FRS_AUDIT_CHECKPOINT_EVERY_N="20"),
           **on_postgres(pg_migrated, "audit")}
    audit = services["audit"]
    audit.env = env
    run = uuid.uuid4().hex[:8]
    audit.start()
    audit.wait_log("consumer started", timeout=60)
    asyncio.run(publish(kafka_bootstrap, [rejected(i, run) for i in range(60)]))
    expected = len(asyncio.run(read_topic(kafka_bootstrap, [t.name for t in AUDITED_TOPICS])))
    wait_for(lambda: leaves(pg_migrated) >= expected, timeout=120, what="leaves in PostgreSQL")
    assert audit.stop() == 0
    # Again from the same head: nothing twice, the next leaf follows the last.
    audit.start()
    audit.wait_log("consumer started", timeout=60, count=2)  # the log file is appended to
    asyncio.run(publish(kafka_bootstrap, [rejected(i, run) for i in range(60, 70)]))
    wait_for(lambda: rows(pg_migrated, "audit", "SELECT 1 FROM audit_leaves WHERE subject"
                          " = %s", f"prb-{run}-69"), timeout=120, what="more leaves")
    wait_for(lambda: rows(pg_migrated, "audit", "SELECT COUNT(*) FROM audit_checkpoints"
                          )[0][0] > 0, timeout=60, what="a checkpoint")
    assert audit.stop() == 0
    # Its own checkpoints come back as leaves too.
    ((count, distinct, first, last),) = rows(
        pg_migrated, "audit", "SELECT COUNT(*), COUNT(DISTINCT (topic, partition, \"offset\")),"
        " MIN(idx), MAX(idx) FROM audit_leaves")
    assert count >= expected + 10 and (distinct, first, last) == (count, 0, count - 1)

    state, store_dir = Path(env["FRS_STATE_DIR"]), Path(env["FRS_AUDIT_STORE_DIR"])
    made = {p.relative_to(state).as_posix() for p in state.rglob("*") if p.is_file()}
    assert made == {"keys/audit-checkpoint.pem", "keys/audit-checkpoint.vkey"}, made
    assert not store_dir.exists() or not any(store_dir.iterdir())

    vkey = (state / "keys" / "audit-checkpoint.vkey").read_text().strip()
    env = {**env, **on_postgres(pg_migrated, "auditor")}  # the auditors' read-only role
    verify = frs("audit", "verify", "--json", "--vkey", vkey, env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    out = json.loads(verify.stdout)
    assert out["ok"] and out["tree_size"] == count and out["checkpoints"] >= 1
    event_id = rows(pg_migrated, "audit", "SELECT ce_id FROM audit_leaves WHERE subject = %s",
                    f"prb-{run}-3")[0][0]
    proof = frs("audit", "proof", event_id, env=env)
    assert proof.returncode == 0, proof.stdout + proof.stderr
    bundle = Path(env["FRS_STATE_DIR"]).parent / "proof.json"
    bundle.write_text(proof.stdout)
    checked = frs("audit", "verify-proof", str(bundle), "--vkey", vkey, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report = frs("audit", "report", "--json", env=env)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["log_size"] == count
    # Replay against a running service: what it published as it stopped (its last
    # checkpoint, violations over an old broker's history) is recorded once it runs again.
    audit.start()
    audit.wait_log("consumer started", timeout=60, count=3)
    try:
        replay = frs("audit", "replay", "--json", "--wait", "30", env=env)
    finally:
        assert audit.stop() == 0
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert json.loads(replay.stdout)["missing_count"] == 0
    for text in (verify.stdout, verify.stderr, replay.stderr, log_text(audit.log_path)):
        assert pg_migrated.password("audit") not in text
        assert pg_migrated.password("auditor") not in text


def test_the_audit_service_stops_at_start_on_a_schema_it_was_not_built_for(
        services: dict[str, ServiceProcess], service_env: dict[str, str],
        unmigrated: PgServer) -> None:
    audit = services["audit"]
    audit.env = {**audit_env(service_env), **on_postgres(unmigrated, "audit")}
    audit.start()
    assert audit.proc is not None
    assert audit.proc.wait(timeout=120) == 1
    text = log_text(audit.log_path)
    wanted = f"database schema is at 0, this build needs {latest()}: run frs db migrate"
    assert text.count(wanted) == 1 and "Traceback" not in text
    assert unmigrated.password("audit") not in text
    verify = frs("audit", "verify", "--vkey", "x+00000000+AAAA", env=audit.env)
    assert verify.returncode == 2 and wanted in verify.stderr

"""The audit service on a real broker: crash safety, replay agreement, and checkpoints
that Go's golang.org/x/mod/sumdb/note accepts."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from schemas.catalog import AUDITED_TOPICS
from schemas.envelope import Envelope
from schemas.events import CheckpointPublished, ProbeRejected, RejectReason
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from tests.conftest import ROOT, ServiceProcess
from tests.helpers import wait_for
from tests.integration.audit.conftest import audit_env, store_size

pytestmark = pytest.mark.integration
GO = shutil.which("go") or "/usr/local/go/bin/go"


def frs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], check=False,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def rejected(i: int, run: str) -> ProbeRejected:
    return ProbeRejected(probe_id=f"prb-{run}-{i}", request_id=f"req-{run}-{i}",
                         reason=RejectReason.NO_FACE, detail="test event")


async def publish(bootstrap: str, events: list[ProbeRejected]) -> None:
    async with Publisher(bootstrap, source="/frs/test") as publisher:
        await publisher.publish(events)


def test_sigkill_mid_stream_keeps_every_event_exactly_once(
        services: dict[str, ServiceProcess], service_env: dict[str, str],
        kafka_bootstrap: str) -> None:
    env = audit_env(service_env, FRS_AUDIT_BATCH_MAX="50", FRS_AUDIT_CHECKPOINT_EVERY_N="100")
    audit = services["audit"]
    audit.env = env
    store_dir = Path(env["FRS_AUDIT_STORE_DIR"])
    run = uuid.uuid4().hex[:8]
    total = 3000
    audit.start()
    audit.wait_log("consumer started")
    asyncio.run(publish(kafka_bootstrap, [rejected(i, run) for i in range(total // 2)]))
    # Kill while the service is still working through the stream.
    wait_for(lambda: store_size(store_dir) > 200, what="first leaves")
    assert audit.kill() == -9
    killed_at = store_size(store_dir)
    asyncio.run(publish(kafka_bootstrap, [rejected(i, run) for i in range(total // 2, total)]))
    audit.start()
    expected = len(asyncio.run(read_topic(kafka_bootstrap, [t.name for t in AUDITED_TOPICS])))
    wait_for(lambda: store_size(store_dir) >= expected, timeout=120, what="all leaves")
    assert killed_at < expected

    replay = frs("audit", "replay", "--json", "--wait", "30", env=env)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    out = json.loads(replay.stdout)
    assert out["ok"] and out["missing_count"] == 0 and not out["duplicate_ids"]
    assert out["topic_records"] >= total
    # Each of this run's events is in the store once.
    from services.audit.store import AuditStore
    store = AuditStore(store_dir, readonly=True)
    subjects = [r.subject for r in store.rows() if (r.subject or "").startswith(f"prb-{run}-")]
    store.close()
    assert len(subjects) == total == len(set(subjects))

    audit.stop()
    # The published checkpoints too: the topic is the copy the operator cannot edit.
    verify = frs("audit", "verify", "--json", "--checkpoints-from-kafka", env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    store = AuditStore(store_dir, readonly=True)
    stored = len(store.checkpoints())
    store.close()
    assert json.loads(verify.stdout)["checkpoints"] > stored >= 1


def test_replay_finds_an_event_missing_from_the_store(
        services: dict[str, ServiceProcess], service_env: dict[str, str],
        kafka_bootstrap: str) -> None:
    env = audit_env(service_env)
    audit = services["audit"]
    audit.env = env
    store_dir = Path(env["FRS_AUDIT_STORE_DIR"])
    audit.start()
    asyncio.run(publish(kafka_bootstrap, [rejected(0, uuid.uuid4().hex[:8])]))
    expected = len(asyncio.run(read_topic(kafka_bootstrap, [t.name for t in AUDITED_TOPICS])))
    wait_for(lambda: store_size(store_dir) >= expected, what="leaves")
    audit.stop()
    import sqlite3
    con = sqlite3.connect(store_dir / "index.sqlite3")
    where = "idx = (SELECT MAX(idx) FROM leaves WHERE topic = 'frs.probe.events')"
    topic, partition, offset = con.execute(
        f'SELECT topic, partition, "offset" FROM leaves WHERE {where}').fetchone()
    con.execute(f"DELETE FROM leaves WHERE {where}")
    con.commit()
    con.close()
    # A forged candidate list published while no audit service runs: replay runs the
    # invariants again on the topics and finds the violation nobody reported.
    from tests.integration.audit.test_audit_invariants import candidates, publish_forged
    eid = publish_forged(kafka_bootstrap, candidates(f"prb-unseen-{uuid.uuid4()}"),
                         lead_marking="MATCH")
    replay = frs("audit", "replay", "--json", env=env)
    assert replay.returncode == 1
    out = json.loads(replay.stdout)
    # The deleted leaf and the forged record (plus whatever the stopped service published
    # last, such as its final checkpoint, which it never consumed back).
    assert f"{topic}[{partition}]@{offset}" in out["missing"]
    assert any(m.startswith("frs.results.events[") for m in out["missing"])
    assert {"offending_event_id": eid, "invariant": "candidates_without_lead_marking"} \
        in out["unreported_violations"]


def test_checkpoint_verifies_with_go_note_package(
        services: dict[str, ServiceProcess], service_env: dict[str, str],
        kafka_bootstrap: str, tmp_path: Path) -> None:
    env = audit_env(service_env, FRS_AUDIT_CHECKPOINT_EVERY_N="1")
    audit = services["audit"]
    audit.env = env
    audit.start()
    asyncio.run(publish(kafka_bootstrap, [rejected(0, uuid.uuid4().hex[:8])]))
    vkey_file = Path(env["FRS_STATE_DIR"]) / "keys" / "audit-checkpoint.vkey"

    def published() -> list[CheckpointPublished]:
        records = asyncio.run(read_topic(kafka_bootstrap, ["frs.audit.checkpoints"]))
        vkey = vkey_file.read_text().strip() if vkey_file.exists() else ""
        name = vkey.split("+")[0]
        return [d.event for _, d in records if isinstance(d, Envelope)
                and isinstance(d.event, CheckpointPublished) and vkey
                and f"\u2014 {name} " in d.event.note and d.event.tree_size > 0
                and d.source == "/frs/audit" and _signed_by(d.event.note, vkey)]

    checkpoint = wait_for(published, what="a published checkpoint")[-1]
    vkey = vkey_file.read_text().strip()
    binary = tmp_path / "noteverify"
    build = subprocess.run([GO, "build", "-o", str(binary), "."], check=False,
                           cwd=ROOT / "tests" / "go" / "noteverify", capture_output=True,
                           text=True, timeout=600, env={**os.environ, "GOFLAGS": "-mod=mod"})
    if build.returncode != 0 and ("proxy.golang.org" in build.stderr
                                  or "dial tcp" in build.stderr):
        pytest.skip(f"Go module proxy unreachable: {build.stderr.strip()[:200]}")
    assert build.returncode == 0, build.stderr
    note = tmp_path / "checkpoint.note"
    note.write_text(checkpoint.note)
    ok = subprocess.run([str(binary), vkey, str(note)], check=False, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"size={checkpoint.tree_size}" in ok.stdout
    # One byte of the body changed: the root hash's first character.
    body = checkpoint.note.split("\n")
    root = body[2]
    body[2] = ("A" if root[0] != "A" else "B") + root[1:]
    note.write_text("\n".join(body))
    bad = subprocess.run([str(binary), vkey, str(note)], check=False, capture_output=True,
                         text=True)
    assert bad.returncode == 1, bad.stdout
    assert "invalid signature" in bad.stderr or "verification failure" in bad.stderr \
        or "rejected" in bad.stderr


def _signed_by(note: str, vkey: str) -> bool:
    from services.audit.checkpoint import CheckpointError, Verifier, open_checkpoint
    try:
        open_checkpoint(note, Verifier.parse(vkey))
    except CheckpointError:
        return False
    return True


def test_kill_after_effects_before_commit_redelivery_is_recognized(
        services: dict[str, ServiceProcess], service_env: dict[str, str],
        kafka_bootstrap: str) -> None:
    """The kit's fault switch SIGKILLs the service after a batch's effects (leaves fsynced,
    violation published) and before the offsets are committed: the restarted service gets
    the same records again, appends none twice and reports the violation once."""
    from tests.integration.audit.conftest import violations
    from tests.integration.audit.test_audit_invariants import candidates, publish_forged

    env = audit_env(service_env)
    audit = services["audit"]
    audit.env = env
    store_dir = Path(env["FRS_AUDIT_STORE_DIR"])
    probe_id = f"prb-fault-{uuid.uuid4()}"
    eid = publish_forged(kafka_bootstrap, candidates(probe_id), lead_marking="MATCH")
    audit.start(FRS_AUDIT_FAULT_KILL_BEFORE_COMMIT="true")
    assert audit.proc is not None
    assert audit.proc.wait(timeout=120) == -9  # killed itself once it had a violation out
    assert "fault injection: SIGKILL before commit" in audit.log_path.read_text()
    killed_at = store_size(store_dir)
    assert killed_at > 0
    audit.start()
    expected = len(asyncio.run(read_topic(kafka_bootstrap, [t.name for t in AUDITED_TOPICS])))
    wait_for(lambda: store_size(store_dir) >= expected, timeout=120, what="all leaves")
    replay = frs("audit", "replay", "--json", "--wait", "30", env=env)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    from services.audit.store import AuditStore
    store = AuditStore(store_dir, readonly=True)
    coords = [(r.topic, r.partition, r.offset) for r in store.rows()]
    ids = [r.ce_id for r in store.rows() if r.ce_id == eid]
    store.close()
    assert len(coords) == len(set(coords)) and ids == [eid]
    # Published once before the kill, and not again for the redelivered record.
    assert [v.offending_event_id for v in violations(kafka_bootstrap)].count(eid) == 1
    assert audit.log_path.read_text().count("fault injection") == 1

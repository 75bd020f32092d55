"""Probes through the running pipeline (intake, policy, dispatch, results) while the
audit service is SIGKILLed mid-stream and restarted: every event lands in the log
exactly once, replay agrees, verify passes, and no image bytes reach the log."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.catalog import TOPICS
from schemas.envelope import Envelope
from schemas.events import (
    AgentRecord,
    CaseRecord,
    ProbeRejected,
    ProbeRequested,
    ProbeSubmitted,
    ProviderRecord,
)
from schemas.types import ImageSource, Purpose, probe_id_for
from services.audit.store import AuditStore
from services.cli.client import submit_probe
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from tests.conftest import ServiceProcess
from tests.helpers import wait_for
from tests.integration.audit.conftest import audit_env, store_size
from tests.integration.audit.test_audit_log import frs

pytestmark = pytest.mark.integration


async def seed(bootstrap: str) -> None:
    now = datetime.now(UTC)
    year = now + timedelta(days=365)
    async with Publisher(bootstrap, source="/frs/test") as publisher:
        await publisher.publish([
            CaseRecord(case_id="CASE-AUD", status="open",
                       offense_category=Purpose.FINANCIAL_FRAUD, roi_refs=["ROI-1"],
                       updated_at=now),
            AgentRecord(agent_id="agent-aud", role="agent", training_valid_until=year,
                        updated_at=now),
            ProviderRecord(provider_id="fed-aud", name="Federal gallery (test)", kind="federal",
                           transport="https", endpoint="https://127.0.0.1:1/search",
                           attestation_valid_until=year, updated_at=now),
        ])


async def submit(bootstrap: str, key: Path, image: bytes, request_ids: list[str]) -> None:
    for rid in request_ids:
        await submit_probe(bootstrap, key, image, request_id=rid, case_id="CASE-AUD",
                           agent_id="agent-aud", purpose=Purpose.FINANCIAL_FRAUD,
                           roi_refs=["ROI-1"], image_source=ImageSource.SURVEILLANCE)


def pipeline_events(bootstrap: str, subjects: set[str]) -> list[tuple[str, str]]:
    """(subject, type) of every event about these probes on the event topics."""
    topics = [t.name for t in TOPICS if not t.name.startswith(("frs.registry.", "frs.dlq."))]
    return [(str(d.subject), d.type) for _, d in asyncio.run(read_topic(bootstrap, topics))
            if isinstance(d, Envelope) and d.subject in subjects]


def settled(bootstrap: str, request_ids: list[str], seen: list[int]) -> bool:
    """Every probe has an intake outcome and nothing new arrived since the last look
    (whatever the services downstream do with it)."""
    probe_ids = {probe_id_for(r) for r in request_ids}
    events = pipeline_events(bootstrap, probe_ids | set(request_ids))
    outcomes = {s for s, t in events if t in (ProbeSubmitted.TYPE, ProbeRejected.TYPE)}
    seen.append(len(events))
    return outcomes == probe_ids and len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]


def test_pipeline_with_audit_killed_mid_stream(
        services: dict[str, ServiceProcess], service_env: dict[str, str],
        kafka_bootstrap: str, face_jpeg: bytes) -> None:
    env = audit_env(service_env, FRS_AUDIT_BATCH_MAX="5")
    store_dir = Path(env["FRS_AUDIT_STORE_DIR"])
    asyncio.run(seed(kafka_bootstrap))
    for name in ("intake", "dispatch", "results"):
        services[name].start()
    audit = services["audit"]
    audit.env = env
    audit.start()
    key = Path(service_env["FRS_INTAKE_PRIVATE_KEY_FILE"]).with_suffix(".pub.pem")
    wait_for(key.exists, what="the intake's public key")
    for name in ("intake", "dispatch", "results"):
        services[name].wait_log("consumer started")

    run = uuid.uuid4().hex[:8]
    request_ids = [f"req-aud-{run}-{i}" for i in range(24)]
    probe_ids = {probe_id_for(r) for r in request_ids}
    asyncio.run(submit(kafka_bootstrap, key, face_jpeg, request_ids[:12]))
    wait_for(lambda: store_size(store_dir) > 20, what="first leaves")
    assert audit.kill() == -9
    asyncio.run(submit(kafka_bootstrap, key, face_jpeg, request_ids[12:]))
    audit.start()
    seen: list[int] = []
    wait_for(lambda: settled(kafka_bootstrap, request_ids, seen), timeout=180,
             what="every probe through the pipeline")

    replay = frs("audit", "replay", "--json", "--wait", "60", env=env)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert json.loads(replay.stdout)["ok"]

    one = probe_id_for(request_ids[3])
    probe_replay = frs("audit", "replay", "--json", "--probe", one, env=env)
    assert probe_replay.returncode == 0, probe_replay.stdout + probe_replay.stderr
    steps = json.loads(probe_replay.stdout)["timeline"]
    assert steps[0]["type"] == ProbeRequested.TYPE and len(steps) >= 3
    assert all(e["in_audit_log"] for e in steps)
    case_replay = frs("audit", "replay", "--json", "--case", "CASE-AUD", env=env)
    assert case_replay.returncode == 0
    assert {e["subject"] for e in json.loads(case_replay.stdout)["timeline"]} >= probe_ids

    store = AuditStore(store_dir, readonly=True)
    rows = [r for r in store.rows() if r.subject in probe_ids | set(request_ids)]
    segment = b"".join(store.leaves())
    store.close()
    # Each event about these probes is in the log exactly once (DLQ copies aside), and
    # the log holds each probe's whole story as the topics tell it.
    in_log = Counter(r.ce_id for r in rows if not r.topic.startswith("frs.dlq."))
    assert in_log and set(in_log.values()) == {1}
    told = Counter(pipeline_events(kafka_bootstrap, probe_ids | set(request_ids)))
    logged = Counter((str(r.subject), str(r.ce_type)) for r in rows
                     if not r.topic.startswith("frs.dlq."))
    assert logged == told
    for rid in request_ids:
        assert told[(rid, ProbeRequested.TYPE)] == 1
        assert len([1 for (s, _t) in told if s == probe_id_for(rid)]) >= 2
    # The encrypted images never reach the log: only their digests do.
    requests = [d.event for _, d in asyncio.run(read_topic(kafka_bootstrap,
                                                           ["frs.probe.requests"]))
                if isinstance(d, Envelope) and isinstance(d.event, ProbeRequested)
                and d.event.request_id in request_ids]
    assert len(requests) == 24
    for r in requests:
        assert r.image.ciphertext[:64].encode() not in segment
    violations = [v for v in asyncio.run(read_topic(kafka_bootstrap, ["frs.audit.violations"]))
                  if isinstance(v[1], Envelope) and v[1].subject in probe_ids]
    assert violations == []

    audit.stop()
    verify = frs("audit", "verify", "--json", env=env)
    assert verify.returncode == 0, verify.stdout
    assert json.loads(verify.stdout)["ok"]

"""The whole pipeline on a real broker: `frs submit` to a settled probe whose candidates are
marked as leads, every event recorded once by the audit service, and the log verifies."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from schemas.answers import ANSWER_FIELDS, CANDIDATE_FIELDS
from schemas.events import LEAD_MARKING
from schemas.types import probe_id_for
from services.simulators.answers import OVERSHARED_MARK
from tests.e2e.conftest import System

pytestmark = pytest.mark.integration

FLOW = [
    "frs.probe.requested.v1",
    "frs.probe.submitted.v1",
    "frs.policy.cleared.v1",
    "frs.provider.dispatched.v1",
    "frs.provider.answered.v1",
    "frs.candidates.received.v1",
    "frs.probe.settled.v1",
]


def test_probe_flows_through_every_service_and_audit_records_it(
    system: System, tmp_path: Path, face_jpeg: bytes
) -> None:
    demo = system.frs("registry", "demo", "--endpoint", system.vendor_url)
    assert demo.returncode == 0, demo.stderr
    time.sleep(1.5)  # services follow the registry topics asynchronously
    image = tmp_path / "face.jpg"
    image.write_bytes(face_jpeg)
    request_id = f"req-{uuid.uuid4()}"
    key = Path(system.env["FRS_INTAKE_PRIVATE_KEY_FILE"]).with_suffix(".pub.pem")
    submitted = system.frs("submit", "--json", "--image", str(image), "--case", "CASE-1",
                           "--agent", "agent-7", "--purpose", "human_trafficking", "--roi",
                           "ROI-1", "--source", "surveillance", "--nexus", "VA",
                           "--request-id", request_id, "--intake-public-key", str(key))
    assert submitted.returncode == 0, submitted.stderr
    probe_id = probe_id_for(request_id)
    assert json.loads(submitted.stdout)["probe_id"] == probe_id

    timeline = system.frs("timeline", request_id, "--json", "--until", FLOW[-1],
                          "--wait", "90")
    assert timeline.returncode == 0, timeline.stderr + system.services["dispatch"].log_path \
        .read_text()[-2000:]
    events = json.loads(timeline.stdout)
    # Other tests may leave more providers registered: each step appears, in flow order.
    first = {t: next(i for i, e in enumerate(events) if e["type"] == t) for t in FLOW
             if any(e["type"] == t for e in events)}
    assert list(first) == FLOW and sorted(first.values()) == list(first.values()), events
    # Each step names the event it came from: the chain can be rebuilt from the log.
    ids = {e["id"] for e in events}
    assert all(e["causationid"] in ids for e in events[1:] if e["causationid"])

    # The audit service records every one of them, each exactly once.
    system.wait_recorded(ids)
    system.services["audit"].stop()
    store = system.audit_log()
    recorded = [r.ce_id for r in store.rows()]
    store_text = store.leaves()
    leaves = [json.loads(leaf) for leaf in store_text]
    store.close()
    assert ids <= set(recorded)
    assert len(recorded) == len(set(recorded))
    candidates = [leaf["data"] for leaf in leaves
                  if leaf.get("type") == "frs.candidates.received.v1"
                  and leaf.get("subject") == probe_id]
    assert candidates and all(c["lead_marking"] == LEAD_MARKING for c in candidates)
    assert all(c["candidates"] for c in candidates)
    # The simulated vendor overshares (photos, names, its own trace): nothing of it is in
    # the permanent log, only the allowed fields and the raw answer's digest.
    answers = [leaf["data"] for leaf in leaves if leaf.get("type") == "frs.provider.answered.v1"]
    assert answers, "no provider answer in the log"
    for answer in answers:
        assert set(answer["payload"]) <= ANSWER_FIELDS, answer["payload"].keys()
        for candidate in answer["payload"].get("candidates", []):
            assert set(candidate) <= CANDIDATE_FIELDS, candidate.keys()
        # (the webhook strips photos before the answer is built; the rest is named here)
        assert answer["raw_sha256"] and {"vendor_trace", "candidates[].subject"} <= set(
            answer["dropped_fields"]), answer["dropped_fields"]
    assert not [leaf for leaf in store_text if OVERSHARED_MARK.encode() in leaf]

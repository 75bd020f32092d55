"""A request id is bound to its request's content, on the real broker and across an
intake restart: the same id with the same photo (re-encrypted) gets the same outcome, the
same id with other content gets `request_id_reused`, and `frs submit` waits for the
outcome and exits by it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.catalog import PROBE_EVENTS
from schemas.envelope import Envelope
from schemas.events import ProbeRejected, ProbeSubmitted, RejectReason
from schemas.types import ImageSource, Purpose, probe_id_for, reused_probe_id
from services.cli.client import Submission, submit_and_wait
from services.kit.reader import read_topic
from tests import intake_samples as s
from tests.conftest import ROOT, ServiceProcess
from tests.integration.intake_support import new_id, public_key_file, start_intake

pytestmark = pytest.mark.integration


async def submit(bootstrap: str, env: dict[str, str], image: bytes, request_id: str,
                 purpose: Purpose = Purpose.HUMAN_TRAFFICKING) -> Submission:
    return await submit_and_wait(
        bootstrap, public_key_file(env), image, wait_s=60.0, request_id=request_id,
        case_id="CASE-BIND", agent_id="agent-7", purpose=purpose, roi_refs=["ROI-1"],
        image_source=ImageSource.SURVEILLANCE, nexus=["VA"])


def frs_submit(env: dict[str, str], image: Path, request_id: str, *extra: str,
               purpose: str = "financial_fraud") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "submit", "--image", str(image),
         "--case", "CASE-BIND", "--agent", "agent-7", "--purpose", purpose, "--roi", "ROI-1",
         "--source", "surveillance", "--nexus", "VA", "--request-id", request_id,
         "--intake-public-key", str(public_key_file(env)), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


async def test_a_reused_request_id_is_rejected_after_a_restart(
    kafka_bootstrap: str, services: dict[str, ServiceProcess], service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    intake = start_intake(services)
    request_id = new_id("req-bind")
    first = await submit(kafka_bootstrap, service_env, s.face_jpeg(), request_id)
    assert isinstance(first.outcome, ProbeSubmitted), first.outcome
    assert first.outcome.probe_id == probe_id_for(request_id)

    # The stack restarts; its outcome log stays.
    assert intake.stop() == 0
    start_intake(services, count=2)
    # A client retry: the same photo and fields, encrypted afresh.
    retry = await submit(kafka_bootstrap, service_env, s.face_jpeg(), request_id)
    assert retry.request.image.ciphertext != first.request.image.ciphertext
    assert retry.outcome == first.outcome
    # The old id with another purpose and another photo: refused, under its own probe id.
    reused = await submit(kafka_bootstrap, service_env, s.face_png(), request_id,
                          purpose=Purpose.FINANCIAL_FRAUD)
    assert isinstance(reused.outcome, ProbeRejected), reused.outcome
    assert reused.outcome.reason is RejectReason.REQUEST_ID_REUSED
    assert reused.outcome.probe_id == reused_probe_id(request_id)

    # `frs submit` waits for the outcome: exit 1 with the reason, in text and in JSON.
    image = tmp_path / "other.png"
    image.write_bytes(s.face_png())
    done = frs_submit(service_env, image, request_id)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "request_id_reused" in done.stdout
    done = frs_submit(service_env, image, request_id, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert (answer["outcome"], answer["reason"]) == ("rejected", "request_id_reused")
    assert answer["probe_id"] == reused_probe_id(request_id)
    # A new id for the same content is a new probe: exit 0.
    fresh = new_id("req-bind")
    done = frs_submit(service_env, image, fresh, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == {
        "request_id": fresh, "probe_id": probe_id_for(fresh), "outcome": "submitted",
        "reason": None, "detail": None}

    # Nothing but the original outcome ever named the original probe.
    original = [d.event for _r, d in await read_topic(kafka_bootstrap, [PROBE_EVENTS.name])
                if isinstance(d, Envelope) and d.subject == probe_id_for(request_id)]
    assert original == [first.outcome, first.outcome]

    # No outcome within the bound (the intake is down): exit 1, one line on stderr.
    assert intake.stop() == 0
    done = frs_submit(service_env, image, new_id("req-bind"), "--wait", "2")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no outcome for request" in done.stderr
    done = frs_submit(service_env, image, new_id("req-bind"), "--no-wait")
    assert done.returncode == 0 and "not waiting" in done.stdout, done.stderr

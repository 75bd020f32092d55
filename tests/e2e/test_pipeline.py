"""The whole pipeline on a real broker: `frs submit` to candidates, recorded by audit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from schemas.types import probe_id_for
from services.audit.store import AuditStore
from tests.conftest import ROOT, ServiceProcess

pytestmark = pytest.mark.integration

FLOW = [
    "frs.probe.requested.v1",
    "frs.probe.submitted.v1",
    "frs.policy.cleared.v1",
    "frs.provider.dispatched.v1",
    "frs.candidates.received.v1",
]


def frs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_probe_flows_through_every_service_and_audit_records_it(
    services: dict[str, ServiceProcess], service_env: dict[str, str], tmp_path: Path,
    face_jpeg: bytes,
) -> None:
    for svc in services.values():
        svc.start()
    for svc in services.values():
        svc.wait_log('"consumer started"', timeout=60)
    assert frs("registry", "demo", env=service_env).returncode == 0
    image = tmp_path / "face.jpg"
    image.write_bytes(face_jpeg)
    request_id = f"req-{uuid.uuid4()}"
    key = Path(service_env["FRS_INTAKE_PRIVATE_KEY_FILE"]).with_suffix(".pub.pem")
    submitted = frs("submit", "--json", "--image", str(image), "--case", "CASE-1",
                    "--agent", "agent-7", "--purpose", "human_trafficking", "--roi", "ROI-1",
                    "--source", "surveillance", "--nexus", "VA", "--request-id", request_id,
                    "--intake-public-key", str(key), env=service_env)
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["probe_id"] == probe_id_for(request_id)

    timeline = frs("timeline", request_id, "--json", "--until", FLOW[-1], "--wait", "60",
                   env=service_env)
    assert timeline.returncode == 0, timeline.stderr
    events = json.loads(timeline.stdout)
    # Other tests may leave more providers registered: each step appears, in flow order.
    first = {t: next(i for i, e in enumerate(events) if e["type"] == t) for t in FLOW
             if any(e["type"] == t for e in events)}
    assert list(first) == FLOW and sorted(first.values()) == list(first.values())
    # Each step names the event it came from: the chain can be rebuilt from the log.
    ids = {e["id"] for e in events}
    assert all(e["causationid"] in ids for e in events[1:] if e["causationid"])

    # The audit service records every one of them, each exactly once.
    store_dir = Path(service_env["FRS_AUDIT_STORE_DIR"])
    deadline = time.monotonic() + 30
    while True:
        services["audit"].stop()
        store = AuditStore(store_dir)
        recorded = [r.ce_id for r in store.rows()]
        store.close()
        if ids <= set(recorded) or time.monotonic() > deadline:
            break
        services["audit"].start()
        time.sleep(2)
    assert ids <= set(recorded)
    assert len(recorded) == len(set(recorded))

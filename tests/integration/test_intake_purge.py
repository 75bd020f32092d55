"""TTL purge on the real broker: a closed case purges its probes within one sweep, purged
ciphertexts cannot be decrypted from copies, and a purger killed mid-sweep finishes it."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import pytest

from schemas.catalog import PROBE_EVENTS
from schemas.envelope import Envelope
from schemas.events import CaseRecord, ImagePurged, ProbeSubmitted, PurgeReason
from schemas.types import Purpose, utcnow
from services.kit.reader import read_topic
from services.vault import ObjectPurged, SqliteVaultIndex
from tests import intake_samples as s
from tests.conftest import ServiceProcess
from tests.helpers import metrics_port, wait_for_async
from tests.integration.intake_support import (
    files_under,
    make_request,
    new_id,
    open_vault,
    outcomes,
    publish,
    start_intake,
)

pytestmark = pytest.mark.integration


def case(case_id: str, status: str) -> CaseRecord:
    return CaseRecord(case_id=case_id, status=status,  # type: ignore[arg-type]
                      offense_category=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"],
                      updated_at=utcnow())


async def purged_events(bootstrap: str, probe_ids: set[str]) -> list[ImagePurged]:
    found: list[ImagePurged] = []

    async def all_purged() -> bool:
        nonlocal found
        found = [d.event for _r, d in await read_topic(bootstrap, [PROBE_EVENTS.name])
                 if isinstance(d, Envelope) and isinstance(d.event, ImagePurged)
                 and d.event.probe_id in probe_ids]
        return {e.probe_id for e in found} == probe_ids

    await wait_for_async(all_purged, timeout=60.0, interval=0.3,
                         what=lambda: f"ImagePurged for all {len(probe_ids)} probes; "
                         f"saw {len({e.probe_id for e in found})}")
    return found


async def test_closed_case_purges_its_probes_within_one_sweep(
    kafka_bootstrap: str, services: dict[str, ServiceProcess], service_env: dict[str, str]
) -> None:
    interval = 2.0
    closing, staying = new_id("CASE-CLOSE"), new_id("CASE-OPEN")
    await publish(kafka_bootstrap, [case(closing, "open"), case(staying, "open")])
    intake = start_intake(services, FRS_INTAKE_PURGE_INTERVAL_S=str(interval))
    reqs = [make_request(service_env, s.face_jpeg(), case_id=closing) for _ in range(2)]
    other = make_request(service_env, s.face_jpeg(), case_id=staying)
    await publish(kafka_bootstrap, [*reqs, other])
    got = await outcomes(kafka_bootstrap, [r.request_id for r in [*reqs, other]])
    submitted = {r.request_id: got[r.request_id][0].event for r in [*reqs, other]}
    assert all(isinstance(e, ProbeSubmitted) for e in submitted.values())

    state = Path(service_env["FRS_STATE_DIR"])
    vault = open_vault(state)
    refs = [submitted[r.request_id].vault_ref for r in reqs]  # type: ignore[union-attr]
    # A backup taken before the purge: ciphertexts and wrapped keys.
    copies = {ref: vault.read_ciphertext(ref) for ref in refs}
    wrapped = [vault.index.wrapped_key(ref)[1] for ref in refs]
    assert all(w for w in wrapped)
    assert all(vault.open_blob(ref, blob) for ref, blob in copies.items())

    closed_at = time.monotonic()
    await publish(kafka_bootstrap, [case(closing, "closed")])
    events = await purged_events(kafka_bootstrap, {e.probe_id for e in
                                                   (submitted[r.request_id] for r in reqs)})
    # One sweep interval plus the registry follower's and this reader's lag (a loaded CI
    # machine reads slowly); the unit test pins "one sweep" exactly. Default TTL is 72 h.
    assert time.monotonic() - closed_at < interval + 20
    assert {e.reason for e in events} == {PurgeReason.CASE_CLOSED}
    assert {e.vault_ref for e in events} == set(refs)

    # Crypto-shredding: the copies are noise now, the keys are gone from every file.
    for ref, blob in copies.items():
        with pytest.raises(ObjectPurged):
            open_vault(state).open_blob(ref, blob)
    vault_bytes = b"".join(p.read_bytes() for p in files_under(state / "vault"))
    for w in wrapped:
        assert w is not None and w not in vault_bytes
    remaining = files_under(state / "vault" / "objects")
    assert len(remaining) == 1  # the open case's probe is untouched
    other_ref = submitted[other.request_id].vault_ref  # type: ignore[union-attr]
    assert open_vault(state).get(other_ref)

    # The gauge is exported and nothing is left past expiry.
    url = f"http://127.0.0.1:{metrics_port(intake.log_path)}/metrics"
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    assert "frs_intake_vault_objects_past_expiry 0.0" in body
    assert 'frs_intake_images_purged_total{reason="case_closed"} 2.0' in body
    intake.stop()


async def test_purger_killed_mid_sweep_finishes_after_restart(
    kafka_bootstrap: str, services: dict[str, ServiceProcess], service_env: dict[str, str]
) -> None:
    ttl_s = 3.0
    env = {"FRS_INTAKE_IMAGE_TTL_HOURS": str(ttl_s / 3600),
           "FRS_INTAKE_PURGE_INTERVAL_S": "3600"}
    intake = start_intake(services, **env)
    reqs = [make_request(service_env, s.face_jpeg()) for _ in range(4)]
    await publish(kafka_bootstrap, reqs)
    got = await outcomes(kafka_bootstrap, [r.request_id for r in reqs])
    probes = {got[r.request_id][0].event.probe_id for r in reqs}  # type: ignore[attr-defined]
    intake.stop()
    state = Path(service_env["FRS_STATE_DIR"])
    assert len(files_under(state / "vault" / "objects")) == 4
    await asyncio.sleep(ttl_s + 0.5)  # all four are past expiry, nothing purged them yet

    # Killed after shredding the second object, before announcing it.
    crashing = services["intake"].start(FRS_INTAKE_FAULT_KILL_MID_PURGE="2", **env)
    assert crashing.proc is not None and crashing.proc.wait(timeout=60) == -9
    assert "fault injection: SIGKILL mid-sweep" in crashing.log_path.read_text()
    assert 2 <= len(files_under(state / "vault" / "objects")) <= 3

    start_intake(services, count=2, **env)
    events = await purged_events(kafka_bootstrap, probes)
    assert len(events) == 4  # each announced exactly once, the shredded one included
    assert {e.reason for e in events} == {PurgeReason.EXPIRED}
    assert files_under(state / "vault" / "objects") == []
    index = open_vault(state).index
    assert isinstance(index, SqliteVaultIndex)
    rows = index.conn.execute("SELECT state, wrapped_key FROM vault_objects").fetchall()
    assert rows and all(r == ("announced", None) for r in rows)
    services["intake"].stop()

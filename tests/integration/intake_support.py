"""Helpers for the intake integration tests: start the intake, submit, read outcomes."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable
from pathlib import Path

from schemas.catalog import PROBE_EVENTS, PROBE_REQUESTS, TOPICS
from schemas.envelope import Envelope, encode
from schemas.events import Event, ProbeRequested
from schemas.types import ImageSource, Purpose, probe_id_for
from services.cli.client import build_request
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from services.vault import Vault, VaultSettings
from services.vault import open_vault as open_vault_with
from tests.conftest import ServiceProcess
from tests.helpers import wait_for_async


def public_key_file(service_env: dict[str, str]) -> Path:
    return Path(service_env["FRS_INTAKE_PRIVATE_KEY_FILE"]).with_suffix(".pub.pem")


def start_intake(services: dict[str, ServiceProcess], count: int = 1,
                 **env: str) -> ServiceProcess:
    intake = services["intake"]
    intake.start(**env)
    # The intake consumer has started (``count``: how many runs of it share this log).
    intake.wait_log('"msg":"consumer started","group":"frs-intake"', timeout=60, count=count)
    return intake


def open_vault(state: Path) -> Vault:
    """The vault a service keeps under its FRS_STATE_DIR, opened by the test to look (with
    the service's default keys: one key-encryption key per expiry epoch)."""
    return open_vault_with(VaultSettings(state_dir=state))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def make_request(service_env: dict[str, str], image: bytes, request_id: str | None = None,
                 case_id: str = "CASE-INTAKE", **fields: object) -> ProbeRequested:
    return build_request(
        image, public_key_file(service_env), case_id=case_id, agent_id="agent-7",
        purpose=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"],
        image_source=ImageSource.SURVEILLANCE, nexus=["VA"],
        request_id=request_id or new_id("req"), **fields,  # type: ignore[arg-type]
    )


async def publish(bootstrap: str, events: Iterable[Event]) -> None:
    async with Publisher(bootstrap, source="/test/upstream") as pub:
        await pub.publish(list(events))


async def publish_raw_request(bootstrap: str, request: ProbeRequested,
                              data_patch: dict[str, object]) -> None:
    """A ProbeRequested record whose JSON data was altered after encoding (bad fields)."""
    record = encode(request, "/test/upstream")
    data = json.loads(record.value)
    data.update(data_patch)
    async with Publisher(bootstrap, source="/test/upstream") as pub:
        fut = await pub.send_raw(PROBE_REQUESTS.name, record.key,
                                 json.dumps(data).encode(), record.headers)
        await fut


async def outcomes(bootstrap: str, request_ids: Iterable[str], per_request: int = 1,
                   timeout: float = 90.0,  # noqa: ASYNC109 - a polling deadline
                   ) -> dict[str, list[Envelope]]:
    """ProbeSubmitted/ProbeRejected envelopes per request id, once each has enough."""
    wanted = {probe_id_for(r): r for r in request_ids}
    by_request: dict[str, list[Envelope]] = {}

    async def enough() -> bool:
        nonlocal by_request
        by_request = {r: [] for r in wanted.values()}
        for _raw, d in await read_topic(bootstrap, [PROBE_EVENTS.name]):
            if isinstance(d, Envelope) and d.subject in wanted and d.type in (
                    "frs.probe.submitted.v1", "frs.probe.rejected.v1"):
                by_request[wanted[d.subject]].append(d)
        return all(len(v) >= per_request for v in by_request.values())

    def missing() -> str:
        short = {r: len(v) for r, v in by_request.items() if len(v) < per_request}
        return f"outcomes; missing: {short}"

    await wait_for_async(enough, timeout=timeout, interval=0.3, what=missing)
    return by_request


def needles(image: bytes) -> list[bytes]:
    """Byte strings that would betray an image: raw slices and base64 slices."""
    mid = len(image) // 2
    b64 = base64.b64encode(image)
    bmid = len(b64) // 2
    return [image[mid : mid + 48], image[64:112], b64[bmid : bmid + 64],
            base64.b64encode(image[mid - mid % 3 : mid - mid % 3 + 48])]


async def all_records_except_requests(bootstrap: str) -> list[bytes]:
    names = [t.name for t in TOPICS if t.name != PROBE_REQUESTS.name]
    blobs: list[bytes] = []
    for raw, _decoded in await read_topic(bootstrap, names):
        blobs.append((raw.key or b"") + (raw.value or b"")
                     + b"".join(k.encode() + v for k, v in raw.headers))
    return blobs


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]

"""Client for upstream systems: encrypt a probe to the intake's key and publish it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from schemas.events import AgentRecord, CaseRecord, Event, ProbeRequested, ProviderRecord
from schemas.types import ImageSource, Purpose, Transport
from services.intake.crypto import encrypt_image, load_public_key
from services.kit.bus import Publisher


def build_request(
    image: bytes, public_key_file: Path, *, case_id: str, agent_id: str, purpose: Purpose,
    roi_refs: list[str], image_source: ImageSource, nexus: list[str] | None = None,
    request_id: str | None = None, exigent: bool = False,
    exigent_justification: str | None = None, exigent_bypass: list[str] | None = None,
    unedited_attestation: bool = True, review_required: bool = False,
) -> ProbeRequested:
    request_id = request_id or f"req-{uuid.uuid4()}"
    return ProbeRequested(
        request_id=request_id, case_id=case_id, agent_id=agent_id, purpose=purpose,
        roi_refs=roi_refs, image_source=image_source, nexus=nexus or [], exigent=exigent,
        exigent_justification=exigent_justification, exigent_bypass=exigent_bypass or [],
        unedited_attestation=unedited_attestation, review_required=review_required,
        image=encrypt_image(image, load_public_key(public_key_file), request_id),
    )


async def submit_probe(bootstrap: str, public_key_file: Path, image: bytes,
                       **fields: object) -> ProbeRequested:
    request = build_request(image, public_key_file, **fields)  # type: ignore[arg-type]
    async with Publisher(bootstrap, source="/frs/upstream") as publisher:
        await publisher.publish([request])
    return request


def demo_registry(provider_id: str, name: str, endpoint: str,
                  response_deadline_s: int = 3600) -> list[Event]:
    """One open case (CASE-1), a trained agent (agent-7) with supervisor (sup-1), and one
    active HTTPS provider: what `frs registry demo` and the pipeline rig seed."""
    now = datetime.now(UTC)
    year = now + timedelta(days=365)
    return [
        CaseRecord(case_id="CASE-1", status="open",
                   offense_category=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"],
                   updated_at=now),
        AgentRecord(agent_id="agent-7", role="agent", training_valid_until=year,
                    supervisor_id="sup-1", updated_at=now),
        AgentRecord(agent_id="sup-1", role="supervisor", training_valid_until=year,
                    updated_at=now),
        ProviderRecord(provider_id=provider_id, name=name, kind="federal",
                       transport=Transport.HTTPS, endpoint=endpoint,
                       attestation_valid_until=year, response_deadline_s=response_deadline_s,
                       updated_at=now),
    ]

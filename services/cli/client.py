"""Client for upstream systems: encrypt a probe to the intake's key and publish it."""

from __future__ import annotations

import uuid
from pathlib import Path

from schemas.events import ProbeRequested
from schemas.types import ImageSource, Purpose
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

"""Intake handlers: plain functions of typed events and ports, returning events to emit.

Foundation pass-through: the image is decrypted and digested but not yet sanitized,
quality-checked or vaulted. The policy gate (``on_probe_submitted``, ``PolicyPorts``)
lives in ``services.intake.policy`` and is re-exported here."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from schemas.envelope import DecodeError
from schemas.events import (
    Event,
    ProbeRejected,
    ProbeRequested,
    ProbeSubmitted,
    RejectReason,
)
from schemas.types import probe_id_for
from services.intake.crypto import DecryptError, decrypt_image
from services.intake.policy.handlers import PolicyPorts, on_probe_submitted

__all__ = ["IntakePorts", "PolicyPorts", "on_probe_requested", "on_probe_submitted",
           "reject_invalid_request"]


@dataclass(frozen=True)
class IntakePorts:
    private_key: X25519PrivateKey
    clock: Callable[[], datetime]
    image_ttl: timedelta


async def on_probe_requested(event: ProbeRequested, ports: IntakePorts) -> list[Event]:
    probe_id = probe_id_for(event.request_id)
    try:
        image = decrypt_image(event.image, ports.private_key, event.request_id)
    except DecryptError:
        return [ProbeRejected(probe_id=probe_id, request_id=event.request_id,
                              reason=RejectReason.UNDECRYPTABLE,
                              detail="the image does not decrypt with the intake's key")]
    digest = hashlib.sha256(image).hexdigest()
    now = ports.clock()
    return [ProbeSubmitted(
        probe_id=probe_id, request_id=event.request_id, case_id=event.case_id,
        agent_id=event.agent_id, purpose=event.purpose, roi_refs=event.roi_refs,
        image_source=event.image_source, nexus=event.nexus, exigent=event.exigent,
        exigent_justification=event.exigent_justification,
        exigent_bypass=event.exigent_bypass,
        unedited_attestation=event.unedited_attestation,
        review_required=event.review_required,
        vault_ref=f"pending:{probe_id}", image_format="jpeg",
        received_sha256=digest, sanitized_sha256=digest,
        expires_at=now + ports.image_ttl, submitted_at=now,
    )]


def reject_invalid_request(key: bytes | None, err: DecodeError) -> ProbeRejected:
    """A request that is not a valid ProbeRequested still ends in exactly one outcome."""
    request_id = (key or b"").decode("utf-8", "replace")[:256] or "unknown"
    return ProbeRejected(
        probe_id=probe_id_for(request_id), request_id=request_id,
        reason=RejectReason.INVALID_FIELDS, detail=f"{err.code}: {err.message}"[:2000],
    )


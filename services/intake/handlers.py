"""Intake handlers: plain functions of typed events and ports, returning events to emit.

Foundation pass-through: the image is decrypted and digested but not yet sanitized,
quality-checked or vaulted; policy clears every active provider. The intake and policy
issues replace these bodies."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from schemas.envelope import DecodeError
from schemas.events import (
    ClearedProvider,
    Event,
    PolicyCleared,
    PolicyDenied,
    ProbeRejected,
    ProbeRequested,
    ProbeSubmitted,
    ProviderDenial,
    RejectReason,
    RuleDenial,
)
from schemas.types import MINIMAL_FIELDS, probe_id_for
from services.intake.crypto import DecryptError, decrypt_image
from services.kit.registry import Registries

PASS_THROUGH_POLICY_DIGEST = "0" * 64


@dataclass(frozen=True)
class IntakePorts:
    private_key: X25519PrivateKey
    clock: Callable[[], datetime]
    image_ttl: timedelta


@dataclass(frozen=True)
class PolicyPorts:
    registries: Registries
    clock: Callable[[], datetime]


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


async def on_probe_submitted(event: ProbeSubmitted, ports: PolicyPorts) -> list[Event]:
    registries = ports.registries
    active = [p for p in registries.providers.values() if p.status == "active"]
    if not active:
        return [PolicyDenied(
            probe_id=event.probe_id, case_id=event.case_id,
            denied=[ProviderDenial(provider_id="none", rules=[
                RuleDenial(rule_id="REQ-PROVIDER", message="no active provider is registered")
            ])],
            policy_digest=PASS_THROUGH_POLICY_DIGEST,
            registry_versions=registries.versions, decided_at=ports.clock(),
        )]
    return [PolicyCleared(
        probe_id=event.probe_id, case_id=event.case_id,
        cleared=[ClearedProvider(provider_id=p.provider_id, transport=p.transport,
                                 fields=list(MINIMAL_FIELDS)) for p in active],
        policy_digest=PASS_THROUGH_POLICY_DIGEST,
        registry_versions=registries.versions, decided_at=ports.clock(),
    )]

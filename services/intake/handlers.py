"""Intake handlers: plain functions of typed events and ports, returning events to emit.

Intake (``on_probe_requested``): decrypt, attestation, sanitize, quality gate, vault,
then exactly one ProbeSubmitted or ProbeRejected per request id, recorded so that a
redelivery re-emits the same outcome. The policy gate (``on_probe_submitted``,
``PolicyPorts``) lives in ``services.intake.policy`` and is re-exported here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from schemas.envelope import DecodeError
from schemas.events import (
    Event,
    ProbeRejected,
    ProbeRequested,
    ProbeSubmitted,
    QualityReport,
    RejectReason,
)
from schemas.types import probe_id_for
from services.intake.crypto import DecryptError, decrypt_image
from services.intake.outcomes import OutcomeLog
from services.intake.policy.handlers import PolicyPorts, on_probe_submitted
from services.intake.quality import QualityGate, assess, rejection
from services.intake.sanitize import SanitizedImage, SanitizeError, SanitizeLimits, sanitize
from services.intake.vault import ObjectPurged, Vault
from services.kit.bus import NotYet

__all__ = ["IntakePorts", "PolicyPorts", "on_invalid_request", "on_probe_requested",
           "on_probe_submitted", "reject_invalid_request"]

log = logging.getLogger("frs.intake")


@dataclass(frozen=True)
class IntakePorts:
    private_key: X25519PrivateKey
    clock: Callable[[], datetime]
    image_ttl: timedelta
    vault: Vault
    outcomes: OutcomeLog
    limits: SanitizeLimits = field(default_factory=SanitizeLimits)
    gate: QualityGate = field(default_factory=QualityGate)
    # Decoding and face detection of a large photo take seconds: off the event loop, so
    # consumer heartbeats and the purger keep running. One worker: the decompression-bomb
    # guard is process-global state. None runs the work inline (tests).
    image_worker: Executor | None = None


async def on_probe_requested(event: ProbeRequested, ports: IntakePorts) -> list[Event]:
    prior = ports.outcomes.get(event.request_id)
    if prior is not None:
        if isinstance(prior, ProbeSubmitted) and not _still_stored(prior.vault_ref, ports):
            # Its image is gone: a second ProbeSubmitted would ask policy to clear a
            # purged probe. The outcome was published once; that stands.
            log.info("duplicate request after purge", extra={"probe_id": prior.probe_id})
            return []
        # Redelivery or resubmission: the original outcome again, no second probe.
        log.info("duplicate request", extra={"probe_id": prior.probe_id,
                                             "outcome": prior.TYPE})
        return [prior]
    outcome = await _intake(event, ports)
    ports.outcomes.record(event.request_id, outcome)
    if isinstance(outcome, ProbeRejected):
        log.info("probe rejected", extra={"probe_id": outcome.probe_id,
                                          "reason": outcome.reason.value})
    else:
        log.info("probe submitted", extra={"probe_id": outcome.probe_id,
                                           "vault_ref": outcome.vault_ref})
    return [outcome]


def _still_stored(vault_ref: str, ports: IntakePorts) -> bool:
    entry = ports.vault.index.get(vault_ref)
    return entry is not None and entry.state == "stored"


class VaultUnavailable(NotYet):
    """The vault (index, object store or KMS) failed: the request waits for it rather
    than going to the DLQ without an outcome."""


def _examine(image: bytes, limits: SanitizeLimits,
             gate: QualityGate) -> tuple[SanitizedImage, QualityReport] | SanitizeError:
    """Sanitize and assess: the image work, pure and CPU-bound."""
    try:
        clean = sanitize(image, limits)
    except SanitizeError as err:
        return err
    return clean, assess(clean.image, gate)


async def _intake(event: ProbeRequested, ports: IntakePorts) -> ProbeSubmitted | ProbeRejected:
    probe_id = probe_id_for(event.request_id)

    def reject(reason: RejectReason, detail: str) -> ProbeRejected:
        return ProbeRejected(probe_id=probe_id, request_id=event.request_id, reason=reason,
                             detail=detail, rejected_at=ports.clock())

    try:
        image = decrypt_image(event.image, ports.private_key, event.request_id)
    except DecryptError:
        return reject(RejectReason.UNDECRYPTABLE,
                      "the image does not decrypt with the intake's key")
    if not event.unedited_attestation:
        return reject(RejectReason.NOT_ATTESTED_UNEDITED,
                      "the submitter did not attest that the probe is an unedited photo")
    if ports.image_worker is None:
        result = _examine(image, ports.limits, ports.gate)
    else:
        result = await asyncio.get_running_loop().run_in_executor(
            ports.image_worker, _examine, image, ports.limits, ports.gate)
    if isinstance(result, SanitizeError):
        return reject(result.reason, result.detail)
    clean, report = result
    refused = rejection(report)
    if refused is not None:
        return reject(*refused)
    now = ports.clock()
    expires_at = now + ports.image_ttl
    try:
        ref = ports.vault.put(probe_id=probe_id, case_id=event.case_id, data=clean.data,
                              created_at=now, expires_at=expires_at)
    except ObjectPurged:
        return reject(RejectReason.IMAGE_PURGED,
                      "this request's image was stored and purged before; not stored again")
    except Exception as exc:
        raise VaultUnavailable(probe_id) from exc
    return ProbeSubmitted(
        probe_id=probe_id, request_id=event.request_id, case_id=event.case_id,
        agent_id=event.agent_id, purpose=event.purpose, roi_refs=event.roi_refs,
        image_source=event.image_source, nexus=event.nexus, exigent=event.exigent,
        exigent_justification=event.exigent_justification,
        exigent_bypass=event.exigent_bypass,
        unedited_attestation=event.unedited_attestation,
        review_required=event.review_required,
        vault_ref=ref, image_format=clean.format,
        received_sha256=clean.received_sha256, sanitized_sha256=clean.sanitized_sha256,
        quality=report, expires_at=expires_at, submitted_at=now,
    )


def reject_invalid_request(key: bytes | None, err: DecodeError) -> ProbeRejected:
    """A request that is not a valid ProbeRequested still ends in exactly one outcome."""
    request_id = (key or b"").decode("utf-8", "replace")[:256] or "unknown"
    return ProbeRejected(
        probe_id=probe_id_for(request_id), request_id=request_id,
        reason=RejectReason.INVALID_FIELDS, detail=f"{err.code}: {err.message}"[:2000],
    )


async def on_invalid_request(key: bytes | None, err: DecodeError,
                             ports: IntakePorts) -> list[Event]:
    """An undecodable request keyed by a request id gets one outcome, like any other."""
    rejected = reject_invalid_request(key, err)
    if rejected.request_id == "unknown":
        return [rejected]
    prior = ports.outcomes.get(rejected.request_id)
    if prior is not None:
        return [prior]
    ports.outcomes.record(rejected.request_id, rejected)
    log.info("probe rejected", extra={"probe_id": rejected.probe_id,
                                      "reason": rejected.reason.value})
    return [rejected]

"""Intake handlers: plain functions of typed events and ports, returning events to emit.

Intake (``on_probe_requested``): decrypt, attestation, sanitize, quality gate, vault,
then exactly one ProbeSubmitted or ProbeRejected per request id, recorded with a digest of
the request's content: the same id with the same content gets the same outcome again, the
same id with other content a ProbeRejected ``request_id_reused``. The policy gate
(``on_probe_submitted``, ``PolicyPorts``) lives in ``services.intake.policy`` and is
re-exported here."""

from __future__ import annotations

import asyncio
import hashlib
import json
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
    RejectReason,
)
from schemas.sealed import DecryptError, decrypt_image
from schemas.types import probe_id_for, reused_probe_id
from services.intake.decoder import DecodeLimitExceeded
from services.intake.decoder import examine as _examine
from services.intake.outcomes import (
    Outcomes,
    Recorded,
    content_digest,
    raw_digest,
    record_digest,
)
from services.intake.policy.handlers import PolicyPorts, on_probe_submitted
from services.intake.quality import QualityGate, rejection
from services.intake.sanitize import SanitizeError, SanitizeLimits
from services.kit.cost import add_all, step
from services.kit.signals import NotYet
from services.vault import ObjectPurged, Vault

__all__ = ["IntakePorts", "PolicyPorts", "on_invalid_request", "on_probe_requested",
           "on_probe_submitted", "reject_invalid_request"]

log = logging.getLogger("frs.intake")


@dataclass(frozen=True)
class IntakePorts:
    private_key: X25519PrivateKey
    clock: Callable[[], datetime]
    image_ttl: timedelta
    vault: Vault
    outcomes: Outcomes
    limits: SanitizeLimits = field(default_factory=SanitizeLimits)
    gate: QualityGate = field(default_factory=QualityGate)
    # Decoding and face detection: never on the event loop nor in this process, but in
    # worker processes under CPU and memory limits (``decoder.DecoderPool``), one round
    # trip per image. None runs the work inline (tests, the bench's in-process figure).
    image_worker: Executor | None = None


async def on_probe_requested(event: ProbeRequested, ports: IntakePorts) -> list[Event]:
    record = record_digest(event)
    found = await ports.outcomes.find(event.request_id)
    if found is not None:
        other = await _other_content(
            found, record, lambda: _content(event, _decrypt(event, ports)), event.request_id,
            ports)
        if other is not None:
            return [await _reused(event.request_id, other, found.event, ports)]
        return _again(found.event, ports)
    image = _decrypt(event, ports)
    outcome = await _intake(event, image, ports)
    await ports.outcomes.record(event.request_id, outcome,
                                content_sha256=_content(event, image), record_sha256=record)
    if isinstance(outcome, ProbeRejected):
        log.info("probe rejected", extra={"probe_id": outcome.probe_id,
                                          "reason": outcome.reason.value})
    else:
        log.info("probe submitted", extra={"probe_id": outcome.probe_id,
                                           "vault_ref": outcome.vault_ref})
    return [outcome]


def _decrypt(event: ProbeRequested, ports: IntakePorts) -> bytes | None:
    try:
        with step("decrypt"):
            return decrypt_image(event.image, ports.private_key, event.request_id)
    except DecryptError:
        return None


def _content(event: ProbeRequested, image: bytes | None) -> str:
    # A client retry re-encrypts the same photo: the plaintext is what stays the same.
    if image is not None:
        return content_digest(event, f"sha256:{hashlib.sha256(image).hexdigest()}")
    cipher = hashlib.sha256(event.image.ciphertext.encode()).hexdigest()
    return content_digest(event, f"ciphertext-sha256:{cipher}")


async def _other_content(found: Recorded, record: str, content: Callable[[], str],
                         request_id: str, ports: IntakePorts) -> str | None:
    """None when this is the request ``found`` was recorded for; otherwise the digest of
    this request's (other) content. ``content`` is computed only when the record differs."""
    if found.record_sha256 == record:
        return None  # the identical record again: a redelivery, nothing to decrypt
    bound = found.content_sha256
    if bound is None:  # recorded before requests were bound to their content
        if isinstance(found.event, ProbeRejected):
            # Its content is unknown. A rejection started nothing downstream, so it stands,
            # rather than a redelivery getting a second, different outcome.
            return None
        # A submission carries every content field and its received image's digest.
        bound = content_digest(found.event, f"sha256:{found.event.received_sha256}")
    mine = content()
    if mine != bound:
        return mine
    if found.content_sha256 is None:
        await ports.outcomes.bind(request_id, bound, record)
    return None


def _again(prior: ProbeSubmitted | ProbeRejected, ports: IntakePorts) -> list[Event]:
    if isinstance(prior, ProbeSubmitted) and not _still_stored(prior.vault_ref, ports):
        # Its image is gone: a second ProbeSubmitted would ask policy to clear a
        # purged probe. The outcome was published once; that stands.
        log.info("duplicate request after purge", extra={"probe_id": prior.probe_id})
        return []
    # Redelivery or resubmission of the same request: the original outcome again.
    log.info("duplicate request", extra={"probe_id": prior.probe_id, "outcome": prior.TYPE})
    return [prior]


async def _reused(request_id: str, content: str, prior: ProbeSubmitted | ProbeRejected,
                  ports: IntakePorts) -> ProbeRejected:
    """The id already names a request with other content: refused under a probe id of its
    own (``reused_probe_id``), so dispatch, results and audit, which key everything by
    probe id, never see it as news about the original probe."""
    again = await ports.outcomes.reuse(request_id, content)
    if again is not None:
        log.info("duplicate request", extra={"probe_id": again.probe_id, "outcome": again.TYPE})
        return again
    rejected = ProbeRejected(
        probe_id=reused_probe_id(request_id), request_id=request_id,
        reason=RejectReason.REQUEST_ID_REUSED,
        detail="this request id was used before for a request with other content; "
               "submit this request under a new request id",
        rejected_at=ports.clock())
    await ports.outcomes.record_reuse(request_id, content, rejected)
    log.warning("request id reused", extra={"probe_id": rejected.probe_id,
                                            "reason": rejected.reason.value,
                                            "original_probe_id": prior.probe_id})
    return rejected


def _still_stored(vault_ref: str, ports: IntakePorts) -> bool:
    entry = ports.vault.index.get(vault_ref)
    return entry is not None and entry.state == "stored"


class VaultUnavailable(NotYet):
    """The vault (index, object store or KMS) failed: the request waits for it rather
    than going to the DLQ without an outcome."""


async def _intake(event: ProbeRequested, image: bytes | None,
                  ports: IntakePorts) -> ProbeSubmitted | ProbeRejected:
    probe_id = probe_id_for(event.request_id)

    def reject(reason: RejectReason, detail: str) -> ProbeRejected:
        return ProbeRejected(probe_id=probe_id, request_id=event.request_id, reason=reason,
                             detail=detail, rejected_at=ports.clock())

    if image is None:
        return reject(RejectReason.UNDECRYPTABLE,
                      "the image does not decrypt with the intake's key")
    if not event.unedited_attestation:
        return reject(RejectReason.NOT_ATTESTED_UNEDITED,
                      "the submitter did not attest that the probe is an unedited photo")
    try:
        if ports.image_worker is None:
            clean = _examine(image, ports.limits, ports.gate)
        else:
            clean = await asyncio.get_running_loop().run_in_executor(
                ports.image_worker, _examine, image, ports.limits, ports.gate)
    except DecodeLimitExceeded as exc:
        return reject(RejectReason.DECODE_LIMIT_EXCEEDED, exc.detail)
    if isinstance(clean, SanitizeError):
        return reject(clean.reason, clean.detail)
    add_all(dict(clean.cpu))  # the worker's decode, detect and re-encode
    report = clean.quality
    refused = rejection(report)
    if refused is not None:
        return reject(*refused)
    now = ports.clock()
    expires_at = now + ports.image_ttl
    try:
        with step("vault"):
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


async def on_invalid_request(key: bytes | None, value: bytes | None, err: DecodeError,
                             ports: IntakePorts) -> list[Event]:
    """An undecodable request keyed by a request id gets one outcome, like any other; its
    content is its bytes."""
    rejected = reject_invalid_request(key, err)
    if rejected.request_id == "unknown":
        return [rejected]
    content = raw_digest(value)
    found = await ports.outcomes.find(rejected.request_id)
    if found is not None:
        other = await _other_content(found, content, lambda: content, rejected.request_id,
                                     ports)
        if other is not None:
            return [await _reused(rejected.request_id, other, found.event, ports)]
        return _again(found.event, ports)
    await ports.outcomes.record(rejected.request_id, rejected, content_sha256=content,
                                record_sha256=content)
    log.info("probe rejected", extra={"probe_id": rejected.probe_id,
                                      "reason": rejected.reason.value})
    return [rejected]


def request_for_dlq(value: bytes | None) -> bytes | None:
    """What the intake's DLQ keeps of a request: everything but the sealed image, which is
    replaced by its digest and size, so a dead-lettered request does not hold the image
    (even encrypted) past the requests topic's hour."""
    try:
        data = json.loads(value or b"")
        sealed = data["image"]["ciphertext"]
    except (ValueError, TypeError, KeyError):
        # Not a request we can read: keep only its digest (in the DLQ headers) and size.
        return json.dumps({"unreadable_bytes": len(value or b"")}).encode()
    data["image"] = {"ciphertext_sha256": hashlib.sha256(str(sealed).encode()).hexdigest(),
                     "ciphertext_chars": len(str(sealed))}
    return json.dumps(data).encode()

"""Signed policy decisions: the contract between the policy gate, which signs every
PolicyCleared and PolicyDenied, and dispatch and the audit, which check them.

A bus ACL is not the only thing between a principal and a send: a decision counts only
when its Ed25519 signature verifies against an active "policy-decisions" key that the
operator enrolled in frs.registry.trusted_keys, and a clearance counts for a provider only
when that provider's registry entry allows the purpose the probe states.

What is signed: ``signed_bytes``, a domain tag and the event type, then the decision's
JSON (``model_dump(mode="json")``) with sorted keys, compact separators, UTF-8, without
``signature`` and ``key_id`` and without fields whose value is null. Leaving nulls out
keeps old signatures valid when a field is added later, as long as it defaults to null.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Collection, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from schemas.events import PolicyCleared, PolicyDenied, ProviderRecord, TrustedKey

__all__ = ["KEY_PURPOSE", "Decision", "allowed_purposes", "key_id_for", "purpose_faults",
           "sign", "signed_bytes", "trusted_key", "unverified"]

KEY_PURPOSE = "policy-decisions"
_DOMAIN = b"frs-policy-decision-v1\n"
_UNSIGNED = {"signature", "key_id"}

Decision = PolicyCleared | PolicyDenied


def signed_bytes(decision: Decision) -> bytes:
    """The exact bytes the policy gate signs for ``decision``."""
    data = decision.model_dump(mode="json", exclude=_UNSIGNED, exclude_none=True)
    body = json.dumps({"type": decision.TYPE, "data": data}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)
    return _DOMAIN + body.encode()


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_for(key: Ed25519PublicKey) -> str:
    """A key's id: its algorithm and the first 16 bytes of SHA-256 of its raw bytes."""
    return "ed25519:" + hashlib.sha256(raw_public_key(key)).hexdigest()[:32]


def sign(decision: Decision, key: Ed25519PrivateKey) -> Decision:
    """``decision`` with its signature and key id (any earlier ones replaced)."""
    signature = base64.b64encode(key.sign(signed_bytes(decision))).decode()
    return decision.model_copy(update={"signature": signature,
                                       "key_id": key_id_for(key.public_key())})


def trusted_key(key: Ed25519PublicKey, status: str = "active") -> dict[str, str]:
    """The fields of a TrustedKey record for ``key`` (the caller adds ``updated_at``)."""
    return {"key_id": key_id_for(key), "purpose": KEY_PURPOSE, "algorithm": "ed25519",
            "public_key": base64.b64encode(raw_public_key(key)).decode(), "status": status}


def unverified(decision: Decision, keys: Mapping[str, TrustedKey]) -> str | None:
    """Why ``decision`` is not the policy gate's (None: its signature verifies against an
    active policy-decisions key in ``keys``, the trusted-keys registry by key id)."""
    if decision.signature is None or decision.key_id is None:
        return "the decision is not signed"
    record = keys.get(decision.key_id)
    if record is None:
        return f"signed with key {decision.key_id}, which is not in the trusted-keys registry"
    if record.purpose != KEY_PURPOSE:
        return f"key {decision.key_id} is not trusted for {KEY_PURPOSE}"
    if record.status != "active":
        return f"key {decision.key_id} is {record.status}"
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(record.public_key))
        public.verify(base64.b64decode(decision.signature), signed_bytes(decision))
    except (InvalidSignature, ValueError, binascii.Error):
        return f"the signature does not verify against key {decision.key_id}"
    return None


def allowed_purposes(providers: Mapping[str, ProviderRecord]) -> dict[str, list[str]]:
    """Each provider's allowed purposes, as ``purpose_faults`` takes them."""
    return {pid: [p.value for p in record.allowed_purposes] for pid, record in providers.items()}


def purpose_faults(decision: PolicyCleared, allowed: Mapping[str, Collection[str]]
                   ) -> dict[str, str]:
    """Cleared providers that may not serve the probe's purpose, with why.

    A provider's ``allowed_purposes`` is the data that says which purposes it may serve
    (Cedar rule REQ-PURPOSE reads the same field). Checked against both the decision's own
    snapshot of the entry (``inputs.providers``) and ``allowed``, each provider's allowed
    purposes in the registry as the checker sees it now (skipped for a provider it does
    not know: dispatch refuses those on its own). A clearance without inputs names no
    purpose: all its providers fail."""
    if decision.inputs is None:
        return {c.provider_id: "the clearance carries no inputs, so no purpose to check"
                for c in decision.cleared}
    purpose = decision.inputs.request.purpose
    snapshot = {p.provider_id: p for p in decision.inputs.providers}
    faults: dict[str, str] = {}
    for cleared in decision.cleared:
        pid = cleared.provider_id
        seen = snapshot.get(pid)
        if seen is None:
            faults[pid] = "the provider is not in the decision's own registry snapshot"
        elif purpose not in seen.allowed_purposes:
            faults[pid] = f"the decision's snapshot of {pid} does not allow {purpose.value}"
        elif (now := allowed.get(pid)) is not None and purpose not in now:
            faults[pid] = f"the providers registry does not allow {purpose.value} for {pid}"
    return faults

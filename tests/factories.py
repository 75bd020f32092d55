"""Event builders shared by tests that publish events straight to the topics."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from schemas.decisions import sign, trusted_key
from schemas.events import (
    DecisionInputs,
    PolicyCleared,
    PolicyDenied,
    PolicyRequest,
    ProbeSubmitted,
    ProviderRecord,
    TrustedKey,
)
from schemas.types import ImageSource, Purpose, Transport, utcnow
from services.kit.private_files import write_private
from services.kit.registry import Registries

DIGEST = "0" * 64

# The policy gate's key for this test session: enrolled on the session's broker by the
# kafka_bootstrap fixture, written into every service_env's state (tests/conftest.py),
# and signing the decisions tests publish straight to the topics (``signed``).
POLICY_KEY = Ed25519PrivateKey.generate()
D = TypeVar("D", PolicyCleared, PolicyDenied)


def signed(decision: D, key: Ed25519PrivateKey = POLICY_KEY) -> D:
    """``decision`` as the policy gate would publish it: signed."""
    out = sign(decision, key)
    assert isinstance(out, type(decision))
    return out


def trusted(key: Ed25519PrivateKey = POLICY_KEY, status: str = "active") -> TrustedKey:
    """The operator's enrollment of ``key`` (frs.registry.trusted_keys)."""
    return TrustedKey.model_validate({**trusted_key(key.public_key(), status),
                                      "updated_at": utcnow()})


def trusting_registries() -> Registries:
    """An empty registry view that trusts the session's policy key."""
    registries = Registries()
    registries.apply(trusted())
    return registries


def write_policy_key(path: Path, key: Ed25519PrivateKey = POLICY_KEY) -> Path:
    """The key file a policy gate in a test process signs with (0600), public part beside."""
    if not path.exists():
        write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        path.with_suffix(".pub.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def inputs(providers: Sequence[ProviderRecord] = (),
           purpose: Purpose = Purpose.HUMAN_TRAFFICKING) -> DecisionInputs:
    """What a decision read, as much as dispatch and the audit check: the probe's purpose
    and the providers' entries (their allowed purposes)."""
    return DecisionInputs(request=PolicyRequest(
        agent_id="agent-7", case_id="CASE-1", purpose=purpose, roi_refs=["ROI-1"], nexus=[],
        unedited_attestation=True), evaluated_at=utcnow(), providers=list(providers))


def submitted(probe_id: str, expires_at: datetime | None = None,
              exigent: bool = False) -> ProbeSubmitted:
    return ProbeSubmitted(probe_id=probe_id, request_id=f"req-{probe_id}", case_id="CASE-1",
                          agent_id="agent-7", purpose=Purpose.HUMAN_TRAFFICKING,
                          roi_refs=["ROI-1"], image_source=ImageSource.SURVEILLANCE, nexus=[],
                          exigent=exigent,
                          exigent_justification="imminent threat" if exigent else None,
                          unedited_attestation=True, vault_ref=f"v/{probe_id}",
                          image_format="jpeg", received_sha256=DIGEST, sanitized_sha256=DIGEST,
                          expires_at=expires_at or utcnow() + timedelta(hours=72),
                          submitted_at=utcnow())


def inputs_for(*provider_ids: str, purpose: Purpose = Purpose.HUMAN_TRAFFICKING
               ) -> DecisionInputs:
    """``inputs`` with a stand-in entry per provider, allowing every purpose (the
    registry's default): enough for a clearance that dispatch and the audit accept."""
    now = utcnow()
    return inputs([ProviderRecord(provider_id=p, name=p, kind="commercial",
                                  transport=Transport.HTTPS, endpoint="https://127.0.0.1:1/",
                                  updated_at=now) for p in provider_ids], purpose)

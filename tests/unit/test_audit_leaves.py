"""What a leaf holds: the record's coordinates and CloudEvent, never image bytes."""

from __future__ import annotations

import json

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from schemas.envelope import DecodeError, decode, encode
from schemas.events import ProbeRequested
from schemas.sealed import encrypt_image
from schemas.types import ImageSource, Purpose
from services.audit.handlers import leaf_for
from services.audit.store import canonical


def test_probe_request_leaf_keeps_a_digest_not_the_ciphertext() -> None:
    image = encrypt_image(b"\xff\xd8" + b"jpeg-bytes" * 500,
                          X25519PrivateKey.generate().public_key(), "req-1")
    event = ProbeRequested(request_id="req-1", case_id="C-1", agent_id="a-1",
                           purpose=Purpose.FINANCIAL_FRAUD, roi_refs=["ROI-1"],
                           image_source=ImageSource.OTHER, unedited_attestation=True,
                           image=image)
    rec = encode(event, "/frs/upstream")
    meta, body = leaf_for("frs.probe.requests", 0, 7, rec.value,
                          decode(rec.headers, rec.key, rec.value))
    leaf = canonical(body)
    assert image.ciphertext[:40].encode() not in leaf
    assert image.nonce.encode() not in leaf and image.ephemeral_public_key.encode() not in leaf
    assert set(body["data"]["image"]) == {"ciphertext_sha256"}
    assert (meta.topic, meta.offset, meta.subject) == ("frs.probe.requests", 7, "req-1")


def test_undecodable_record_leaf_keeps_only_a_digest() -> None:
    value = b"\x00secret-looking bytes"
    meta, body = leaf_for("frs.dlq.intake", 0, 1, value, DecodeError("not_cloudevent", "x"))
    assert value not in canonical(body)
    assert body["error"] == "not_cloudevent" and meta.ce_id is None
    assert json.loads(canonical(body))["value_sha256"]


def test_undecodable_record_keeps_the_attributes_it_claims() -> None:
    headers = [("ce_id", b"ev-1"), ("ce_type", b"frs.candidates.received.v1"),
               ("ce_subject", b"prb-1"), ("ce_source", b"/frs/results")]
    meta, body = leaf_for("frs.results.events", 1, 2, b'{"lead_marking":"MATCH"}',
                          DecodeError("invalid_event", "x"), headers)
    assert (meta.ce_id, meta.ce_type, meta.subject) == ("ev-1", "frs.candidates.received.v1",
                                                         "prb-1")
    assert body["id"] == "ev-1" and "MATCH" not in canonical(body).decode()

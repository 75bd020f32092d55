"""`frs audit replay`'s cross-check: the same event published again (same topic, id and
bytes, at a later offset) is one event, whether the store kept it once (PostgreSQL's queue,
idempotent by id) or at both offsets (SQLite); a reused id with other bytes is a duplicate,
and a record the store lacks is missing."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from schemas.envelope import DecodeError, Envelope, Record, decode, encode
from schemas.events import ProbeRequested
from schemas.sealed import encrypt_image
from schemas.types import ImageSource, Purpose
from services.audit.handlers import leaf_for
from services.audit.replay import cross_check
from services.audit.store import AuditStore
from services.kit.routing import RawRecord

TOPIC = "frs.probe.requests"


def request(request_id: str, event_id: str) -> Record:
    image = encrypt_image(b"\xff\xd8jpeg", X25519PrivateKey.generate().public_key(), request_id)
    return encode(ProbeRequested(request_id=request_id, case_id="C-1", agent_id="a-1",
                                 purpose=Purpose.FINANCIAL_FRAUD, roi_refs=["ROI-1"],
                                 image_source=ImageSource.OTHER, unedited_attestation=True,
                                 image=image), "/frs/upstream", event_id=event_id)


def on_topic(rec: Record, offset: int) -> tuple[RawRecord, Envelope | DecodeError]:
    return (RawRecord(TOPIC, 0, offset, rec.key, rec.value, rec.headers),
            decode(rec.headers, rec.key, rec.value))


def stored(directory: Path, records: list[tuple[RawRecord, Envelope | DecodeError]]) -> Path:
    store = AuditStore(directory)
    for raw, decoded in records:
        store.append(*leaf_for(raw.topic, raw.partition, raw.offset, raw.value, decoded))
    store.commit()
    store.close()
    return directory


def test_the_same_event_again_is_a_redelivery_on_either_store(tmp_path: Path) -> None:
    first = request("req-1", "ev-1")
    topics = [on_topic(first, 0), on_topic(request("req-2", "ev-2"), 1), on_topic(first, 2)]
    # PostgreSQL's queue keeps it once (by id): the second offset is not a leaf.
    once = cross_check(topics, stored(tmp_path / "once", topics[:2]))
    # SQLite keeps each offset: the id is at two places with the same bytes.
    both = cross_check(topics, stored(tmp_path / "both", topics))
    for report in (once, both):
        assert report.ok, report.to_json()
        assert (report.redelivered, report.missing, report.duplicate_ids) == (1, [], [])


def test_a_reused_id_with_other_bytes_is_a_duplicate_or_missing(tmp_path: Path) -> None:
    topics = [on_topic(request("req-1", "ev-1"), 0), on_topic(request("req-9", "ev-1"), 1)]
    kept_both = cross_check(topics, stored(tmp_path / "both", topics))
    assert not kept_both.ok and kept_both.duplicate_ids == ["ev-1"]
    assert kept_both.redelivered == 0
    kept_first = cross_check(topics, stored(tmp_path / "first", topics[:1]))
    assert not kept_first.ok and kept_first.missing == [(TOPIC, 0, 1)]
    assert kept_first.redelivered == 0


def test_a_record_the_store_lacks_is_missing(tmp_path: Path) -> None:
    topics = [on_topic(request("req-1", "ev-1"), 0), on_topic(request("req-2", "ev-2"), 1)]
    report = cross_check(topics, stored(tmp_path / "s", topics[:1]))
    assert not report.ok and report.missing == [(TOPIC, 0, 1)]

"""Bounds at the edges (issue 19 item 6): an oversized event is refused before it is sent,
the DLQ keeps no sealed image, short retention holds as written, lists are bounded."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas.answers import raw_digest
from schemas.catalog import DAY_MS, HOUR_MS, PROBE_REQUESTS, TOPICS
from schemas.events import DispatchFailed, DispatchFailure, ProviderAnswered
from schemas.types import utcnow
from services.intake.handlers import request_for_dlq
from services.kit.publisher import BROKER_DEFAULT_MAX_BYTES, EventTooLarge, Publisher
from tests.factories import submitted


async def test_an_event_over_its_topic_limit_is_refused_before_sending() -> None:
    publisher = Publisher("127.0.0.1:1", source="/frs/test")  # never started: no I/O
    small = DispatchFailed(probe_id="prb-1", provider_id="p",
                           reason=DispatchFailure.PERMANENT_ERROR, detail="x",
                           failed_at=utcnow())
    assert publisher.prepare(small).topic == "frs.dispatch.events"
    # model_copy skips validation: an event as large as a bug or an attack could make one.
    big = submitted("prb-1").model_copy(update={"vault_ref": "v" * BROKER_DEFAULT_MAX_BYTES})
    with pytest.raises(EventTooLarge) as caught:
        publisher.prepare(big)
    assert caught.value.topic == "frs.probe.events"
    assert caught.value.size > caught.value.limit == BROKER_DEFAULT_MAX_BYTES
    assert "vvvv" not in str(caught.value)  # sizes, never content


def test_dlq_copy_of_a_request_keeps_no_sealed_image() -> None:
    request = {"request_id": "r-1", "case_id": "C-1",
               "image": {"key_id": "k", "ephemeral_public_key": "e", "nonce": "n",
                         "ciphertext": "QUJD" * 1000}}
    kept = json.loads(request_for_dlq(json.dumps(request).encode()) or b"")
    assert kept["request_id"] == "r-1" and kept["case_id"] == "C-1"
    assert "ciphertext" not in kept["image"] and kept["image"]["ciphertext_chars"] == 4000
    assert len(kept["image"]["ciphertext_sha256"]) == 64
    assert json.loads(request_for_dlq(b"\xff not json") or b"") == {"unreadable_bytes": 10}


def test_short_retention_topics_roll_segments_so_retention_holds() -> None:
    assert PROBE_REQUESTS.config()["segment.ms"] == str(HOUR_MS // 10)
    for topic in TOPICS:
        config = topic.config()
        if topic.cleanup == "delete" and 0 < topic.retention_ms < 30 * DAY_MS:
            assert int(config["segment.ms"]) <= topic.retention_ms // 4, topic.name
        elif topic.cleanup == "delete":
            assert "segment.ms" not in config, topic.name  # a year's history: weekly is fine


def test_lists_in_events_are_bounded() -> None:
    with pytest.raises(ValidationError):
        submitted("prb-1").model_copy(update={}).model_validate(
            {**submitted("prb-1").model_dump(), "exigent_bypass": ["rule"] * 21})
    with pytest.raises(ValidationError):
        submitted("prb-1").model_validate(
            {**submitted("prb-1").model_dump(), "exigent_bypass": ["x" * 201]})


def test_a_provider_answer_keeps_only_what_the_normalizer_reads() -> None:
    photo = "iVBORw0KGgo" * 2000  # a candidate photo, base64: never carried
    raw = {"request_ref": "ref-1", "algorithm": "x", "algorithm_version": "1",
           "threshold": 0.0, "subjects": [{"name": "A. Person", "dob": "1980-01-01"}],
           "candidates": [{"rank": 1, "score": 0.9, "score_scale": "0-1", "gallery": "g",
                           "candidate_ref": "c1", "photo": photo, "address": "1 Main St"}]}
    event = ProviderAnswered(probe_id="prb-1", provider_id="p1", channel="webhook",
                             payload=raw, received_at=utcnow())
    assert set(event.payload) == {"request_ref", "algorithm", "algorithm_version",
                                  "threshold", "candidates"}
    assert event.payload["candidates"] == [{"rank": 1, "score": 0.9, "score_scale": "0-1",
                                            "gallery": "g", "candidate_ref": "c1"}]
    assert set(event.dropped_fields) == {"subjects", "candidates[].photo",
                                         "candidates[].address"}
    assert event.raw_sha256 == raw_digest(raw)
    encoded = event.model_dump_json()
    assert photo not in encoded and "A. Person" not in encoded and "1 Main St" not in encoded
    # Decoding the event again changes nothing: the digest is of the raw answer.
    again = ProviderAnswered.model_validate_json(encoded)
    assert again == event

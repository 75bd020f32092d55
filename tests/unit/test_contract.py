"""The event contract: codec round trips, catalog consistency, exported files in sync."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from schemas.catalog import TOPIC_FOR_EVENT, TOPICS
from schemas.envelope import DecodeError, decode, encode
from schemas.events import (
    ALL_EVENTS,
    LEAD_MARKING,
    Candidate,
    CandidatesReceived,
    DispatchFailed,
    DispatchFailure,
    ProviderRecord,
)
from schemas.export import drift
from schemas.types import probe_id_for
from tests.conftest import ROOT

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def candidates(n: int) -> CandidatesReceived:
    return CandidatesReceived(
        probe_id="prb-1", provider_id="p1", channel="webhook",
        candidates=[Candidate(rank=i + 1, score=0.9 - i / 100, score_scale="0-1",
                              gallery="g", candidate_ref=f"c{i}") for i in range(n)],
        threshold=0.0, list_size=n, algorithm="a", algorithm_version="1", received_at=NOW,
    )


def test_round_trip_keeps_event_and_envelope() -> None:
    event = candidates(3)
    record = encode(event, "/frs/results", causation_id="cause-1")
    headers = dict(record.headers)
    assert headers["ce_type"] == b"frs.candidates.received.v1"
    assert headers["ce_subject"] == b"prb-1"
    assert headers["ce_specversion"] == b"1.0"
    assert record.key == b"prb-1"
    env = decode(record.headers, record.key, record.value)
    assert env.event == event
    assert env.causation_id == "cause-1"
    assert env.traceparent is not None and len(env.traceparent) == 55


def test_child_events_keep_the_trace_id() -> None:
    parent = decode(*_parts(encode(candidates(1), "/a")))
    child = decode(*_parts(encode(candidates(1), "/b", causation_id=parent.id,
                                  traceparent=_child(parent.traceparent))))
    assert parent.traceparent and child.traceparent
    assert child.traceparent.split("-")[1] == parent.traceparent.split("-")[1]
    assert child.traceparent != parent.traceparent


def _child(tp: str | None) -> str:
    from schemas.envelope import child_traceparent

    return child_traceparent(tp)


def _parts(r: object) -> tuple[list[tuple[str, bytes]], bytes, bytes]:
    return r.headers, r.key, r.value  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda h, v: (h, b"{not json"), "not_json"),
        (lambda h, v: ([(k, b"frs.nope.v1" if k == "ce_type" else x) for k, x in h], v),
         "unknown_type"),
        (lambda h, v: ([x for x in h if x[0] != "ce_id"], v), "bad_envelope"),
        (lambda h, v: ([], v), "not_cloudevent"),
        (lambda h, v: (h, json.dumps({**json.loads(v), "extra": 1}).encode()), "invalid_event"),
    ],
)
def test_decode_rejects_with_a_code(mutate: object, code: str) -> None:
    record = encode(candidates(1), "/x")
    headers, value = mutate(record.headers, record.value)  # type: ignore[operator]
    with pytest.raises(DecodeError) as err:
        decode(headers, record.key, value)
    assert err.value.code == code


def test_models_are_frozen_strict_and_utc() -> None:
    event = candidates(1)
    with pytest.raises(ValidationError):
        event.model_copy(update={}).__setattr__("probe_id", "x")  # frozen
    with pytest.raises(ValidationError):
        DispatchFailed.model_validate({"probe_id": "prb-1", "provider_id": "p",
                                       "reason": "suspended", "detail": "", "failed_at":
                                       NOW.isoformat(), "surprise": True})
    with pytest.raises(ValidationError):  # naive timestamps are refused
        DispatchFailed(probe_id="prb-1", provider_id="p", reason=DispatchFailure.SUSPENDED,
                       detail="", failed_at=datetime(2026, 1, 1))
    est = timezone(timedelta(hours=-5))
    e = DispatchFailed(probe_id="prb-1", provider_id="p", reason=DispatchFailure.SUSPENDED,
                       detail="", failed_at=datetime(2026, 1, 1, 7, tzinfo=est))
    assert e.failed_at.utcoffset() == timedelta(0) and e.failed_at.hour == 12
    with pytest.raises(ValidationError):  # ids have a fixed alphabet
        DispatchFailed(probe_id="../etc", provider_id="p", reason=DispatchFailure.SUSPENDED,
                       detail="", failed_at=NOW)


def test_candidate_lists_are_always_leads() -> None:
    assert candidates(2).lead_marking == LEAD_MARKING
    assert candidates(2).mode == "investigative"
    with pytest.raises(ValidationError):
        CandidatesReceived.model_validate({**candidates(1).model_dump(),
                                           "lead_marking": "IDENTIFICATION"})
    with pytest.raises(ValidationError):
        CandidatesReceived.model_validate({**candidates(1).model_dump(), "mode": "identify"})
    with pytest.raises(ValidationError):  # ranks out of order
        CandidatesReceived.model_validate({**candidates(2).model_dump(), "candidates": list(
            reversed(candidates(2).model_dump()["candidates"]))})


def test_provider_candidate_cap_is_bounded() -> None:
    base = {"provider_id": "p", "name": "n", "kind": "federal", "transport": "https",
            "endpoint": "https://x", "updated_at": NOW}
    assert ProviderRecord.model_validate(base).max_candidates == 20
    with pytest.raises(ValidationError):
        ProviderRecord.model_validate({**base, "max_candidates": 51})


def test_every_event_has_exactly_one_topic() -> None:
    assert set(TOPIC_FOR_EVENT) == set(ALL_EVENTS)
    carried = [e for t in TOPICS for e in t.events]
    assert len(carried) == len(set(carried))
    assert len({t.name for t in TOPICS}) == len(TOPICS)
    assert len({e.TYPE for e in ALL_EVENTS}) == len(ALL_EVENTS)
    for e in ALL_EVENTS:
        assert e.TYPE.startswith("frs.") and e.TYPE.endswith(".v1")


def test_request_topic_is_short_lived_and_registries_compacted() -> None:
    by_name = {t.name: t for t in TOPICS}
    assert by_name["frs.probe.requests"].retention_ms <= 24 * 3_600_000
    for name in ("frs.registry.cases", "frs.registry.agents", "frs.registry.providers"):
        assert by_name[name].cleanup == "compact"
    assert by_name["frs.probe.events"].retention_ms >= 365 * 24 * 3_600_000


def test_probe_ids_are_stable_per_request() -> None:
    assert probe_id_for("r-1") == probe_id_for("r-1") != probe_id_for("r-2")


def test_exported_contract_matches_models() -> None:
    assert drift() == [], "run `python -m schemas export` and commit the result"
    result = subprocess.run([sys.executable, "-m", "schemas", "export", "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

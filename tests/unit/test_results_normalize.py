"""Normalization: every channel's answer becomes a capped, lead-marked list or a rejection."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.events import (
    LEAD_MARKING,
    CandidatesReceived,
    Event,
    ProbeSettled,
    ProviderAnswered,
    ProviderRecord,
    ProviderResponseRejected,
)
from services.kit.registry import Registries
from services.results.handlers import (
    ResultsPorts,
    on_provider_answered,
    on_provider_answered_tracked,
)
from services.results.normalize import normalize

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def provider(max_candidates: int = 20) -> ProviderRecord:
    return ProviderRecord(provider_id="p1", name="P1", kind="federal", transport="https",
                          endpoint="https://x", max_candidates=max_candidates, updated_at=NOW)


def cand(rank: int, **extra: Any) -> dict[str, Any]:
    return {"rank": rank, "score": 1.0 / rank, "score_scale": "0-1", "gallery": "g",
            "candidate_ref": f"c{rank}", **extra}


def answer(n: int, **extra: Any) -> dict[str, Any]:
    return {"candidates": [cand(r) for r in range(n, 0, -1)], "threshold": 0.0,
            "algorithm": "alg", "algorithm_version": "1", **extra}


def run(payload: Any, prov: ProviderRecord | None = None) -> Any:
    return normalize(probe_id="prb-1", provider=prov if prov is not None else provider(),
                     provider_id="p1", channel="webhook", payload=payload,
                     received_at=NOW, now=NOW)


def test_answer_becomes_lead_marked_sorted_list() -> None:
    out = run(answer(3))
    assert isinstance(out, CandidatesReceived)
    assert out.lead_marking == LEAD_MARKING and out.mode == "investigative"
    assert [c.rank for c in out.candidates] == [1, 2, 3]
    assert out.list_size == 3 and out.truncated_from is None


def test_list_longer_than_cap_is_cut() -> None:
    out = run(answer(35), provider(max_candidates=20))
    assert isinstance(out, CandidatesReceived)
    assert out.list_size == 20 and len(out.candidates) == 20
    assert out.truncated_from == 35
    assert out.candidates[-1].rank == 20


def test_cap_defaults_to_20() -> None:
    out = run(answer(21), ProviderRecord(provider_id="p1", name="P", kind="federal",
                                         transport="https", endpoint="x", updated_at=NOW))
    assert isinstance(out, CandidatesReceived) and out.list_size == 20


@pytest.mark.parametrize(("payload", "code"), [
    ([1, 2], "not_an_object"),
    ("text", "not_an_object"),
    ({"threshold": 0.0, "algorithm": "a", "algorithm_version": "1"}, "invalid_answer"),
    ({**answer(1), "candidates": "many"}, "invalid_answer"),
    ({**answer(1), "threshold": float("nan")}, "invalid_answer"),
    ({**answer(1), "threshold": True}, "invalid_answer"),
    ({**answer(1), "identified": True}, "invalid_answer"),
    ({**answer(0), "candidates": [cand(1, photo="AAAA")]}, "invalid_candidate"),
    ({**answer(0), "candidates": [{**cand(1), "score": -1}]}, "invalid_candidate"),
    ({**answer(0), "candidates": [{**cand(1), "rank": 0}]}, "invalid_candidate"),
    ({**answer(0), "candidates": [{**cand(1), "score": "0.9"}]}, "invalid_candidate"),
    ({**answer(0), "candidates": [cand(1), cand(1)]}, "duplicate_rank"),
    ({**answer(0), "candidates": [cand(i + 1) for i in range(1001)]}, "too_many_candidates"),
])
def test_malformed_answers_are_rejected_with_a_code(payload: Any, code: str) -> None:
    out = run(payload)
    assert isinstance(out, ProviderResponseRejected)
    assert out.reason == code
    assert "AAAA" not in out.detail  # never echo provider values


def test_unknown_provider_is_rejected() -> None:
    out = normalize(probe_id="prb-1", provider=None, provider_id="px", channel="email",
                    payload=answer(1), received_at=NOW, now=NOW)
    assert isinstance(out, ProviderResponseRejected) and out.reason == "unknown_provider"


async def test_handler_uses_registry_cap() -> None:
    reg = Registries()
    reg.apply(provider(max_candidates=5))
    ports = ResultsPorts(registries=reg, clock=lambda: NOW)
    event = ProviderAnswered(probe_id="prb-1", provider_id="p1", channel="rekognition",
                             payload=answer(9), received_at=NOW)
    [out] = await on_provider_answered(event, ports)
    assert isinstance(out, CandidatesReceived)
    assert out.list_size == 5 and out.truncated_from == 9 and out.channel == "rekognition"


def rekognition(n: int, **extra: Any) -> dict[str, Any]:
    return {"request_ref": "ref-1", "FaceModelVersion": "7.0", "FaceMatchThreshold": 80.0,
            "SearchedFaceConfidence": 99.9, "MaxFaces": 50,
            "FaceMatches": [{"Similarity": 81.0 + i, "Face": {"FaceId": f"f{i}",
                                                              "Confidence": 99.0}}
                            for i in range(n)], **extra}


def test_rekognition_shape_is_mapped_ranked_and_capped() -> None:
    out = normalize(probe_id="prb-1", provider=provider(max_candidates=3), provider_id="p1",
                    channel="rekognition", payload=rekognition(5), received_at=NOW, now=NOW)
    assert isinstance(out, CandidatesReceived)
    assert [c.candidate_ref for c in out.candidates] == ["f4", "f3", "f2"]
    assert [c.rank for c in out.candidates] == [1, 2, 3]
    assert out.candidates[0].score_scale == "0-100" and out.threshold == 80.0
    assert (out.algorithm, out.algorithm_version) == ("aws-rekognition", "7.0")
    assert out.truncated_from == 5 and out.lead_marking == LEAD_MARKING


def test_rekognition_malformed_match_is_rejected() -> None:
    bad = rekognition(1)
    bad["FaceMatches"][0]["Similarity"] = None
    out = normalize(probe_id="prb-1", provider=provider(), provider_id="p1",
                    channel="rekognition", payload=bad, received_at=NOW, now=NOW)
    assert isinstance(out, ProviderResponseRejected) and out.reason == "invalid_candidate"


async def test_a_failure_to_track_the_candidates_does_not_hold_back_the_lead() -> None:
    """The tracker normalizes and applies at once; if applying fails (not the store being
    away), the candidates still go out, to be met again on their read-back. A store that
    does not answer makes the whole answer wait instead (raised to the kit)."""
    import sqlite3

    reg = Registries()
    reg.apply(provider())
    ports = ResultsPorts(registries=reg, clock=lambda: NOW)
    event = ProviderAnswered(probe_id="prb-1", provider_id="p1", channel="webhook",
                             payload=answer(2), received_at=NOW)
    tracked: list[CandidatesReceived] = []

    async def settles(c: CandidatesReceived) -> list[Event]:
        tracked.append(c)
        return [ProbeSettled(probe_id=c.probe_id, answered=["p1"], failed=[], no_response=[],
                             settled_at=NOW)]

    async def broken(_c: CandidatesReceived) -> list[Event]:
        raise ValueError("a state that does not parse")

    async def away(_c: CandidatesReceived) -> list[Event]:
        raise sqlite3.OperationalError("database is locked")

    out = await on_provider_answered_tracked(event, ports, settles)
    assert [type(e) for e in out] == [CandidatesReceived, ProbeSettled] and tracked == out[:1]
    [lead] = await on_provider_answered_tracked(event, ports, broken)
    assert isinstance(lead, CandidatesReceived) and lead.lead_marking == LEAD_MARKING
    with pytest.raises(sqlite3.OperationalError):
        await on_provider_answered_tracked(event, ports, away)

"""ProviderAnswered from any channel (here Rekognition's, as dispatch publishes it) becomes
CandidatesReceived or, when malformed, ProviderResponseRejected: never a DLQ entry."""

from __future__ import annotations

import pytest

from schemas.catalog import dlq_topic
from schemas.events import (
    LEAD_MARKING,
    CandidatesReceived,
    ProviderAnswered,
    ProviderResponseRejected,
)
from tests.conftest import ServiceProcess
from tests.integration.results.conftest import (
    count,
    now,
    provider_record,
    publish,
    results_for,
    uid,
    wait_results,
)

pytestmark = pytest.mark.integration


async def test_rekognition_answer_and_malformed_answer(
    kafka_bootstrap: str, services: dict[str, ServiceProcess]
) -> None:
    good, bad, pid = uid("prb"), uid("prb"), uid("rk")
    await publish(kafka_bootstrap, [provider_record(pid, transport="rekognition",
                                                    endpoint="collection-1", max_candidates=3)])
    results = services["results"]
    results.start()
    results.wait_log("consumer started")
    # SearchFacesByImage's reply as dispatch's Rekognition transport forwards it.
    answer = {"request_ref": "ref-x", "FaceModelVersion": "7.0", "FaceMatchThreshold": 80.0,
              "SearchedFaceConfidence": 99.8, "MaxFaces": 50,
              "FaceMatches": [{"Similarity": 99.0 - r, "Face": {"FaceId": f"face-{r}",
                                                                "Confidence": 99.9}}
                              for r in (5, 4, 3, 2, 1)]}
    await publish(kafka_bootstrap, [
        ProviderAnswered(probe_id=good, provider_id=pid, channel="rekognition",
                         payload=answer, received_at=now()),
        ProviderAnswered(probe_id=bad, provider_id=pid, channel="rekognition",
                         payload={**answer, "FaceMatches": [{"Similarity": "high"}]},
                         received_at=now()),
    ])
    events = await wait_results(kafka_bootstrap, good,
                                lambda es: count(es, CandidatesReceived) >= 1)
    [got] = [e for e in events if isinstance(e, CandidatesReceived)]
    assert got.lead_marking == LEAD_MARKING and got.channel == "rekognition"
    assert [c.candidate_ref for c in got.candidates] == ["face-1", "face-2", "face-3"]
    assert got.truncated_from == 5 and got.threshold == 80.0
    assert got.candidates[0].gallery == "collection-1" and got.algorithm == "aws-rekognition"
    rejected = await wait_results(kafka_bootstrap, bad,
                                  lambda es: count(es, ProviderResponseRejected) >= 1)
    [rej] = [e for e in rejected if isinstance(e, ProviderResponseRejected)]
    assert rej.reason == "invalid_candidate"
    dlq = await results_for(kafka_bootstrap, bad, dlq_topic("results").name)
    assert dlq == []
    assert results.proc is not None and results.proc.poll() is None
    assert results.stop() == 0

"""Examiner review on the real broker: a probe needing review is not settled until
`frs review complete` records a conclusion for every candidate."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest

from schemas.events import (
    AgentRecord,
    Candidate,
    CandidatesReceived,
    ProbeSettled,
    ReviewCompleted,
    ReviewRequested,
)
from tests.conftest import ROOT, ServiceProcess
from tests.integration.results.conftest import (
    cleared,
    count,
    dispatched,
    now,
    provider_record,
    publish,
    results_for,
    uid,
    wait_results,
)

pytestmark = pytest.mark.integration


def frs(bootstrap: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *argv], check=False, cwd=ROOT,
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "FRS_KAFKA_BOOTSTRAP": bootstrap, "PYTHONPATH": str(ROOT)})


def answer(probe: str, pid: str, refs: list[str]) -> CandidatesReceived:
    return CandidatesReceived(
        probe_id=probe, provider_id=pid, channel="webhook",
        candidates=[Candidate(rank=i + 1, score=0.9 - i / 10, score_scale="0-1", gallery="g",
                              candidate_ref=r) for i, r in enumerate(refs)],
        threshold=0.0, list_size=len(refs), algorithm="a", algorithm_version="1",
        received_at=now())


async def test_not_settled_until_frs_review_complete(
    kafka_bootstrap: str, services: dict[str, ServiceProcess]
) -> None:
    probe, pa, pb, examiner = uid("prb"), uid("pa"), uid("pb"), uid("ex")
    await publish(kafka_bootstrap, [
        provider_record(pa), provider_record(pb, requires_review=True),
        AgentRecord(agent_id=examiner, role="examiner",
                    training_valid_until=now() + timedelta(days=30), updated_at=now()),
    ])
    results = services["results"]
    results.start()
    results.wait_log("consumer started")
    # The provider, not the request, asks for review here.
    await publish(kafka_bootstrap, [cleared(probe, pa, pb), dispatched(probe, pa),
                                    dispatched(probe, pb)])
    await publish(kafka_bootstrap, [answer(probe, pa, ["a-1"]),
                                    answer(probe, pb, ["b-1", "b-2"])])
    events = await wait_results(kafka_bootstrap, probe, lambda es: count(es, ReviewRequested) >= 1)
    [requested] = [e for e in events if isinstance(e, ReviewRequested)]
    assert f"provider:{pb}" in requested.reason
    await asyncio.sleep(2.0)
    assert count(await results_for(kafka_bootstrap, probe), ProbeSettled) == 0

    listed = frs(kafka_bootstrap, "review", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [mine] = [r for r in json.loads(listed.stdout) if r["probe_id"] == probe]
    assert {(c["provider_id"], c["candidate_ref"]) for c in mine["candidates"]} == {
        (pa, "a-1"), (pb, "b-1"), (pb, "b-2")}

    # Misuse: a conclusion outside the lead-oriented scale, a missing candidate, a
    # non-examiner. Each exits 2 and records nothing.
    bad = frs(kafka_bootstrap, "review", "complete", probe, "--examiner", examiner,
              "--conclusion", f"{pa}:a-1:match")
    assert bad.returncode == 2 and "likely_same" in bad.stderr
    partial = frs(kafka_bootstrap, "review", "complete", probe, "--examiner", examiner,
                  "--conclusion", f"{pa}:a-1:likely_same")
    assert partial.returncode == 2 and "no conclusion" in partial.stderr
    stranger = frs(kafka_bootstrap, "review", "complete", probe, "--examiner", "nobody-1",
                   "--conclusion", f"{pa}:a-1:likely_same")
    assert stranger.returncode == 2
    assert count(await results_for(kafka_bootstrap, probe), ReviewCompleted) == 0

    done = frs(kafka_bootstrap, "review", "complete", probe, "--examiner", examiner,
               "--json", "--conclusion", f"{pa}:a-1:likely_same",
               "--conclusion", f"{pb}:b-1:inconclusive",
               "--conclusion", f"{pb}:b-2:likely_different")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["examiner_id"] == examiner
    events = await wait_results(kafka_bootstrap, probe, lambda es: count(es, ProbeSettled) >= 1)
    [completed] = [e for e in events if isinstance(e, ReviewCompleted)]
    assert {c.conclusion.value for c in completed.conclusions} == {
        "likely_same", "inconclusive", "likely_different"}
    assert count(events, ProbeSettled) == 1
    again = frs(kafka_bootstrap, "review", "complete", probe, "--examiner", examiner,
                "--conclusion", f"{pa}:a-1:likely_same")
    assert again.returncode == 2
    assert results.stop() == 0

"""Per-probe tracking on the real broker: NoResponse after the deadline, exactly one
ProbeSettled, also across a SIGKILL between sends and offset commit."""

from __future__ import annotations

import asyncio
import signal

import pytest

from schemas.catalog import DISPATCH_EVENTS, RESULTS_EVENTS
from schemas.events import (
    Candidate,
    CandidatesReceived,
    DispatchFailed,
    NoResponse,
    ProbeSettled,
)
from tests.conftest import ServiceProcess
from tests.helpers import wait_committed
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


def answer_event(probe_id: str, pid: str) -> CandidatesReceived:
    return CandidatesReceived(
        probe_id=probe_id, provider_id=pid, channel="rekognition",
        candidates=[Candidate(rank=1, score=0.9, score_scale="0-1", gallery="g",
                              candidate_ref="c-1")],
        threshold=0.0, list_size=1, algorithm="a", algorithm_version="1", received_at=now())



async def test_silent_provider_yields_no_response_then_one_settlement(
    kafka_bootstrap: str, services: dict[str, ServiceProcess]
) -> None:
    probe, a, b = uid("prb"), uid("pa"), uid("pb")
    await publish(kafka_bootstrap, [provider_record(a), provider_record(b)])
    results = services["results"]
    results.start(FRS_RESULTS_TICK_S="0.2")
    results.wait_log("consumer started")
    await publish(kafka_bootstrap, [cleared(probe, a, b), dispatched(probe, a),
                                    dispatched(probe, b, response_s=3)])
    await publish(kafka_bootstrap, [answer_event(probe, a)])
    await asyncio.sleep(1.0)
    early = await results_for(kafka_bootstrap, probe)
    assert count(early, NoResponse) == 0 and count(early, ProbeSettled) == 0
    events = await wait_results(kafka_bootstrap, probe, lambda es: count(es, ProbeSettled) >= 1)
    [nr] = [e for e in events if isinstance(e, NoResponse)]
    assert nr.provider_id == b
    assert nr.deadline <= now()
    [settled] = [e for e in events if isinstance(e, ProbeSettled)]
    assert settled.answered == [a] and settled.no_response == [b]
    await asyncio.sleep(2.0)  # nothing more arrives
    assert count(await results_for(kafka_bootstrap, probe), ProbeSettled) == 1
    assert results.stop() == 0


async def test_exactly_one_settlement_across_sigkill(
    kafka_bootstrap: str, services: dict[str, ServiceProcess]
) -> None:
    probe, a, b, c = uid("prb"), uid("pa"), uid("pb"), uid("pc")
    await publish(kafka_bootstrap, [provider_record(p) for p in (a, b, c)])
    results = services["results"]
    # The fault switch: after a batch's sends are acknowledged, SIGKILL before the commit.
    results.start(FRS_RESULTS_TICK_S="0.2", FRS_RESULTS_FAULT_KILL_BEFORE_COMMIT="true")
    results.wait_log("consumer started")
    await publish(kafka_bootstrap, [cleared(probe, a, b, c), dispatched(probe, a),
                                    dispatched(probe, b), answer_event(probe, a)])
    await asyncio.sleep(2.0)
    assert results.proc is not None and results.proc.poll() is None  # no output yet
    # Kill it in the middle, by hand, then restart (state must survive).
    assert results.kill(signal.SIGKILL) == -signal.SIGKILL
    results.start(FRS_RESULTS_TICK_S="0.2", FRS_RESULTS_FAULT_KILL_BEFORE_COMMIT="true")
    results.wait_log("consumer started", count=2)
    await publish(kafka_bootstrap, [
        answer_event(probe, b),
        DispatchFailed(probe_id=probe, provider_id=c, reason="retries_exhausted",
                       detail="test", failed_at=now()),
    ])
    # The settling batch kills the process after ProbeSettled is acknowledged.
    assert results.proc is not None
    assert await asyncio.to_thread(results.proc.wait, 60) == -signal.SIGKILL
    results.wait_log("fault injection: SIGKILL before commit")
    events = await results_for(kafka_bootstrap, probe)
    assert count(events, ProbeSettled) == 1
    results.start(FRS_RESULTS_TICK_S="0.2")
    results.wait_log("consumer started", count=3)
    # The uncommitted batch is redelivered to the restarted tracker and committed now.
    await wait_committed(kafka_bootstrap, "frs-results-tracker",
                         [RESULTS_EVENTS.name, DISPATCH_EVENTS.name])
    await asyncio.sleep(1.0)
    events = await results_for(kafka_bootstrap, probe)
    [settled] = [e for e in events if isinstance(e, ProbeSettled)]
    assert sorted(settled.answered) == sorted([a, b]) and settled.failed == [c]
    assert results.stop() == 0

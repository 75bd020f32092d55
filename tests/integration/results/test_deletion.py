"""Deletion receipts on the real broker: a provider that misses its deletion deadline gets
DeletionOverdue and, when configured, a suspension request (results' one narrow say over
a provider, frs.registry.suspensions); every registry view applies it, and dispatch then
refuses the provider."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.catalog import DISPATCH_EVENTS, POLICY_DECISIONS
from schemas.events import DeletionConfirmed, DeletionOverdue, DispatchFailed
from services.cli.dispatch import start_groups_at_end
from tests.conftest import ServiceProcess
from tests.factories import submitted
from tests.integration.results.conftest import (
    cleared,
    count,
    dispatched,
    now,
    provider_record,
    publish,
    results_for,
    suspensions,
    uid,
    wait_results,
)

pytestmark = pytest.mark.integration


async def test_missed_deletion_deadline_suspends_provider_and_dispatch_refuses_it(
    kafka_bootstrap: str, services: dict[str, ServiceProcess], face_jpeg: bytes
) -> None:
    probe, late, prompt = uid("prb"), uid("late"), uid("prompt")
    await publish(kafka_bootstrap, [provider_record(late), provider_record(prompt)])
    results = services["results"]
    results.start(FRS_RESULTS_TICK_S="0.2", FRS_RESULTS_SUSPEND_ON_DELETION_OVERDUE="true")
    results.wait_log("consumer started")
    await publish(kafka_bootstrap, [
        cleared(probe, late, prompt), dispatched(probe, late, deletion_s=3),
        dispatched(probe, prompt, deletion_s=3),
        DeletionConfirmed(probe_id=probe, provider_id=prompt, confirmed_at=now()),
    ])
    events = await wait_results(kafka_bootstrap, probe, lambda es: count(es, DeletionOverdue) >= 1)
    [overdue] = [e for e in events if isinstance(e, DeletionOverdue)]
    assert overdue.provider_id == late and overdue.provider_suspended
    assert overdue.due_at <= now()
    # A suspension request for the late provider and its reason; none for the prompt one.
    [asked] = await suspensions(kafka_bootstrap, late)
    assert (asked.reason, asked.probe_id) == ("deletion_overdue", probe)
    assert await suspensions(kafka_bootstrap, prompt) == []
    assert results.stop() == 0
    assert count(await results_for(kafka_bootstrap, probe), DeletionOverdue) == 1

    # Dispatch reads the registry and refuses the suspended provider. Its own consumer
    # group starts after the clearances other tests left on the topic.
    dispatch = services["dispatch"]
    group = uid("frs-dispatch-deletion")
    await start_groups_at_end(kafka_bootstrap, [(group, POLICY_DECISIONS.name)])
    image = Path(dispatch.env["FRS_STATE_DIR"]) / "probe.jpg"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(face_jpeg)
    dispatch.start(FRS_DISPATCH_GROUP_ID=group, FRS_DISPATCH_IMAGE_SOURCE="test-file",
                   FRS_DISPATCH_TEST_IMAGE_FILE=str(image))
    dispatch.wait_log("consumer started")
    probe2 = uid("prb")
    await publish(kafka_bootstrap, [submitted(probe2), cleared(probe2, late)])
    out = await wait_results(kafka_bootstrap, probe2, lambda es: count(es, DispatchFailed) >= 1,
                             topic=DISPATCH_EVENTS.name)
    [refusal] = [e for e in out if isinstance(e, DispatchFailed)]
    assert refusal.provider_id == late and refusal.reason == "suspended"
    assert dispatch.stop() == 0

"""Fault scenarios on the real pipeline (four service processes, a real broker), each with
probes in flight and checked by the history checker. The reduced form (FRS_CHAOS_PROBES,
default 60) runs in the normal suite; deploy/chaos.sh runs 1,000+ per scenario.

A service that exits on a fault is restarted, as its supervisor would, and counted: the
history check decides whether the run kept its promises."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.catalog import TOPICS
from schemas.envelope import Envelope, encode
from schemas.events import DispatchFailed, DispatchFailure, ProbeRejected
from schemas.types import probe_id_for, utcnow
from services.kit.bus import Publisher, read_topic
from tests.chaos.history import Report
from tests.chaos.pipeline import (
    GROUPS,
    INPUT_TOPICS,
    PROBES,
    SERVICES,
    OwnBroker,
    Pipeline,
    end_offsets,
    random_points,
    rewind_groups,
    start_own_broker,
)
from tests.conftest import ServiceProcess

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
SEED = int(os.environ.get("FRS_CHAOS_SEED", str(int(time.time()))))


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnBroker]:
    broker = start_own_broker(tmp_path_factory.mktemp("chaos-broker"))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def pipeline(own_broker: OwnBroker, tmp_path: Path, face_jpeg: bytes) -> Iterator[Pipeline]:
    p = Pipeline(own_broker.bootstrap, tmp_path, face_jpeg)
    try:
        yield p
    finally:
        for proc in p.procs.values():
            if proc.proc is not None and proc.proc.poll() is None:
                proc.kill()


def revive(pipeline: Pipeline, report_crashes: dict[str, int]) -> None:
    """Restart every service that exited, as a supervisor would; count it."""
    for name, up in pipeline.alive().items():
        if not up:
            report_crashes[name] = report_crashes.get(name, 0) + 1
            pipeline.restart(name)


def verdict(name: str, report: Report, **extra: object) -> None:
    print(json.dumps({"scenario": name, "seed": SEED, **report.summary(), **extra}))
    assert report.ok, report.summary()
    assert report.stats["requests"] >= len(report.outcomes) > 0


async def test_no_fault_baseline(pipeline: Pipeline) -> None:
    """The control: the same load without a fault passes the same check."""
    pipeline.start()
    await pipeline.submit()
    verdict("baseline", await pipeline.check())


async def test_sigkill_each_service_in_turn_then_restart(pipeline: Pipeline) -> None:
    pipeline.start()
    points = random_points(PROBES, len(SERVICES), SEED)
    order = dict(zip(points, SERVICES, strict=True))
    killed: list[str] = []

    def during(i: int) -> None:
        if i in order:
            pipeline.kill(order[i])  # SIGKILL: no drain, no commit
            killed.append(order[i])
            pipeline.restart(order[i])

    await pipeline.submit(during=during)
    assert killed == list(SERVICES)
    verdict("sigkill_each_service", await pipeline.check(), killed_at=points)


async def test_sigstop_consumer_past_session_timeout_then_sigcont(pipeline: Pipeline) -> None:
    """A zombie: intake frozen past its session timeout while a second instance takes its
    partitions; when it wakes it still holds a batch it may publish."""
    pipeline.start()
    second = ServiceProcess("intake", pipeline.procs["intake"].env, pipeline.tmp / "intake2.log")
    pipeline.procs["intake2"] = second  # stopped and checked with the rest
    second.start()
    second.wait_log('"consumer started"', timeout=90)
    point = random_points(PROBES, 1, SEED)[0]
    frozen: list[float] = []

    async def during(i: int) -> None:
        if i == point:
            pipeline.signal("intake", signal.SIGSTOP)
            frozen.append(time.monotonic())

            async def thaw() -> None:
                await asyncio.sleep(14)  # aiokafka's session timeout is 10 s
                pipeline.signal("intake", signal.SIGCONT)

            asyncio.get_running_loop().create_task(thaw())

    await pipeline.submit(during=during)
    remaining = 15 - (time.monotonic() - frozen[0])
    if remaining > 0:
        await asyncio.sleep(remaining)
    assert pipeline.alive()["intake"]
    verdict("sigstop_zombie", await pipeline.check())


async def test_broker_killed_and_restarted_mid_stream(
    pipeline: Pipeline, own_broker: OwnBroker
) -> None:
    pipeline.start()
    point = random_points(PROBES, 1, SEED)[0]
    crashes: dict[str, int] = {}

    def during(i: int) -> None:
        if i == point:
            own_broker.restart(signal.SIGKILL)

    await pipeline.submit(during=during)
    await asyncio.sleep(5)
    revive(pipeline, crashes)
    verdict("broker_restart", await pipeline.check(), services_restarted=crashes)


async def test_offsets_rewound_stretch_processed_again(pipeline: Pipeline) -> None:
    """Every group is rewound to where the run started while the services are stopped:
    the whole run is processed a second time. Effects must not repeat."""
    topics = sorted({t for ts in GROUPS.values() for t in ts})
    start = await end_offsets(pipeline.bootstrap, topics)
    pipeline.start()
    await pipeline.submit()
    await pipeline.wait_terminal()
    await asyncio.sleep(3)
    pipeline.stop_all()
    await rewind_groups(pipeline.bootstrap, start)
    pipeline.start()
    await asyncio.sleep(10)
    report = await pipeline.check()
    assert report.stats["redelivered_effects"] > 0 or report.stats["requests"] == 0, \
        "the rewind did not make anything run twice: the scenario tested nothing"
    verdict("offsets_rewound", report)


async def test_poison_messages_in_every_input_topic(pipeline: Pipeline) -> None:
    pipeline.start()
    points = set(random_points(PROBES, 3, SEED))
    good = encode(DispatchFailed(probe_id="prb-poison", provider_id="p",
                                 reason=DispatchFailure.RETRIES_EXHAUSTED, detail="x",
                                 failed_at=utcnow()), "/chaos/poison")
    wrong_type = [(k, b"frs.no.such.type.v1" if k == "ce_type" else v) for k, v in good.headers]
    bodies = [(good.headers, b"not json {"), (wrong_type, good.value), ([], b"no headers"),
              (good.headers, b'{"probe_id": 1}')]
    sent: list[tuple[str, str]] = []

    async def during(i: int) -> None:
        if i in points:
            async with Publisher(pipeline.bootstrap, "/chaos/poison") as pub:
                for topic in INPUT_TOPICS:
                    for headers, value in bodies:
                        key = f"poison-{pipeline.run}-{uuid.uuid4().hex[:6]}"
                        pipeline.poison_keys.append(key)
                        await (await pub.send_raw(topic, key.encode(), value, headers))
                        sent.append((topic, key))

    await pipeline.submit(during=during)
    report = await pipeline.check()
    assert all(pipeline.alive()[n] for n in ("intake", "dispatch", "results"))
    # Each poison record was set aside (a DLQ copy naming where it came from) or, on the
    # request topic, answered with a rejection: none was dropped silently.
    dlq_topics = [t.name for t in TOPICS if t.name.startswith("frs.dlq.")]
    handled = {(dict(r.headers).get("frs_source_topic", b"").decode(), (r.key or b"").decode())
               for r, _d in await read_topic(pipeline.bootstrap, dlq_topics)}
    rejected = {d.subject for _r, d in await read_topic(pipeline.bootstrap, ["frs.probe.events"])
                if isinstance(d, Envelope) and isinstance(d.event, ProbeRejected)}
    dropped = [(t, k) for t, k in sent
               if (t, k) not in handled and probe_id_for(k) not in rejected]
    assert not dropped, f"poison records neither in a DLQ nor rejected: {dropped[:5]}"
    verdict("poison", report, poison_sent=len(sent))

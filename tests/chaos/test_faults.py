"""Fault scenarios on the real pipeline (four service processes, a real broker, an HTTPS
vendor simulator answering on the results webhook), each with probes in flight and
checked by the history checker. The reduced form (FRS_CHAOS_PROBES, default 60) runs in
the normal suite; deploy/chaos.sh runs 1,000+ per scenario.

A service that exits on a fault is restarted, as its supervisor would, and reported: the
history check decides whether the run kept its promises."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from schemas.catalog import TOPICS
from schemas.envelope import Envelope, encode
from schemas.events import DispatchFailed, DispatchFailure, ProbeRejected
from schemas.types import probe_id_for, utcnow
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from services.simulators.vendor import VendorBehaviour
from tests.chaos.history import Report
from tests.chaos.pipeline import (
    CHAOS_ENV,
    GROUPS,
    INPUT_TOPICS,
    PROBES,
    ChaosRun,
    OwnBroker,
    freeze,
    random_points,
    rewind_groups,
    start_own_broker,
)
from tests.helpers import end_offsets

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
SEED = int(os.environ.get("FRS_CHAOS_SEED", str(int(time.time()))))
SERVICES = ("intake", "dispatch", "results", "audit")
RATE = float(os.environ.get("FRS_CHAOS_RATE", "40"))
DEADLINE_S = int(os.environ.get("FRS_CHAOS_DEADLINE_S", "20"))


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnBroker]:
    broker = start_own_broker(tmp_path_factory.mktemp("chaos-broker"))
    try:
        yield broker
    finally:
        broker.stop()


async def make_run(broker: OwnBroker, tmp: Path, image: bytes,
                   behaviour: VendorBehaviour | None = None,
                   env: dict[str, str] | None = None) -> ChaosRun:
    # A short answer deadline: an answer lost to a fault settles as NoResponse quickly.
    run = ChaosRun(broker.bootstrap, tmp, image, behaviour=behaviour or VendorBehaviour(),
                   response_deadline_s=DEADLINE_S,
                   extra_env=dict(CHAOS_ENV) if env is None else env)
    return await run.start()


@pytest.fixture
async def chaos(own_broker: OwnBroker, tmp_path: Path, face_jpeg: bytes
                ) -> AsyncIterator[ChaosRun]:
    run = await make_run(own_broker, tmp_path, face_jpeg)
    try:
        yield run
    finally:
        await run.stop()


def verdict(name: str, report: Report, **extra: object) -> None:
    print(json.dumps({"scenario": name, "seed": SEED, "probes": PROBES, **report.summary(),
                      **extra}))
    assert report.ok, report.summary()
    assert report.stats["requests"] == report.stats["acknowledged"] > 0


async def test_no_fault_baseline(chaos: ChaosRun) -> None:
    """The control: the same load without a fault passes the same check."""
    await chaos.submit(PROBES, RATE)
    report = await chaos.check()
    assert report.stats["sends"] == PROBES  # the vendor really received each probe once
    verdict("baseline", report)


async def test_sigkill_each_service_in_turn_then_restart(chaos: ChaosRun) -> None:
    points = random_points(PROBES, len(SERVICES), SEED)
    order = dict(zip(points, SERVICES, strict=True))
    killed: list[str] = []

    async def during(i: int) -> None:
        if i in order:
            await chaos.kill(order[i])  # SIGKILL: no drain, no commit
            killed.append(order[i])
            await chaos.restart(order[i])

    await chaos.submit(PROBES, RATE, during)
    assert killed == list(SERVICES)
    verdict("sigkill_each_service", await chaos.check(), killed_at=points)


async def test_sigstop_consumer_past_session_timeout_then_sigcont(chaos: ChaosRun) -> None:
    """A zombie: dispatch frozen past its session timeout while a second instance takes
    its partitions; when it wakes it still holds a batch it may try to send."""
    from services.cli.pipeline_rig import Service

    first = chaos.procs["dispatch"]
    second = Service("dispatch", {**first.env, "FRS_DISPATCH_INSTANCE_ID": "second"},
                     chaos.workdir / "dispatch2.log")
    chaos.procs["dispatch2"] = second
    await chaos.start_services("dispatch2")
    point = random_points(PROBES, 1, SEED)[0]
    thawed: list[asyncio.Task[None]] = []

    async def during(i: int) -> None:
        if i == point:
            thawed.append(freeze(first, 14))  # aiokafka's session timeout is 10 s

    await chaos.submit(PROBES, RATE, during)
    await thawed[0]
    assert first.alive and second.alive
    verdict("sigstop_zombie", await chaos.check())


@pytest.fixture
async def chaos_long_ttl(own_broker: OwnBroker, tmp_path: Path, face_jpeg: bytes
                         ) -> AsyncIterator[ChaosRun]:
    """Images keep their normal lifetime: the outage must not race the purger (that race,
    dispatch sending after a purge, is the known finding tested on its own)."""
    run = await make_run(own_broker, tmp_path, face_jpeg, env={})
    try:
        yield run
    finally:
        await run.stop()


async def test_broker_killed_and_restarted_mid_stream(
    chaos_long_ttl: ChaosRun, own_broker: OwnBroker
) -> None:
    chaos = chaos_long_ttl
    point = random_points(PROBES, 1, SEED)[0]

    async def during(i: int) -> None:
        if i == point:
            await asyncio.to_thread(own_broker.restart, signal.SIGKILL)

    await chaos.submit(PROBES, RATE, during)
    await asyncio.sleep(5)
    restarted = await chaos.revive()
    verdict("broker_restart", await chaos.check(), services_restarted=restarted)


async def test_offsets_rewound_stretch_processed_again(chaos: ChaosRun) -> None:
    """Every group is rewound to where the run started while the services are stopped:
    the whole run is processed a second time. No effect may repeat."""
    topics = sorted({t for ts in GROUPS.values() for t in ts})
    start = await end_offsets(chaos.bootstrap, topics)
    await chaos.submit(PROBES, RATE)
    await chaos.wait_terminal()
    await asyncio.sleep(3)
    for p in chaos.procs.values():
        p.signal(signal.SIGTERM)
    for p in chaos.procs.values():
        await p.wait_exit()
    await rewind_groups(chaos.bootstrap, start)
    await chaos.start_services()
    await asyncio.sleep(15)
    report = await chaos.check()
    assert report.stats["redelivered_effects"] > 0, \
        "the rewind made nothing run twice: the scenario tested nothing"
    verdict("offsets_rewound", report)


async def test_poison_messages_in_every_input_topic(chaos: ChaosRun) -> None:
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
            async with Publisher(chaos.bootstrap, "/chaos/poison") as pub:
                for topic in INPUT_TOPICS:
                    for headers, value in bodies:
                        key = f"poison-{chaos.run}-{uuid.uuid4().hex[:6]}"
                        chaos.poison_keys.append(key)
                        await (await pub.send_raw(topic, key.encode(), value, headers))
                        sent.append((topic, key))

    await chaos.submit(PROBES, RATE, during)
    await chaos.wait_terminal()
    assert all(chaos.alive()[n] for n in ("intake", "dispatch", "results"))
    report = await chaos.check()
    # Each poison record was set aside (a DLQ copy naming where it came from) or, on the
    # request topic, answered with a rejection: none was dropped silently.
    dlq_topics = [t.name for t in TOPICS if t.name.startswith("frs.dlq.")]
    handled = {(dict(r.headers).get("frs_source_topic", b"").decode(), (r.key or b"").decode())
               for r, _d in await read_topic(chaos.bootstrap, dlq_topics)}
    rejected = {d.subject for _r, d in await read_topic(chaos.bootstrap, ["frs.probe.events"])
                if isinstance(d, Envelope) and isinstance(d.event, ProbeRejected)}
    dropped = [(t, k) for t, k in sent
               if (t, k) not in handled and probe_id_for(k) not in rejected]
    assert not dropped, f"poison records neither in a DLQ nor rejected: {dropped[:5]}"
    verdict("poison", report, poison_sent=len(sent))


async def test_vendor_times_out_fails_malformed_and_answers_twice(
    own_broker: OwnBroker, tmp_path: Path, face_jpeg: bytes
) -> None:
    behaviour = VendorBehaviour(error_rate=0.2, timeout_rate=0.05, hang_s=6.0,
                                malformed_rate=0.1, answer_twice=True)
    # Images keep their normal lifetime here: a send racing a purge is the next test.
    run = await make_run(own_broker, tmp_path, face_jpeg, behaviour, env={})
    try:
        await run.submit(PROBES, RATE)
        report = await run.check()
        assert run.vendor is not None
        raw = sum(run.vendor.state.copies.values())
        # The faults were real: more raw requests than accepted sends.
        assert raw > report.stats["sends"], (raw, report.stats["sends"])
        verdict("vendor_misbehaves", report, raw_requests=raw)
    finally:
        await run.stop()


# Was a finding (dispatch sent a retry after the purger shredded the image); dispatch now
# re-checks the vault entry (stored, not past expiry) before every attempt.
async def test_vendor_hangs_while_the_image_expires_no_send_after_purge(
    own_broker: OwnBroker, tmp_path: Path, face_jpeg: bytes
) -> None:
    behaviour = VendorBehaviour(timeout_rate=0.5, hang_s=6.0)
    run = await make_run(own_broker, tmp_path, face_jpeg, behaviour,
                         env={"FRS_INTAKE_IMAGE_TTL_HOURS": str(8 / 3600),
                              "FRS_INTAKE_PURGE_INTERVAL_S": "1"})
    try:
        await run.submit(max(20, PROBES // 3), RATE)
        verdict("vendor_hangs_past_expiry", await run.check())
    finally:
        await run.stop()

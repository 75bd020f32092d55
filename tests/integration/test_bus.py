"""The kit's delivery guarantees on a real broker: redelivery after a crash before
commit, poison records to the DLQ without blocking the partition, idempotent topics."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.catalog import OVERSIGHT_INTERNAL, TOPICS, Topic
from schemas.envelope import Envelope, encode
from schemas.events import DispatchFailed, DispatchFailure, Event, ProbeRejected
from schemas.types import utcnow
from services.kit.processor import Processor
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from services.kit.routing import Route
from services.kit.topics import ensure_topics
from tests.conftest import ROOT
from tests.helpers import events_of, subject_is, wait_records
from tests.integration.relay_service import RELAY_DLQ, RELAY_TOPIC

pytestmark = pytest.mark.integration

RELAY_TOPICS = (
    Topic(RELAY_TOPIC, "probe_id", 1, 3_600_000, "delete", (), "test input"),
    Topic(RELAY_DLQ, "key", 1, 3_600_000, "delete", (), "test dlq"),
)


@pytest.fixture
async def relay_topics(kafka_bootstrap: str) -> None:
    await ensure_topics(kafka_bootstrap, topics=RELAY_TOPICS)




def start_relay(service_env: dict[str, str], log: Path, kill: bool) -> subprocess.Popen[bytes]:
    env = {**service_env, "RELAY_KILL_BEFORE_COMMIT": "1" if kill else "0"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tests.integration.relay_service"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def failed(probe_id: str, detail: str = "test") -> DispatchFailed:
    return DispatchFailed(probe_id=probe_id, provider_id="prov-1",
                          reason=DispatchFailure.RETRIES_EXHAUSTED, detail=detail,
                          failed_at=utcnow())


async def test_sigkill_after_handling_before_commit_redelivers(
    kafka_bootstrap: str, relay_topics: None, service_env: dict[str, str], tmp_path: Path
) -> None:
    probe = f"prb-{uuid.uuid4()}"
    async with Publisher(kafka_bootstrap, "/test") as pub:
        fut = await pub.send(failed(probe), topic=RELAY_TOPIC)
        await fut
    log = tmp_path / "relay.log"
    first = start_relay(service_env, log, kill=True)
    assert first.wait(timeout=60) == -9, log.read_text()
    # The handler's output was published before the crash ...
    out = await wait_records(kafka_bootstrap, ["frs.probe.events"], subject_is(probe), count=1)
    assert "fault injection: SIGKILL before commit" in log.read_text()
    # ... and since the offset was not committed, the restarted consumer handles it again.
    second = start_relay(service_env, log, kill=False)
    try:
        out = await wait_records(kafka_bootstrap, ["frs.probe.events"], subject_is(probe), count=2)
        envelopes = events_of(out)
        assert len(envelopes) == 2
        # Both outputs derive from the same input event: a redelivery, not a new request.
        assert envelopes[0].causation_id == envelopes[1].causation_id is not None
        assert all(isinstance(e.event, ProbeRejected) for e in envelopes)
    finally:
        second.terminate()
        assert second.wait(timeout=60) == 0
    # After a clean drain the offset is committed: a third run handles nothing again.
    third = start_relay(service_env, log, kill=False)
    try:
        with pytest.raises(AssertionError):
            await wait_records(kafka_bootstrap, ["frs.probe.events"], subject_is(probe), count=3,
                               timeout=6)
    finally:
        third.terminate()
        third.wait(timeout=60)


async def test_a_record_waiting_on_a_prerequisite_is_never_dead_lettered(
    kafka_bootstrap: str, relay_topics: None, service_env: dict[str, str], tmp_path: Path
) -> None:
    """NotYet is retried past every retry limit, and a stop while it waits leaves the
    record uncommitted, so the next run handles it once the prerequisite is there."""
    probe = f"prb-{uuid.uuid4()}"
    ready = tmp_path / "ready"
    async with Publisher(kafka_bootstrap, "/test") as pub:
        await (await pub.send(failed(probe, f"needs-file:{ready}"), topic=RELAY_TOPIC))
    try:
        log = tmp_path / "relay.log"
        first = start_relay(service_env, log, kill=False)
        try:
            # Far longer than the 3 retries with backoff from 0.2 s that would dead-letter it.
            deadline = time.monotonic() + 30
            while log.read_text().count("waiting for a prerequisite") < 1:
                assert time.monotonic() < deadline and first.poll() is None, log.read_text()
                await asyncio.sleep(0.1)
            await asyncio.sleep(4)
        finally:
            first.terminate()
            assert first.wait(timeout=60) == 0, log.read_text()
        text = log.read_text()
        assert "sent to DLQ" not in text and "handler failed" not in text
        assert "stopped with a batch left uncommitted for the next owner" in text
        try:
            with pytest.raises(AssertionError):
                await wait_records(kafka_bootstrap, ["frs.probe.events", RELAY_DLQ],
                                   lambda r, _d: r.key == probe.encode(), timeout=2)
        finally:
            ready.touch()  # whatever happens, later tests' relays can handle the record
        second = start_relay(service_env, log, kill=False)
        try:
            out = await wait_records(kafka_bootstrap, ["frs.probe.events"], subject_is(probe))
            assert [type(e.event) for e in events_of(out)] == [ProbeRejected]
        finally:
            second.terminate()
            assert second.wait(timeout=60) == 0
    finally:
        ready.touch()  # a failure here must not leave the record blocking later tests
    assert "sent to DLQ" not in log.read_text()


async def test_reached_only_once_every_record_up_to_the_mark_was_handled(
    kafka_bootstrap: str, relay_topics: None
) -> None:
    handled: list[str] = []

    async def slow(event: Any, _envelope: Envelope) -> list[Event]:
        await asyncio.sleep(0.02)
        handled.append(event.probe_id)
        return []

    async with Publisher(kafka_bootstrap, "/test") as pub:
        await asyncio.gather(*[await pub.send(failed(f"prb-behind-{i}"), topic=RELAY_TOPIC)
                               for i in range(40)])
        route = Route("relay_behind", f"frs-test-behind-{uuid.uuid4().hex[:8]}",
                      (RELAY_TOPIC,), {DispatchFailed: slow}, RELAY_DLQ)
        proc = Processor(route, pub, kafka_bootstrap, batch_max=5, concurrency=1)
        assert await proc.mark() is None  # not assigned yet: no mark, so never "reached"
        assert not await proc.reached(None)
        task = asyncio.create_task(proc.run())
        try:
            deadline = time.monotonic() + 60
            mark = None
            while mark is None:
                assert time.monotonic() < deadline and not task.done()
                mark = await proc.mark()
                await asyncio.sleep(0.01)
            on_topic = len(await read_topic(kafka_bootstrap, [RELAY_TOPIC]))
            assert not await proc.committed_past(mark)  # the group committed none of it yet
            # Later records do not move a mark already taken.
            await (await pub.send(failed("prb-behind-late"), topic=RELAY_TOPIC))
            checks = 0
            while not await proc.reached(mark):
                assert time.monotonic() < deadline and not task.done()
                checks += 1
                await asyncio.sleep(0.01)
            assert checks > 0  # 40 records at 20 ms each: not reached at once
            # Everything before the mark (this test's 40 and earlier tests') is handled.
            assert len(handled) >= on_topic >= 40
            assert {f"prb-behind-{i}" for i in range(40)} <= set(handled)
            # The group's commit (after the batches' effects) follows: what the audit's
            # many instances judge by.
            while not await proc.committed_past(mark):
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
        finally:
            proc.stop()
            await task
        assert not await proc.reached(mark)  # stopped: nothing more will be read


async def test_poison_records_go_to_dlq_and_partition_moves_on(
    kafka_bootstrap: str, relay_topics: None, service_env: dict[str, str], tmp_path: Path
) -> None:
    probe = f"prb-{uuid.uuid4()}"
    key = probe.encode()
    good = encode(failed(probe), "/test")
    missing_field = json.loads(good.value)
    del missing_field["provider_id"]
    wrong_type = [(k, b"frs.no.such.type.v1" if k == "ce_type" else v) for k, v in good.headers]
    async with Publisher(kafka_bootstrap, "/test") as pub:
        for headers, value in (
            (good.headers, b"this is not json {"),            # not JSON
            (wrong_type, good.value),                            # unknown type
            (good.headers, json.dumps(missing_field).encode()),  # lacks a field
            ([], b"no headers at all"),                          # not a CloudEvent
            (good.headers, good.value),                          # the next good record
        ):
            await (await pub.send_raw(RELAY_TOPIC, key, value, headers))
    proc = start_relay(service_env, tmp_path / "relay.log", kill=False)
    try:
        dlq = await wait_records(kafka_bootstrap, [RELAY_DLQ],
                                 lambda r, _d: r.key == key, count=4)
        codes = [dict(r.headers)["frs_error_code"].decode() for r, _ in dlq]
        assert codes == ["not_json", "unknown_type", "invalid_event", "not_cloudevent"]
        for raw, _ in dlq:
            headers = dict(raw.headers)
            assert headers["frs_source_topic"] == RELAY_TOPIC.encode()
            assert headers["frs_error_service"] == b"relay"
            assert headers["frs_error"]
        # The DLQ copy keeps the original headers, so an operator can re-drive it.
        assert dict(dlq[1][0].headers)["ce_type"] == b"frs.no.such.type.v1"
        assert "provider_id" in dict(dlq[2][0].headers)["frs_error"].decode()
        # The good record behind the poison ones on the same partition was processed.
        out = await wait_records(kafka_bootstrap, ["frs.probe.events"], subject_is(probe))
        assert isinstance(events_of(out)[0].event, ProbeRejected)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert "sent to DLQ" in (tmp_path / "relay.log").read_text()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


async def test_topics_create_twice_changes_nothing_the_second_time(
    kafka_bootstrap: str, service_env: dict[str, str]
) -> None:
    fresh = Topic(f"frs.test.fresh-{uuid.uuid4().hex[:8]}", "k", 2, 3_600_000, "delete", (),
                  "test")
    first = await ensure_topics(kafka_bootstrap, topics=(fresh,))
    second = await ensure_topics(kafka_bootstrap, topics=(fresh,))
    assert [s.action for s in first] == ["created"]
    assert [s.action for s in second] == ["ok"]
    # The real catalog through the real command: the second run reports every topic ok.
    run_cli("topics", "create", env=service_env)
    result = run_cli("topics", "create", "--json", env=service_env)
    assert result.returncode == 0, result.stderr
    statuses = json.loads(result.stdout)
    # The catalog, and the oversight app's own topics (faust does not declare them here).
    assert {s["topic"] for s in statuses} == {t.name for t in (*TOPICS, *OVERSIGHT_INTERNAL)}
    assert {s["action"] for s in statuses} == {"ok"}




async def test_a_topic_taken_over_from_another_group_starts_where_that_group_stopped(
    kafka_bootstrap: str,
) -> None:
    """Route.offsets_from (an upgrade that merges routes: results' normalizer into its
    tracker): partitions the route's group never committed start at the former group's
    offsets; a topic without a former group starts at the reset policy; once the group has
    committed, its own offsets win."""
    run = uuid.uuid4().hex[:8]
    taken, own = f"frs.test.taken-{run}", f"frs.test.own-{run}"
    former, group = f"frs-test-former-{run}", f"frs-test-merged-{run}"
    await ensure_topics(kafka_bootstrap, topics=tuple(
        Topic(n, "probe_id", 3, 3_600_000, "delete", (), "test") for n in (taken, own)))
    handled: list[str] = []

    async def record(event: Any, _envelope: Envelope) -> list[Event]:
        handled.append(event.probe_id)
        return []

    async def publish(pub: Publisher, topic: str, ids: list[str]) -> None:
        await asyncio.gather(*[await pub.send(failed(i), topic=topic) for i in ids])

    async def former_commits(at_end: bool) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=former,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            parts = [TopicPartition(taken, p) for p in range(3)]
            consumer.assign(parts)
            ends = await consumer.end_offsets(parts)
            await consumer.commit({tp: ends[tp] if at_end else 0 for tp in parts})
        finally:
            await consumer.stop()

    parts = [TopicPartition(taken, p) for p in range(3)]

    async def ends() -> dict[TopicPartition, int]:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
        await consumer.start()
        try:
            return dict(await consumer.end_offsets(parts))
        finally:
            await consumer.stop()

    async def group_committed() -> dict[TopicPartition, int | None]:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            return {tp: await consumer.committed(tp) for tp in parts}
        finally:
            await consumer.stop()

    async def run_until_read(pub: Publisher) -> None:
        route = Route("relay_merged", group, (taken, own), {DispatchFailed: record},
                      RELAY_DLQ, offsets_from={taken: former})
        proc = Processor(route, pub, kafka_bootstrap)
        task = asyncio.create_task(proc.run())
        try:
            deadline = time.monotonic() + 60
            mark = None
            while mark is None or not await proc.reached(mark):
                assert time.monotonic() < deadline and not task.done()
                mark = mark or await proc.mark()
                await asyncio.sleep(0.05)
        finally:
            proc.stop()
            await task

    async with Publisher(kafka_bootstrap, "/test") as pub:
        old = [f"prb-old-{run}-{i}" for i in range(6)]
        # One new answer: at least two partitions get none after the former group's commit.
        new = [f"prb-new-{run}-0"]
        mine = [f"prb-own-{run}-{i}" for i in range(3)]
        await publish(pub, taken, old)
        await publish(pub, own, mine)
        await former_commits(at_end=True)  # the former group normalized the old answers
        await publish(pub, taken, new)
        await run_until_read(pub)
        assert sorted(handled) == sorted(new + mine)  # none of the old, each new once
        # The inherited positions are the group's own at once, also on a partition that
        # got no new record: they no longer depend on the former group's offsets.
        assert await group_committed() == await ends()
        # Once committed, the group's own offsets win over the former group's.
        handled.clear()
        await former_commits(at_end=False)
        await run_until_read(pub)
        assert handled == []

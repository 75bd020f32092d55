"""The processor's side of fencing (services/kit/processor.py, services/kit/fencing.py),
without a broker: the scope a handler's writes carry, and what a refused write does."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiokafka import TopicPartition

from schemas.events import Event
from services.kit.fencing import Fenced, FenceScope, current_scope
from services.kit.processor import Processor
from services.kit.publisher import Publisher
from services.kit.routing import RawRecord, Route


class Leases:
    table = "dispatch_leases"

    async def take(self, group_id: str, partitions: Iterable[int], holder: str
                   ) -> dict[int, int]:
        return dict.fromkeys(partitions, 7)


def record(partition: int, offset: int = 0) -> Any:
    return SimpleNamespace(topic="t", partition=partition, offset=offset, key=b"k",
                           value=b"{}", headers=[], timestamp=0, timestamp_type=0)


def processor(on_record: Any, *, leased: bool = True) -> Processor:
    route = Route("unit", "g", ("t",), {}, "t.dlq", on_record=on_record,
                  leases=Leases() if leased else None)
    return Processor(route, cast(Publisher, None), "127.0.0.1:9", max_retries=0,
                     retry_backoff_s=0)


async def test_a_handler_writes_under_its_partition_lease_and_so_do_its_tasks() -> None:
    seen: list[FenceScope | None] = []

    async def handle(_raw: RawRecord, _decoded: Any) -> list[Event]:
        async def inner() -> None:
            seen.append(current_scope())
        seen.append(current_scope())
        await asyncio.create_task(inner())
        return []

    proc = processor(handle)
    try:
        await proc._assigned({TopicPartition("t", 2)})
        assert await proc._handle_record(record(2)) == []
    finally:
        await proc._consumer.stop()
    assert seen == [FenceScope("dispatch_leases", "g", {2: 7})] * 2
    assert current_scope() is None, "nothing outside the handler"


async def test_without_leases_there_is_no_scope() -> None:
    seen: list[FenceScope | None] = []

    async def handle(_raw: RawRecord, _decoded: Any) -> list[Event]:
        seen.append(current_scope())
        return []

    proc = processor(handle, leased=False)
    try:
        await proc._handle_record(record(0))
    finally:
        await proc._consumer.stop()
    assert seen == [None]


async def test_a_refused_write_drops_the_partition_until_it_is_assigned_again(
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    async def handle(raw: RawRecord, _decoded: Any) -> list[Event]:
        calls.append(raw.offset)
        raise Fenced("g", [raw.partition])

    proc = processor(handle)
    tp0 = TopicPartition("t", 0)
    try:
        await proc._assigned({tp0, TopicPartition("t", 1)})
        with caplog.at_level(logging.WARNING, "frs.processor"):
            assert await proc._handle_record(record(0, 10)) == []
            assert await proc._handle_record(record(0, 11)) == []  # not handled at all
        assert calls == [10], "no retry, no DLQ: the lease's owner handles it"
        assert proc._leases == {1: 7}
        assert [r.getMessage() for r in caplog.records] == [
            "partition lease lost to a newer owner: dropped its work"]
        await proc._assigned({tp0})
        await proc._handle_record(record(0, 12))
        assert calls == [10, 12]
    finally:
        await proc._consumer.stop()


async def test_work_from_before_our_own_newer_lease_is_dropped_quietly(
        caplog: pytest.LogCaptureFixture) -> None:
    proc: Processor

    async def handle(raw: RawRecord, _decoded: Any) -> list[Event]:
        proc._leases[raw.partition] = 8  # a rebalance gave it back to us meanwhile
        raise Fenced("g", [raw.partition])

    proc = processor(handle)
    try:
        await proc._assigned({TopicPartition("t", 0)})
        with caplog.at_level(logging.WARNING, "frs.processor"):
            assert await proc._handle_record(record(0)) == []
        assert proc._leases == {0: 8} and caplog.records == []
    finally:
        await proc._consumer.stop()


async def test_on_assigned_loads_state_after_the_leases_are_taken() -> None:
    loaded: list[tuple[list[int], dict[int, int]]] = []
    proc: Processor

    async def load(numbers: Any) -> None:
        loaded.append((list(numbers), dict(proc._leases)))

    async def handle(_raw: RawRecord, _decoded: Any) -> list[Event]:
        return []

    route = Route("unit", "g", ("t",), {}, "t.dlq", on_record=handle, leases=Leases(),
                  on_assigned=load)
    proc = Processor(route, cast(Publisher, None), "127.0.0.1:9")
    try:
        await proc._assigned({TopicPartition("t", 2), TopicPartition("t", 0)})
    finally:
        await proc._consumer.stop()
    assert loaded == [([0, 2], {0: 7, 2: 7})]


async def test_a_failed_lease_take_is_retried_until_the_store_answers(
        caplog: pytest.LogCaptureFixture) -> None:
    """A store restarting while partitions are assigned: the take is tried again (no
    rebalance may come to retry it), and the partitions are acted on once it succeeds."""

    class Flaky(Leases):
        tries = 0

        async def take(self, group_id: str, partitions: Iterable[int], holder: str
                       ) -> dict[int, int]:
            self.tries += 1
            if self.tries < 3:
                raise ConnectionError("the database system is shutting down")
            return await super().take(group_id, partitions, holder)

    async def handle(_raw: RawRecord, _decoded: Any) -> list[Event]:
        return []

    leases = Flaky()
    route = Route("unit", "g", ("t",), {}, "t.dlq", on_record=handle, leases=leases)
    proc = Processor(route, cast(Publisher, None), "127.0.0.1:9")
    try:
        with caplog.at_level(logging.ERROR, logger="frs.processor"):
            await proc._assigned({TopicPartition("t", 1)})
    finally:
        await proc._consumer.stop()
    assert leases.tries == 3 and proc._leases == {1: 7}
    assert proc._leases_ready.is_set()
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2

"""aiokafka 0.14 reads only the per-partition errors of an OffsetFetch answer. From
version 2 the broker sends a group it cannot serve now (coordinator loading, moved, timed
out) the error at the top with no partitions, which aiokafka took for "nothing committed":
the consumer replayed its topics from the start (auto_offset_reset) and the admin client
returned no offsets (where the tracker would not have found the former group's). The kit
makes both raise the error (services/kit/kafka.py). Run against aiokafka's own code with a
stub connection; the broker side is OffsetFetchRequest.getErrorResponse in Kafka."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.consumer.group_coordinator import GroupCoordinator
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    GroupLoadInProgressError,
    NotCoordinatorForGroupError,
)
from aiokafka.protocol.commit import OffsetFetchResponse_v1, OffsetFetchResponse_v3
from aiokafka.structs import OffsetAndMetadata

from services.kit.kafka import guard_offset_fetch, offset_fetch_error

TP = TopicPartition("frs.provider.responses", 0)


def group_error(code: int) -> OffsetFetchResponse_v3:
    return OffsetFetchResponse_v3(0, [], code)


def committed(offset: int) -> OffsetFetchResponse_v3:
    return OffsetFetchResponse_v3(0, [(TP.topic, [(TP.partition, offset, "", 0)])], 0)


class Connection:
    def __init__(self, response: Any) -> None:
        self.response = response

    async def send(self, _node: int, _request: Any, **_: Any) -> Any:
        return self.response


def coordinator(response: Any) -> Any:
    # aiokafka's own class, its connection stubbed: only what the fetch path reads.
    stub: Any = object.__new__(GroupCoordinator)
    stub.coordinator_id, stub.group_id, stub._client = 1, "frs-results-tracker", \
        Connection(response)
    stub._coordinator_dead_fut = asyncio.get_running_loop().create_future()
    return stub


def admin(response: Any) -> Any:
    stub: Any = object.__new__(AIOKafkaAdminClient)
    stub._client = Connection(response)
    return stub


def test_only_a_group_level_offset_fetch_error_is_picked_out() -> None:
    assert isinstance(offset_fetch_error(group_error(14)), GroupLoadInProgressError)
    assert isinstance(offset_fetch_error(group_error(16)), NotCoordinatorForGroupError)
    assert offset_fetch_error(committed(7)) is None
    # Version 1 has no top-level error (the broker repeats it on every partition).
    assert offset_fetch_error(OffsetFetchResponse_v1([])) is None
    assert offset_fetch_error(object()) is None


async def test_the_consumer_retries_instead_of_taking_nothing_committed() -> None:
    guard_offset_fetch()
    guard_offset_fetch()  # idempotent: one wrapper, not two
    loading = coordinator(group_error(14))
    with pytest.raises(GroupLoadInProgressError):
        await loading._do_fetch_commit_offsets([TP])
    moved = coordinator(group_error(16))
    with pytest.raises(NotCoordinatorForGroupError):
        await moved._do_fetch_commit_offsets([TP])
    assert moved.coordinator_id is None  # it looks the coordinator up again
    with pytest.raises(GroupAuthorizationFailedError):  # not retriable: the start fails
        await coordinator(group_error(30))._do_fetch_commit_offsets([TP])
    assert await coordinator(committed(7))._do_fetch_commit_offsets([TP]) == {
        TP: OffsetAndMetadata(7, "")}


async def test_the_admin_client_raises_instead_of_returning_no_offsets() -> None:
    guard_offset_fetch()
    with pytest.raises(NotCoordinatorForGroupError):
        await admin(group_error(16)).list_consumer_group_offsets(
            "frs-results", group_coordinator_id=1, partitions=[TP])
    offsets = await admin(committed(7)).list_consumer_group_offsets(
        "frs-results", group_coordinator_id=1, partitions=[TP])
    assert offsets == {TP: OffsetAndMetadata(7, "")}

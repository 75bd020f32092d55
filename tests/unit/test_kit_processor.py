"""Processor bookkeeping that must survive a rebalance, without a broker."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from aiokafka import TopicPartition

from services.kit.processor import Processor
from services.kit.publisher import Publisher
from services.kit.routing import Route

TP = TopicPartition("t", 0)


def _processor(commit_interval_s: float = 0.0) -> Processor:
    # A consumer that was never started owns no partition: exactly a batch's state after a
    # rebalance took its partition while its acknowledgements were awaited.
    route = Route(service="unit_revoked", group_id="g", topics=("t",), handlers={},
                  dlq_topic="t.dlq")
    return Processor(route, cast(Publisher, None), "127.0.0.1:9",
                     commit_interval_s=commit_interval_s)


async def test_a_batch_whose_partition_was_revoked_finishes_without_crashing() -> None:
    proc = _processor()
    batch: dict[TopicPartition, list[Any]] = {TP: [SimpleNamespace(offset=41)]}
    try:
        await proc._finish_batch(batch, {TP: 0}, [], None)
    finally:
        await proc._consumer.stop()
    assert proc.processed == 1
    # Nothing to commit for a partition that is no longer ours, and nothing kept for later.
    assert proc._done == {}


async def test_offsets_of_a_batch_fetched_before_a_revocation_are_never_recorded() -> None:
    # A long commit interval keeps what is recorded in _done, for the test to see.
    proc = _processor(commit_interval_s=3600)
    batch: dict[TopicPartition, list[Any]] = {TP: [SimpleNamespace(offset=41)]}
    try:
        proc._committed_at = float("inf")
        await proc._finish_batch(batch, {TP: 0}, [], None)
        assert proc._done == {TP: 42}
        # A rebalance takes the partition (and may give it back): what was done under the
        # old assignment is dropped, and a batch fetched before it records nothing.
        await proc._revoked({TP})
        assert proc._done == {}
        await proc._finish_batch(batch, {TP: 0}, [], None)
        assert proc._done == {}
        await proc._finish_batch(batch, {TP: 1}, [], None)  # fetched after it: recorded
        assert proc._done == {TP: 42}
    finally:
        await proc._consumer.stop()

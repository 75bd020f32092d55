"""Processor bookkeeping that must survive a rebalance, without a broker."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from aiokafka import TopicPartition

from services.kit.bus import Processor, Publisher, Route


async def test_a_batch_whose_partition_was_revoked_finishes_without_crashing() -> None:
    # A consumer that was never started owns no partition: exactly a batch's state after a
    # rebalance took its partition while its acknowledgements were awaited.
    route = Route(service="unit_revoked", group_id="g", topics=("t",), handlers={},
                  dlq_topic="t.dlq")
    proc = Processor(route, cast(Publisher, None), "127.0.0.1:9")
    tp = TopicPartition("t", 0)
    batch: dict[TopicPartition, list[Any]] = {tp: [SimpleNamespace(offset=41)]}
    try:
        await proc._finish_batch(batch, [], None)
    finally:
        await proc._consumer.stop()
    assert proc.processed == 1
    # Nothing to commit for a partition that is no longer ours, and nothing kept for later.
    assert proc._done == {}

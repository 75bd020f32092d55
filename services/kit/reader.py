"""Read topics from their beginning to their current end: tools, tests and auditors."""

from __future__ import annotations

import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2

from schemas.envelope import DecodeError, Envelope, decode
from services.kit.kafka import KafkaSettings, client_options
from services.kit.routing import RawRecord


async def read_topic(
    bootstrap: str, topics: Sequence[str], *, idle_s: float = 1.0, max_s: float = 30.0,
    kafka: KafkaSettings | None = None, key: bytes | None = None,
) -> list[tuple[RawRecord, Envelope | DecodeError]]:
    """Read topics from the beginning to their current end (tools, tests, auditors).

    With ``key``, only that key's records, read from the one partition per topic the
    producers' default partitioner puts it in: a lookup by probe id stays fast however
    long the topic grows."""
    consumer = AIOKafkaConsumer(
        **client_options(kafka, bootstrap), enable_auto_commit=False, group_id=None,
        isolation_level="read_committed",
    )
    await consumer.start()
    out: list[tuple[RawRecord, Envelope | DecodeError]] = []
    try:
        partitions = await all_partitions(consumer, topics)
        if key is not None:
            partitions = [_partition_of(key, [tp for tp in partitions if tp.topic == t])
                          for t in topics]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            positions = {tp: await consumer.position(tp) for tp in partitions}
            if all(positions[tp] >= end[tp] for tp in partitions):
                break
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000))
            for records in batch.values():
                for r in records:
                    if key is not None and r.key != key:
                        continue
                    raw = RawRecord(r.topic, r.partition, r.offset, r.key, r.value,
                                    [(k, bytes(v)) for k, v in (r.headers or ())])
                    try:
                        out.append((raw, decode(raw.headers, raw.key, raw.value,
                                                timestamp_ms=r.timestamp,
                                                timestamp_type=r.timestamp_type)))
                    except DecodeError as err:
                        out.append((raw, err))
    finally:
        await consumer.stop()
    return out


def _partition_of(key: bytes, partitions: list[TopicPartition]) -> TopicPartition:
    """Where the default partitioner (the Publisher's) puts ``key`` among ``partitions``."""
    ordered = sorted(partitions, key=lambda tp: tp.partition)
    return ordered[(murmur2(key) & 0x7FFFFFFF) % len(ordered)]


async def all_partitions(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of the given topics, from fresh cluster metadata."""
    cluster = await consumer._client.fetch_all_metadata()
    missing = [t for t in topics if cluster.partitions_for_topic(t) is None]
    if missing:
        # A secured broker hides topics this identity may not describe: same answer.
        raise LookupError(f"topics not found or not visible to this identity: "
                          f"{', '.join(missing)}; run `frs topics create` or check the ACLs")
    return [TopicPartition(t, p) for t in topics for p in sorted(cluster.partitions_for_topic(t))]

"""The broker's clock on a real broker: frs.clock is created with LogAppendTime, the broker
overwrites a producer's CreateTime and returns its own time in the produce response, and a
CreateTime topic is refused as a clock."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas.catalog import BROKER_CLOCK, Topic
from schemas.types import utcnow
from services.kit.clock import LOG_APPEND_TIME, BrokerClock, ClockUnavailable, kafka_stamp
from services.kit.publisher import Publisher
from services.kit.topics import ensure_topics

pytestmark = pytest.mark.integration
A_YEAR_AGO_MS = int((datetime.now(UTC) - timedelta(days=365)).timestamp() * 1000)


async def test_the_broker_overwrites_create_time_with_its_own(kafka_bootstrap: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        before = utcnow()
        meta = await (await producer.send(BROKER_CLOCK.name, b'{"service": "test"}',
                                          key=b"test", timestamp_ms=A_YEAR_AGO_MS))
        after = utcnow()
    finally:
        await producer.stop()
    assert meta.timestamp_type == LOG_APPEND_TIME
    stamped = datetime.fromtimestamp(meta.timestamp / 1000, UTC)
    # This broker runs on this machine: its time is ours, give or take the millisecond.
    assert before - timedelta(milliseconds=1) <= stamped <= after
    # And the record itself carries the broker's time, not the year-old CreateTime.
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(BROKER_CLOCK.name, meta.partition)
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert record.timestamp == meta.timestamp and record.timestamp_type == LOG_APPEND_TIME


async def test_broker_clock_bounds_hold_true_time(kafka_bootstrap: str) -> None:
    async with Publisher(kafka_bootstrap, "/test/clock") as pub:
        clock = BrokerClock(kafka_stamp(pub, "intake"))
        await clock.sample()
        lower, upper = clock.bounds()
        now = utcnow()
        assert lower - timedelta(milliseconds=1) <= now <= upper + timedelta(milliseconds=1)
        assert upper - lower < timedelta(seconds=2)  # one round trip on loopback
        assert lower <= clock.now() <= clock.bounds()[1]


async def test_a_create_time_topic_is_no_clock(kafka_bootstrap: str) -> None:
    name = f"frs.test.createtime-{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, topics=(
        Topic(name, "service", 1, 3_600_000, "delete", (), "CreateTime topic"),))
    async with Publisher(kafka_bootstrap, "/test/clock") as pub:
        clock = BrokerClock(kafka_stamp(pub, "intake", topic=name))
        with pytest.raises(ClockUnavailable, match="LogAppendTime"):
            await clock.sample()
    assert clock.last is None

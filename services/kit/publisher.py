"""The idempotent publisher every service and tool sends events with."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

from schemas.catalog import MAX_DLQ_BYTES, TOPIC_BY_NAME, topic_for
from schemas.envelope import Envelope, Headers, Record, child_traceparent, encode
from schemas.events import Event
from services.kit.kafka import KafkaSettings, client_options

# The broker's default message.max.bytes (1 MiB + 12): a topic without its own limit.
BROKER_DEFAULT_MAX_BYTES = 1_048_588


class EventTooLarge(ValueError):
    """An encoded event over its topic's size limit. Sending it would be refused by the
    broker on every retry: it is refused here, once, with the sizes (never the content)."""

    def __init__(self, event_type: str, topic: str, size: int, limit: int) -> None:
        super().__init__(f"{event_type} is {size} bytes encoded, over the {limit}-byte "
                         f"limit of {topic}")
        self.event_type, self.topic, self.size, self.limit = event_type, topic, size, limit


def topic_limit(topic: str) -> int:
    """The largest record a catalog topic takes (its max.message.bytes, else the broker's)."""
    known = TOPIC_BY_NAME.get(topic)
    configured = known.extra_config.get("max.message.bytes") if known else None
    return int(configured) if configured else BROKER_DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class Prepared:
    """An event encoded for its topic and checked against the topic's size limit."""

    topic: str
    record: Record


class Publisher:
    """Idempotent producer (acks=all): a retried send is never written twice."""

    def __init__(self, bootstrap: str, source: str, *, kafka: KafkaSettings | None = None,
                 **producer_options: Any) -> None:
        self.source = source
        options: dict[str, Any] = {
            **client_options(kafka, bootstrap),
            "enable_idempotence": True,
            "acks": "all",
            "linger_ms": 2,
            "max_batch_size": 256 * 1024,
            "max_request_size": MAX_DLQ_BYTES,  # the largest record: a dead-lettered request
        }
        options.update(producer_options)
        self._producer = AIOKafkaProducer(**options)

    async def start(self) -> None:
        try:
            await self._producer.start()
        except BaseException:
            await self._producer.stop()  # refused or unreachable: release the connections
            raise

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def prepare(self, event: Event, cause: Envelope | None = None, *,
                topic: str | None = None) -> Prepared:
        """Encode ``event``; raise ``EventTooLarge`` if its topic would refuse it."""
        record = encode(
            event,
            self.source,
            causation_id=cause.id if cause else None,
            traceparent=child_traceparent(cause.traceparent if cause else None),
        )
        name = topic or topic_for(event).name
        size = len(record.key) + len(record.value) + sum(len(k) + len(v)
                                                           for k, v in record.headers)
        limit = topic_limit(name)
        if size > limit:
            raise EventTooLarge(event.TYPE, name, size, limit)
        return Prepared(name, record)

    async def send_prepared(self, prepared: Prepared) -> asyncio.Future[Any]:
        record = prepared.record
        return await self.send_raw(prepared.topic, record.key, record.value, record.headers)

    async def send(
        self, event: Event, cause: Envelope | None = None, *, topic: str | None = None
    ) -> asyncio.Future[Any]:
        """Queue one event; the returned future resolves when the broker has it."""
        return await self.send_prepared(self.prepare(event, cause, topic=topic))

    async def send_raw(
        self, topic: str, key: bytes | None, value: bytes | None, headers: Headers
    ) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = await self._producer.send(
            topic, value=value, key=key, headers=headers
        )
        return fut

    async def publish(self, events: Iterable[Event], cause: Envelope | None = None) -> None:
        """Send and wait until every event is durable."""
        futures = [await self.send(e, cause) for e in events]
        if futures:
            await asyncio.gather(*futures)

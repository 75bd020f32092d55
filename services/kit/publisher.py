"""The idempotent publisher every service and tool sends events with."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaProducer

from schemas.catalog import MAX_DLQ_BYTES, topic_for
from schemas.envelope import Envelope, Headers, child_traceparent, encode
from schemas.events import Event
from services.kit.kafka import KafkaSettings, client_options


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

    async def send(
        self, event: Event, cause: Envelope | None = None, *, topic: str | None = None
    ) -> asyncio.Future[Any]:
        """Queue one event; the returned future resolves when the broker has it."""
        record = encode(
            event,
            self.source,
            causation_id=cause.id if cause else None,
            traceparent=child_traceparent(cause.traceparent if cause else None),
        )
        return await self.send_raw(topic or topic_for(event).name, record.key, record.value,
                                   record.headers)

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

"""Follows the compacted registry topics (``REGISTRY_TOPICS``) into a ``Registries``.

Every service instance reads the registries from the beginning (no consumer group), is
ready once it has caught up with the end offsets it saw at start, then follows updates,
so a registry change applies to the next decision without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer

from schemas.catalog import REGISTRY_TOPICS
from schemas.envelope import DecodeError, decode
from schemas.events import Event
from services.kit.kafka import KafkaSettings, client_options
from services.kit.reader import all_partitions
from services.kit.registry import Registries, RegistryEntry

log = logging.getLogger("frs.registry")

_CARRIES: dict[str, tuple[type[Event], ...]] = {t.name: t.events for t in REGISTRY_TOPICS}


class RegistryFollower:
    def __init__(self, bootstrap: str, registries: Registries, *,
                 kafka: KafkaSettings | None = None) -> None:
        self.registries = registries
        self._consumer = AIOKafkaConsumer(
            **client_options(kafka, bootstrap), group_id=None, enable_auto_commit=False,
            isolation_level="read_committed",
        )
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self, timeout_s: float = 30.0) -> None:
        await self._consumer.start()
        parts = await all_partitions(self._consumer, [t.name for t in REGISTRY_TOPICS])
        self._consumer.assign(parts)
        await self._consumer.seek_to_beginning(*parts)
        self._end = await self._consumer.end_offsets(parts)
        self._task = asyncio.create_task(self._follow())
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _caught_up(self) -> bool:
        for tp, end in self._end.items():
            if await self._consumer.position(tp) < end:
                return False
        return True

    async def _follow(self) -> None:
        while True:
            if not self._ready.is_set() and await self._caught_up():
                self._ready.set()
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    if r.value is None:
                        continue  # tombstone: registries keep history, deletion is a status
                    try:
                        env = decode([(k, bytes(v)) for k, v in r.headers], r.key, r.value,
                                     timestamp_ms=r.timestamp, timestamp_type=r.timestamp_type)
                    except DecodeError as err:
                        log.warning("bad registry record",
                                    extra={"topic": r.topic, "offset": r.offset, "code": err.code})
                        continue
                    # Only the type each topic carries: a record on the wrong topic (a
                    # suspension's writer posing as the operator) changes nothing.
                    event = env.event
                    if (isinstance(event, RegistryEntry)
                            and type(event) in _CARRIES.get(r.topic, ())):
                        self.registries.apply(event, r.offset)

"""Helpers the four service entrypoints share: build a processor from a Route, run."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from schemas.catalog import dlq_topic
from services.kit.bus import Processor, Publisher, Route
from services.kit.logs import setup_logging
from services.kit.registry import Registries, RegistryFollower
from services.kit.settings import ServiceSettings


def processor(settings: ServiceSettings, route: Route, publisher: Publisher) -> Processor:
    return Processor(
        route, publisher, settings.kafka_bootstrap,
        max_retries=settings.max_retries, retry_backoff_s=settings.retry_backoff_s,
        batch_max=settings.batch_max, concurrency=settings.concurrency,
        commit_interval_s=settings.commit_interval_s,
        kill_before_commit=settings.fault_kill_before_commit, kafka=settings,
    )


def dlq_for(service: str) -> str:
    return dlq_topic(service).name


async def start_publisher(settings: ServiceSettings, stack: AsyncExitStack) -> Publisher:
    publisher = Publisher(settings.kafka_bootstrap, source=f"/frs/{settings.service}",
                          kafka=settings)
    await publisher.start()
    stack.push_async_callback(publisher.stop)
    return publisher


async def start_registries(settings: ServiceSettings, stack: AsyncExitStack) -> Registries:
    registries = Registries()
    follower = RegistryFollower(settings.kafka_bootstrap, registries, kafka=settings)
    await follower.start()
    stack.push_async_callback(follower.stop)
    return registries


def main_entry(settings: ServiceSettings, run: object) -> None:
    """Common ``__main__``: logging, then run the service's coroutine to completion."""
    setup_logging(settings.service, settings.log_level)
    assert asyncio.iscoroutine(run)
    asyncio.run(run)

"""An oversight worker of its own per test: its own app id (consumer group, changelog and
observation topics), so no test sees another's tables; scenario ids carry a namespace."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import OffsetAndMetadata

from schemas.catalog import oversight_topics
from services.kit.reader import all_partitions
from services.kit.topics import ensure_topics
from services.oversight.app import INPUTS
from tests.conftest import ServiceProcess
from tests.oversight_scenarios import LIMIT_ENV


@pytest.fixture
def app_id(kafka_bootstrap: str) -> str:
    """A fresh app whose consumer group starts at the inputs' current end: its worker
    reads what its test publishes, not the session's whole history."""
    name = f"frs-oversight-t{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topics(kafka_bootstrap, topics=oversight_topics(name)))
    asyncio.run(start_at_end(kafka_bootstrap, name))
    return name


async def start_at_end(bootstrap: str, group: str) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await all_partitions(consumer, [t.name for t in INPUTS])
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        await consumer.commit({tp: OffsetAndMetadata(offset, "") for tp, offset in ends.items()})
    finally:
        await consumer.stop()


@pytest.fixture
def oversight(service_env: dict[str, str], app_id: str, tmp_path: Path
              ) -> Iterator[Callable[[str], ServiceProcess]]:
    """Workers by name (one log each), not started; each left running is killed after."""
    made: list[ServiceProcess] = []
    env = {**service_env, **LIMIT_ENV, "FRS_OVERSIGHT_APP_ID": app_id,
           "FRS_OVERSIGHT_METRICS_PORT": "0", "FRS_OVERSIGHT_REVIEW_QUIET_S": "2",
           "FRS_OVERSIGHT_TICK_S": "0.5"}

    def worker(name: str) -> ServiceProcess:
        made.append(ServiceProcess("oversight", env, tmp_path / f"{name}.log"))
        return made[-1]

    yield worker
    for p in made:
        if p.proc is not None and p.proc.poll() is None:
            p.kill()

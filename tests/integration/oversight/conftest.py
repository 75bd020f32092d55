"""An oversight worker of its own per test: its own app id (consumer group, changelog and
observation topics), so no test sees another's tables; scenario ids carry a namespace."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas.catalog import oversight_topics
from services.kit.topics import ensure_topics
from tests.conftest import ServiceProcess
from tests.oversight_scenarios import LIMIT_ENV


@pytest.fixture
def app_id(kafka_bootstrap: str) -> str:
    name = f"frs-oversight-t{uuid.uuid4().hex[:8]}"
    asyncio.run(ensure_topics(kafka_bootstrap, topics=oversight_topics(name)))
    return name


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

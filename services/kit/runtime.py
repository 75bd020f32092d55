"""Run a service's processors until SIGTERM or SIGINT, then drain and commit."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from typing import Any

from services.kit.bus import Processor
from services.kit.metrics import serve_metrics
from services.kit.settings import ServiceSettings

log = logging.getLogger("frs.runtime")


async def run_service(
    settings: ServiceSettings,
    processors: Sequence[Processor],
    stack: AsyncExitStack,
    background: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
) -> None:
    """``stack`` owns the ports (publisher, registries, stores) and closes them last."""
    port = serve_metrics(settings.metrics_host, settings.metrics_port)
    log.info("service started", extra={"metrics_port": port})
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    async with stack:
        tasks = [asyncio.create_task(p.run()) for p in processors]
        extra = [asyncio.create_task(job()) for job in background]
        waiter = asyncio.create_task(stopping.wait())
        done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
        # Drain: each processor finishes its batch, waits for its sends and commits.
        for p in processors:
            p.stop()
        for job in extra:
            job.cancel()
        await asyncio.gather(*tasks, *extra, return_exceptions=True)
        waiter.cancel()
        for task in done:
            if task is not waiter and task.exception() is not None:
                log.error("processor crashed", exc_info=task.exception())
                raise SystemExit(1)
    log.info("service stopped")

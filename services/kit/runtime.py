"""Run a service's processors until SIGTERM or SIGINT, then drain and commit."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
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
        extra = [asyncio.create_task(_supervised(job)) for job in background]
        waiter = asyncio.create_task(stopping.wait())
        await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
        # Drain: each processor finishes its batch, waits for its sends and commits. The
        # background jobs run on meanwhile: dispatch's heartbeat keeps its claims alive.
        for p in processors:
            p.stop()
        drained = await asyncio.gather(*tasks, return_exceptions=True)
        for job in extra:
            job.cancel()
        await asyncio.gather(*extra, return_exceptions=True)
        waiter.cancel()
        crashed = [r for r in drained if isinstance(r, BaseException)]
        for exc in crashed:
            log.error("processor crashed", exc_info=exc)
        if crashed:
            raise SystemExit(1)
    log.info("service stopped")


async def _supervised(job: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a background job (claim heartbeat, audit timers, purger) for the life of the
    service: one that fails or ends is logged and started again, never silently lost."""
    name = getattr(job, "__qualname__", "job")
    delay = 1.0
    while True:
        started = time.monotonic()
        try:
            await job()
            log.error("background job ended", extra={"job": name})
        except Exception as exc:
            log.error("background job failed", exc_info=exc, extra={"job": name})
        if time.monotonic() - started > 60:
            delay = 1.0  # it ran a good while: a fresh failure, not a crash loop
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)

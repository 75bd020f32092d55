"""Runs a ``ServiceApp``, the same way for every service: start the publisher and the
registry follower, wire the app, pass its preflight checks, bind its servers, run its
routes' processors and its jobs until SIGTERM or SIGINT; then drain (each processor
finishes its batch, waits for its sends and commits), stop the jobs and servers, and close
the app's resources last."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import replace

from services.kit.app import Context, Job, ServiceApp
from services.kit.follower import RegistryFollower
from services.kit.kafka import KafkaSettings
from services.kit.logs import setup_logging
from services.kit.metrics import identify, serve_metrics
from services.kit.processor import NotCopartitioned, Processor
from services.kit.publisher import Publisher
from services.kit.registry import Registries
from services.kit.routing import Route
from services.kit.settings import ServiceSettings

log = logging.getLogger("frs.runtime")


def processor(settings: ServiceSettings, route: Route, publisher: Publisher,
              kafka: KafkaSettings | None = None) -> Processor:
    # Which instance a group member is, for `frs status` (the route's own options win).
    route = replace(route, consumer_options={
        "client_id": f"frs-{route.service}-{settings.instance_id}",
        "fetch_min_bytes": settings.fetch_min_bytes,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms, **route.consumer_options})
    made = Processor(
        route, publisher, settings.kafka_bootstrap,
        max_retries=settings.max_retries, retry_backoff_s=settings.retry_backoff_s,
        batch_max=settings.batch_max, concurrency=settings.concurrency,
        commit_interval_s=settings.commit_interval_s,
        kill_before_commit=settings.fault_kill_before_commit, kafka=kafka or settings,
    )
    if route.progress is not None:
        route.progress.bind(made)
    return made


def main(app: ServiceApp) -> None:
    """``python -m services.<name>``: logging, then run until SIGTERM."""
    setup_logging(app.settings.service, app.settings.log_level)
    asyncio.run(run(app))


async def run(app: ServiceApp) -> None:
    settings = app.settings
    # Closed last, in reverse: the app's resources, then the follower and the publisher.
    async with AsyncExitStack() as stack:
        publisher = Publisher(settings.kafka_bootstrap, source=f"/frs/{settings.service}",
                              kafka=settings, linger_ms=settings.linger_ms)
        await publisher.start()
        stack.push_async_callback(publisher.stop)
        publishers: dict[str, Publisher] = {}
        for name, identity in app.identities.items():
            publishers[name] = Publisher(settings.kafka_bootstrap,
                                         source=f"/frs/{settings.service}/{name}", kafka=identity,
                                         linger_ms=settings.linger_ms)
            await publishers[name].start()
            stack.push_async_callback(publishers[name].stop)
        registries = Registries()
        if app.follows_registries:
            follower = RegistryFollower(settings.kafka_bootstrap, registries, kafka=settings)
            await follower.start()
            stack.push_async_callback(follower.stop)
        wiring = app.wire(Context(publisher, registries, stack, publishers))
        for check in wiring.preflight:
            await check()
        for server in wiring.servers:
            await server.start(stack)
            log.info("server started", extra={"server": server.name})
        processors = [processor(settings, r, publisher) if r.identity is None
                      else processor(settings, r, publishers[r.identity],
                                     app.identities[r.identity])
                      for r in wiring.routes]
        await _run_routes(settings, processors, wiring.jobs)


async def _run_routes(settings: ServiceSettings, processors: list[Processor],
                      jobs: Sequence[Job]) -> None:
    identify(settings.service, settings.instance_id)
    port = serve_metrics(settings.metrics_host, settings.metrics_port)
    log.info("service started", extra={"metrics_port": port,
                                       "instance": settings.instance_id})
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    tasks = [asyncio.create_task(p.run()) for p in processors]
    timers = [asyncio.create_task(_every(job)) for job in jobs]
    waiter = asyncio.create_task(stopping.wait())
    await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
    # Drain: each processor finishes its batch, waits for its sends and commits. The jobs
    # run on meanwhile: dispatch's heartbeat keeps its claims alive until the commit.
    for p in processors:
        p.stop()
    drained = await asyncio.gather(*tasks, return_exceptions=True)
    for timer in timers:
        timer.cancel()
    await asyncio.gather(*timers, return_exceptions=True)
    waiter.cancel()
    crashed = [r for r in drained if isinstance(r, BaseException)]
    for exc in crashed:
        if isinstance(exc, NotCopartitioned):
            log.error(str(exc))  # a refused start: one line that says what is wrong
        else:
            log.error("processor crashed", exc_info=exc)
    if crashed:
        raise SystemExit(1)
    log.info("service stopped")


async def run_jobs(jobs: Sequence[Job]) -> None:
    """Run jobs as the service does, until cancelled (tests use it too)."""
    await asyncio.gather(*(_every(job) for job in jobs))


async def _every(job: Job) -> None:
    """A job for the life of the service: ``ready`` once (retried with backoff until it
    returns), then ``tick`` every period. A failing tick is logged, never fatal."""
    delay = 1.0
    while job.ready is not None:
        try:
            await job.ready()
            break
        except Exception as exc:
            log.error("job not ready", exc_info=exc, extra={"job": job.name})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
    log.info("job started", extra={"job": job.name, "period_s": job.period_s})
    while True:
        started = time.monotonic()
        try:
            await job.tick()
        except Exception as exc:
            log.error("job tick failed", exc_info=exc, extra={"job": job.name})
        await asyncio.sleep(max(0.0, job.period_s - (time.monotonic() - started)))

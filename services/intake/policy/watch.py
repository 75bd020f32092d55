"""The overdue-review watch: a background task in the intake process that publishes
``ExigentReviewOverdue`` for exigent clearances nobody reviewed in time.

Started from ``app.build`` on the running loop and cancelled by the service's exit
stack, so the intake entrypoint needs no change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import datetime

from services.intake.policy.handlers import overdue_reviews
from services.intake.policy.metrics import policy_metrics
from services.intake.policy.reviews import ReviewStore
from services.kit.bus import Publisher

log = logging.getLogger("frs.policy.reviews")


async def report_overdue(store: ReviewStore, publisher: Publisher,
                         clock: Callable[[], datetime]) -> int:
    """Publish one event per newly overdue review; mark it only once the broker has it."""
    now = clock()
    events = overdue_reviews(store, now)
    for event in events:
        await publisher.publish([event])
        store.mark_reported(event.probe_id, now)
        policy_metrics().reviews_overdue.inc()
        log.warning("exigent review overdue", extra={"probe_id": event.probe_id,
                                                     "due_at": event.due_at.isoformat()})
    policy_metrics().reviews_pending.set(store.pending_count())
    return len(events)


async def _watch(store: ReviewStore, publisher: Publisher, clock: Callable[[], datetime],
                 interval_s: float) -> None:
    while True:
        try:
            await report_overdue(store, publisher, clock)
        except Exception as exc:
            # A broker hiccup must not end the watch; the next round retries.
            log.warning("overdue check failed", extra={"error": type(exc).__name__})
        await asyncio.sleep(interval_s)


def start_overdue_watch(store: ReviewStore, publisher: Publisher,
                        clock: Callable[[], datetime], interval_s: float,
                        stack: AsyncExitStack) -> None:
    task = asyncio.get_running_loop().create_task(_watch(store, publisher, clock, interval_s))

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)

"""The overdue-review watch: a job of the intake process (``app.build``) that publishes
``ExigentReviewOverdue`` for exigent clearances nobody reviewed in time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from services.intake.policy.handlers import overdue_reviews
from services.intake.policy.metrics import policy_metrics
from services.intake.policy.reviews import Reviews
from services.kit.publisher import Publisher

log = logging.getLogger("frs.policy.reviews")


async def report_overdue(store: Reviews, publisher: Publisher,
                         clock: Callable[[], datetime]) -> int:
    """Publish one event per newly overdue review this watch claimed; mark it only once
    the broker has it (a claim not marked lapses and is reported again)."""
    now = clock()
    events = await overdue_reviews(store, now)
    for event in events:
        await publisher.publish([event])
        await store.mark_reported(event.probe_id, now)
        policy_metrics().reviews_overdue.inc()
        log.warning("exigent review overdue", extra={"probe_id": event.probe_id,
                                                     "due_at": event.due_at.isoformat()})
    policy_metrics().reviews_pending.set(await store.pending_count())
    return len(events)

"""The Reviews port (services/intake/policy/reviews.py), one contract for both
implementations: ReviewStore (SQLite) and PgReviewStore (PostgreSQL)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.intake.policy.reviews import PgReviewStore, Reviews, ReviewStore
from tests.integration.stores.conftest import shared_state

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
HOUR = timedelta(hours=1)
LEASE = timedelta(minutes=1)


@pytest.fixture
async def reviews(backend: str, request: pytest.FixtureRequest,
                  tmp_path: Path) -> AsyncIterator[Reviews]:
    if backend == "sqlite":
        store = ReviewStore(tmp_path / "policy" / "exigent_reviews.sqlite")
        yield store
        store.close()
        return
    state = await shared_state(request, "intake")
    yield PgReviewStore(state.pool)
    await state.close()


async def test_a_flag_is_pending_until_reviewed(reviews: Reviews) -> None:
    await reviews.flag("prb-1", T0 + HOUR)
    await reviews.flag("prb-2", T0 + HOUR)
    assert await reviews.pending_count() == 2
    assert await reviews.status("prb-1") == {
        "due_at": "2026-01-01T13:00:00.123456Z", "reviewed_at": None, "approved": None,
        "overdue_reported_at": None}
    await reviews.resolve("prb-1", T0, approved=False)
    assert await reviews.pending_count() == 1
    status = await reviews.status("prb-1")
    assert status is not None
    assert (status["reviewed_at"], status["approved"]) == ("2026-01-01T12:00:00.123456Z", False)
    assert await reviews.status("prb-none") is None


async def test_a_review_read_before_its_flag_still_counts(reviews: Reviews) -> None:
    await reviews.resolve("prb-1", T0, approved=True)
    await reviews.flag("prb-1", T0 + HOUR)
    assert await reviews.pending_count() == 0
    assert await reviews.claim_overdue(T0 + 2 * HOUR, LEASE) == []
    status = await reviews.status("prb-1")
    assert status is not None and status["approved"] is True


async def test_overdue_flags_are_claimed_oldest_first_once_per_lease(reviews: Reviews) -> None:
    await reviews.flag("late", T0 + 2 * HOUR)
    await reviews.flag("early", T0 + HOUR)
    await reviews.flag("not-yet", T0 + 5 * HOUR)
    assert await reviews.claim_overdue(T0, LEASE) == []
    now = T0 + 3 * HOUR
    claimed = await reviews.claim_overdue(now, LEASE)
    assert claimed == [("early", T0 + HOUR), ("late", T0 + 2 * HOUR)]
    assert all(due.tzinfo is not None for _, due in claimed)
    assert await reviews.claim_overdue(now + LEASE / 2, LEASE) == []  # held
    await reviews.mark_reported("early", now)
    # The lease of the unreported one lapsed (its holder died): claimed again; the
    # reported one never again.
    assert await reviews.claim_overdue(now + LEASE, LEASE) == [("late", T0 + 2 * HOUR)]
    status = await reviews.status("early")
    assert status is not None and status["overdue_reported_at"] == "2026-01-01T15:00:00.123456Z"


async def test_a_new_flag_moves_the_due_time(reviews: Reviews) -> None:
    await reviews.flag("prb-1", T0 + HOUR)
    await reviews.flag("prb-1", T0 + 3 * HOUR)
    assert await reviews.claim_overdue(T0 + 2 * HOUR, LEASE) == []
    assert await reviews.claim_overdue(T0 + 3 * HOUR, LEASE) == [("prb-1", T0 + 3 * HOUR)]
    assert await reviews.pending_count() == 1

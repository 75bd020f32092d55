"""Races on PostgreSQL: two instances (two pools, two connections) claim the same item at
the same moment, 1,000 times each; exactly one wins every time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import ProbeRejected, RejectReason
from services.intake.outcomes import PgOutcomeLog
from services.intake.policy.reviews import PgReviewStore
from services.kit.state import PostgresState
from services.results.pg_store import PgNonceStore
from tests.integration.stores.conftest import shared_state

TRIALS = 1000
T0 = datetime(2026, 1, 1, tzinfo=UTC)


Pair = tuple[PostgresState, PostgresState]


@pytest.fixture
async def two_instances(request: pytest.FixtureRequest
                        ) -> AsyncIterator[Callable[[str], Awaitable[Pair]]]:
    """Two instances of a service, each with a pool of one connection."""
    opened: list[PostgresState] = []

    async def open_two(role: str) -> Pair:
        pair = (await shared_state(request, role, max_size=1),
                await shared_state(request, role, max_size=1))
        opened.extend(pair)
        return pair

    yield open_two
    for state in opened:
        await state.close()


async def test_the_same_webhook_signature_is_accepted_once(
        two_instances: Callable[[str], Awaitable[Pair]]) -> None:
    a, b = (PgNonceStore(s.pool) for s in await two_instances("results"))
    wins = []
    for trial in range(TRIALS):
        now = 1_000_000.0 + trial
        won = await asyncio.gather(a.claim(f"sig-{trial}", now, 600),
                                   b.claim(f"sig-{trial}", now, 600))
        wins.append(won.count(True))
    assert wins == [1] * TRIALS


async def test_the_same_overdue_review_is_claimed_by_one_watch(
        two_instances: Callable[[str], Awaitable[Pair]]) -> None:
    a, b = (PgReviewStore(s.pool) for s in await two_instances("intake"))
    lease = timedelta(minutes=1)
    winners = []
    for trial in range(TRIALS):
        probe_id = f"prb-{trial}"
        await a.flag(probe_id, T0)
        now = T0 + timedelta(seconds=trial + 1)
        claimed = await asyncio.gather(a.claim_overdue(now, lease), b.claim_overdue(now, lease))
        assert sorted(p for got in claimed for p, _ in got) == [probe_id], trial
        winner = a if claimed[0] else b
        await winner.mark_reported(probe_id, now)  # as the watch does once it published
        winners.append(0 if claimed[0] else 1)
    assert len(winners) == TRIALS
    assert await a.claim_overdue(T0 + timedelta(days=1), lease) == []


async def test_one_outcome_per_request_id_when_two_instances_record_at_once(
        two_instances: Callable[[str], Awaitable[Pair]]) -> None:
    a, b = (PgOutcomeLog(s.pool) for s in await two_instances("intake"))
    for trial in range(TRIALS):
        request_id = f"req-{trial}"
        mine, theirs = (ProbeRejected(probe_id=f"prb-{trial}", request_id=request_id,
                                      reason=reason, detail=str(n), rejected_at=T0)
                        for n, reason in enumerate((RejectReason.NO_FACE,
                                                    RejectReason.POLYGLOT)))
        await asyncio.gather(a.record(request_id, mine, content_sha256="a"),
                             b.record(request_id, theirs, content_sha256="b"))
        seen_a, seen_b = await asyncio.gather(a.find(request_id), b.find(request_id))
        assert seen_a is not None and seen_a == seen_b, trial
        assert (seen_a.event, seen_a.content_sha256) in ((mine, "a"), (theirs, "b"))

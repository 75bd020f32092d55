"""Races on the dispatch ledger in PostgreSQL: two dispatch instances (two pools of one
connection each) claim the same send, or take over the same abandoned claim, at the same
moment, 1,000 times each; exactly one wins every time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.dispatch.ledger import PgLedger
from services.kit.state import PostgresState
from tests.integration.stores.conftest import shared_state

TRIALS = 1000


@pytest.fixture
async def two_instances(request: pytest.FixtureRequest
                        ) -> AsyncIterator[tuple[PgLedger, PgLedger]]:
    states: list[PostgresState] = [await shared_state(request, "dispatch", max_size=1)
                                   for _ in range(2)]
    yield PgLedger(states[0].pool, owner="a"), PgLedger(states[1].pool, owner="b")
    for state in states:
        await state.close()


async def test_the_same_send_is_new_to_one_instance(
        two_instances: tuple[PgLedger, PgLedger]) -> None:
    a, b = two_instances
    for trial in range(TRIALS):
        claims = await asyncio.gather(a.claim(f"prb-{trial}", "p1"),
                                      b.claim(f"prb-{trial}", "p1"))
        assert sorted(c.state for c in claims) == ["new", "unknown"], trial
        winner = "a" if claims[0].state == "new" else "b"
        assert [c.owner for c in claims] == [winner, winner], trial
    assert await a.counts() == {"claimed": TRIALS}


async def test_an_abandoned_claim_is_taken_over_by_one_instance(
        two_instances: tuple[PgLedger, PgLedger]) -> None:
    a, b = two_instances
    dead = PgLedger(a.pool, owner="dead")  # claimed, then its process died
    wins = {"a": 0, "b": 0}
    for trial in range(TRIALS):
        probe_id = f"prb-{trial}"
        await dead.claim(probe_id, "p1")
        seen = await asyncio.gather(a.claim(probe_id, "p1"), b.claim(probe_id, "p1"))
        assert {(c.state, c.owner) for c in seen} == {("unknown", "dead")}, trial
        taken = await asyncio.gather(a.take_over(probe_id, "p1", seen[0]),
                                     b.take_over(probe_id, "p1", seen[1]))
        assert taken.count(True) == 1, trial
        winner, loser = (a, b) if taken[0] else (b, a)
        wins[winner.owner] += 1
        # Only the winner's writes count on the claim now.
        assert (await loser.claim(probe_id, "p1")).owner == winner.owner, trial
        assert await loser.record_attempt(probe_id, "p1") == 0, trial
        assert await winner.record_attempt(probe_id, "p1") == 1, trial
    assert sum(wins.values()) == TRIALS

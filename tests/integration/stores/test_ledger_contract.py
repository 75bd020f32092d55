"""The Ledger port (services/dispatch/ledger.py), one contract for both implementations:
SqliteLedger (a file in the state dir) and PgLedger (PostgreSQL). Each test gets a factory
of ledger instances on one store: a new instance with another owner is another process
(a restart, or a second instance) on the same ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.events import DispatchFailed, DispatchFailure, ProviderDispatched
from schemas.types import OutboundField, Transport
from services.dispatch import ledger as ledger_module
from services.dispatch.ledger import (
    Ledger,
    PgLedger,
    SqliteLedger,
    dispatch_id_for,
    request_ref_for,
)
from tests.integration.stores.conftest import shared_state

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
Open = Callable[[str], Ledger]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """The ledgers' time, moved by the test: every stamp is exact and distinct."""
    now = [T0]
    monkeypatch.setattr(ledger_module, "utcnow", lambda: now[0])
    return now


@pytest.fixture
async def ledgers(backend: str, request: pytest.FixtureRequest, tmp_path: Path,
                  clock: list[datetime]) -> AsyncIterator[Open]:
    if backend == "sqlite":
        opened: list[SqliteLedger] = []

        def open_sqlite(owner: str) -> Ledger:
            opened.append(SqliteLedger(tmp_path / "dispatch" / "ledger.db", owner=owner))
            return opened[-1]
        yield open_sqlite
        for ledger in opened:
            ledger.close()
        return
    state = await shared_state(request, "dispatch")
    yield lambda owner: PgLedger(state.pool, owner=owner)
    await state.close()


def failed(probe_id: str, provider_id: str, detail: str = "x") -> DispatchFailed:
    return DispatchFailed(probe_id=probe_id, provider_id=provider_id,
                          reason=DispatchFailure.PERMANENT_ERROR, detail=detail, failed_at=T0)


def dispatched(probe_id: str, provider_id: str) -> ProviderDispatched:
    dispatch_id = dispatch_id_for(probe_id, provider_id)
    return ProviderDispatched(
        probe_id=probe_id, provider_id=provider_id, dispatch_id=dispatch_id,
        transport=Transport.HTTPS, request_ref=request_ref_for(dispatch_id),
        fields_sent=list(OutboundField), sent_at=T0, response_due_at=T0 + timedelta(hours=1),
        deletion_due_at=T0 + timedelta(days=1), payload_sha256="0" * 64, claimed_at=T0)


async def test_a_new_claim_is_ours_and_derived_from_the_send(ledgers: Open) -> None:
    a = ledgers("a")
    claim = await a.claim("prb-1", "p1")
    assert claim.dispatch_id == dispatch_id_for("prb-1", "p1")
    assert claim.request_ref == request_ref_for(claim.dispatch_id)
    assert (claim.state, claim.attempts, claim.outcome, claim.owner) == ("new", 0, [], "a")
    assert claim.claimed_at == claim.heartbeat_at == T0
    assert await a.counts() == {"claimed": 1}


async def test_claim_states_survive_a_restart_and_writes_are_fenced_by_owner(
        ledgers: Open, clock: list[datetime]) -> None:
    first = await ledgers("a").claim("prb-1", "p1")
    assert await ledgers("a").record_attempt("prb-1", "p1") == 1  # a, its ledger reopened
    restarted = ledgers("b")  # another owner: a restart is one
    clock[0] = T0 + timedelta(seconds=1)
    again = await restarted.claim("prb-1", "p1")
    assert (again.state, again.attempts, again.request_ref, again.owner) == (
        "unknown", 1, first.request_ref, "a")
    assert again.claimed_at == T0 and again.heartbeat_at == T0
    # It records nothing on a claim it has not taken over.
    assert not await restarted.complete("prb-1", "p1", [failed("prb-1", "p1")])
    assert await restarted.record_attempt("prb-1", "p1") == 0
    assert await restarted.take_over("prb-1", "p1", again)
    assert not await restarted.take_over("prb-1", "p1", again), "the claim moved on"
    assert await restarted.record_attempt("prb-1", "p1") == 2
    assert await restarted.complete("prb-1", "p1", [failed("prb-1", "p1")])
    done = await ledgers("c").claim("prb-1", "p1")
    assert (done.state, done.outcome, done.attempts) == ("done", [failed("prb-1", "p1")], 2)
    assert await restarted.counts() == {"done": 1}


async def test_the_outcome_comes_back_as_the_events_recorded(ledgers: Open) -> None:
    a = ledgers("a")
    await a.claim("prb-1", "p1")
    events = [dispatched("prb-1", "p1"), failed("prb-1", "p1", "and then")]
    assert await a.complete("prb-1", "p1", events)
    assert not await a.complete("prb-1", "p1", [failed("prb-1", "p1")]), "done once"
    assert await a.record_attempt("prb-1", "p1") == 0, "a done send counts no attempt"
    for reader in (a, ledgers("b")):
        claim = await reader.claim("prb-1", "p1")
        assert (claim.state, claim.outcome) == ("done", events)
    await a.claim("prb-1", "p2")
    assert await a.complete("prb-1", "p2", [])
    assert (await a.claim("prb-1", "p2")).outcome == []
    assert await a.counts() == {"done": 2}


async def test_a_take_over_swaps_only_the_owner_and_heartbeat_it_saw(
        ledgers: Open, clock: list[datetime]) -> None:
    a, b, c = ledgers("a"), ledgers("b"), ledgers("c")
    await a.claim("prb-1", "p1")
    seen = await b.claim("prb-1", "p1")
    clock[0] = T0 + timedelta(seconds=1)
    assert await a.heartbeat() == 1  # a is alive: what b saw is stale
    assert not await b.take_over("prb-1", "p1", seen)
    fresh = await c.claim("prb-1", "p1")
    assert (fresh.owner, fresh.heartbeat_at) == ("a", T0 + timedelta(seconds=1))
    clock[0] = T0 + timedelta(seconds=2)
    assert await c.take_over("prb-1", "p1", fresh)
    assert not await b.take_over("prb-1", "p1", fresh), "c holds it now"
    now = await b.claim("prb-1", "p1")
    assert (now.owner, now.heartbeat_at, now.state) == ("c", T0 + timedelta(seconds=2),
                                                        "unknown")
    # The old owner is fenced off: no attempt, no outcome, its heartbeat moves nothing.
    assert await a.record_attempt("prb-1", "p1") == 0
    assert not await a.complete("prb-1", "p1", [failed("prb-1", "p1")])
    clock[0] = T0 + timedelta(seconds=3)
    await a.heartbeat()
    assert (await b.claim("prb-1", "p1")).heartbeat_at == T0 + timedelta(seconds=2)
    assert await c.complete("prb-1", "p1", [failed("prb-1", "p1", "c")])
    done = await a.claim("prb-1", "p1")
    assert not await b.take_over("prb-1", "p1", done), "a done send is not taken over"


async def test_heartbeat_vouches_only_for_the_claims_its_owner_works_on(
        ledgers: Open, clock: list[datetime]) -> None:
    a, b = ledgers("a"), ledgers("b")
    assert await a.heartbeat() == 0
    await a.claim("prb-1", "p1")
    await a.claim("prb-1", "p2")
    await a.claim("prb-2", "p1")
    await b.claim("prb-3", "p1")
    clock[0] = T0 + timedelta(seconds=1)
    assert await a.heartbeat() == 3
    a.release("prb-1", "p2")  # its handler raised: let the lease run out
    await a.complete("prb-2", "p1", [failed("prb-2", "p1")])
    clock[0] = T0 + timedelta(seconds=2)
    assert await a.heartbeat() == 1
    beats = {(p, q): (await b.claim(p, q)).heartbeat_at
             for p, q in (("prb-1", "p1"), ("prb-1", "p2"), ("prb-3", "p1"))}
    assert beats == {("prb-1", "p1"): T0 + timedelta(seconds=2),
                     ("prb-1", "p2"): T0 + timedelta(seconds=1), ("prb-3", "p1"): T0}
    # Working on its own claim again (a redelivery): it vouches for it again.
    assert (await a.claim("prb-1", "p2")).state == "unknown"
    assert await a.heartbeat() == 2
    # Reading another owner's claim is not working on it.
    assert (await a.claim("prb-3", "p1")).owner == "b"
    assert await a.heartbeat() == 2
    assert await a.counts() == {"claimed": 3, "done": 1}


async def test_attempts_count_per_send(ledgers: Open) -> None:
    a = ledgers("a")
    await a.claim("prb-1", "p1")
    await a.claim("prb-1", "p2")
    assert [await a.record_attempt("prb-1", "p1") for _ in range(3)] == [1, 2, 3]
    assert await a.record_attempt("prb-1", "p2") == 1
    assert await a.record_attempt("prb-9", "p1") == 0, "no claim, no attempt"
    assert (await ledgers("b").claim("prb-1", "p1")).attempts == 3


async def test_renew_answers_for_its_own_open_claim_and_keeps_it_alive(
        ledgers: Open, clock: list[datetime]) -> None:
    """What a late request asks before its last bytes (SendGuard): still this owner's
    open claim? Yes renews its heartbeat, so no takeover starts for a whole lease."""
    a, b = ledgers("a"), ledgers("b")
    await a.claim("prb-1", "p1")
    clock[0] = T0 + timedelta(seconds=7)
    assert await a.renew("prb-1", "p1")
    seen = await b.claim("prb-1", "p1")
    assert (seen.owner, seen.heartbeat_at) == ("a", T0 + timedelta(seconds=7))
    assert not await b.renew("prb-1", "p1"), "not b's claim"
    assert not await a.renew("prb-2", "p1"), "no such claim"
    assert await b.take_over("prb-1", "p1", seen)
    assert not await a.renew("prb-1", "p1"), "taken over"
    assert await b.complete("prb-1", "p1", [])
    assert not await b.renew("prb-1", "p1"), "done"

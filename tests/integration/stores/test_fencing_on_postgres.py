"""Fencing on PostgreSQL (services/kit/fencing.py): the lease of a partition, taken at
assignment, and the dispatch ledger's writes that check it in their own transaction. A
stale owner (its lease taken by another instance) can neither claim, count an attempt,
take over nor complete a send; without a scope (a job, SQLite) nothing is checked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest

from services.dispatch.ledger import PgLedger
from services.kit.fencing import Fenced, FenceScope, PgLeases, fenced_as
from services.kit.state import PostgresState
from tests.integration.stores.conftest import conninfo, shared_state
from tests.pg import PgServer

pytestmark = pytest.mark.integration
GROUP = "frs-dispatch-fence"


@pytest.fixture
async def state(request: pytest.FixtureRequest) -> AsyncIterator[PostgresState]:
    state = await shared_state(request, "dispatch")
    try:
        yield state
    finally:
        await state.close()


def scope(epochs: dict[int, int]) -> FenceScope:
    return FenceScope("dispatch_leases", GROUP, epochs)


async def test_each_take_bumps_the_epoch_of_each_partition(state: PostgresState) -> None:
    leases = PgLeases(state.pool, "dispatch")
    assert await leases.take(GROUP, [2, 0], "a") == {0: 1, 2: 1}
    assert await leases.take(GROUP, [0, 1], "b") == {0: 2, 1: 1}
    assert await leases.take("another-group", [0], "c") == {0: 1}


async def test_a_stale_owner_cannot_claim_send_or_complete(state: PostgresState) -> None:
    leases = PgLeases(state.pool, "dispatch")
    mine = await leases.take(GROUP, [0], "zombie")
    zombie, owner = PgLedger(state.pool, owner="zombie"), PgLedger(state.pool, owner="owner")
    with fenced_as(scope(mine)):
        claim = await zombie.claim("prb-1", "web")
        assert claim.state == "new"
        assert await zombie.record_attempt("prb-1", "web") == 1
        assert await zombie.renew("prb-1", "web")  # a late request asks again: still ours
    theirs = await leases.take(GROUP, [0], "owner")  # the group moved partition 0
    with fenced_as(scope(mine)):
        for write in (zombie.claim("prb-2", "web"), zombie.record_attempt("prb-1", "web"),
                      zombie.renew("prb-1", "web"), zombie.complete("prb-1", "web", []),
                      zombie.take_over("prb-1", "web", claim)):
            with pytest.raises(Fenced, match=r"partitions \[0\]"):
                await write
    async with state.pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT probe_id, state, attempts, owner FROM sends ORDER BY probe_id")).fetchall()
    assert rows == [("prb-1", "claimed", 1, "zombie")], "the refused writes changed nothing"
    with fenced_as(scope(theirs)):
        assert (await owner.claim("prb-2", "web")).state == "new"
        assert await owner.complete("prb-2", "web", [])


async def test_a_lost_lease_on_any_partition_of_a_batch_refuses_it(
        state: PostgresState) -> None:
    leases = PgLeases(state.pool, "dispatch")
    mine = await leases.take(GROUP, [0, 1, 2], "a")
    await leases.take(GROUP, [1], "b")
    with fenced_as(scope(mine)), pytest.raises(Fenced) as caught:
        await PgLedger(state.pool).claim("prb-3", "web")
    assert caught.value.partitions == (1,)


async def test_no_scope_no_check(state: PostgresState) -> None:
    # A job (the heartbeat) or a store used outside a record: nothing to fence by.
    assert (await PgLedger(state.pool).claim("prb-4", "web")).state == "new"
    with fenced_as(scope({})):
        assert (await PgLedger(state.pool).claim("prb-5", "web")).state == "new"


async def test_a_take_waits_for_a_write_under_the_old_lease(state: PostgresState) -> None:
    """The write's FOR SHARE holds the lease row until it commits: a new owner's take is
    ordered after it, never between its check and its write."""
    leases = PgLeases(state.pool, "dispatch")
    mine = await leases.take(GROUP, [0], "a")
    from services.kit.fencing import check_fence

    async with state.pool.connection() as conn:
        with fenced_as(scope(mine)):
            await check_fence(conn)
        taking = asyncio.create_task(leases.take(GROUP, [0], "b"))
        await asyncio.sleep(0.3)
        assert not taking.done(), "the take waits for the fenced write to commit"
    assert await taking == {0: mine[0] + 1}


def test_another_role_cannot_read_or_move_dispatch_leases(pg_migrated: PgServer) -> None:
    with psycopg.connect(**conninfo(pg_migrated, "results")) as conn, pytest.raises(
            psycopg.errors.InsufficientPrivilege, match="dispatch_leases"):
        conn.execute("UPDATE dispatch_leases SET epoch = epoch + 1")


async def test_a_writer_frozen_in_its_transaction_does_not_hold_the_take(
        state: PostgresState, monkeypatch: pytest.MonkeyPatch,
        request: pytest.FixtureRequest) -> None:
    """A zombie frozen between its check and its commit: the server ends its transaction
    after IDLE_IN_FENCED_S, the new owner's take goes through, the stale commit fails."""
    from services.kit import fencing
    from services.kit.fencing import check_fence

    monkeypatch.setattr(fencing, "IDLE_IN_FENCED_S", 1)
    leases = PgLeases(state.pool, "dispatch")
    mine = await leases.take(GROUP, [0], "zombie")
    async with await psycopg.AsyncConnection.connect(
            **conninfo(request.getfixturevalue("pg_migrated"), "dispatch")) as conn:
        with fenced_as(scope(mine)):
            await check_fence(conn)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(leases.take(GROUP, [0], "owner"), 10) == {0: 2}
        assert asyncio.get_running_loop().time() - started < 5
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            await conn.execute("SELECT 1")


async def test_a_stale_tracker_batch_is_refused_whole_and_forgotten(
        request: pytest.FixtureRequest) -> None:
    from services.results.pg_store import PgTracker
    from services.results.tracking import ProbeState

    state = await shared_state(request, "results")
    try:
        leases = PgLeases(state.pool, "results")
        table = FenceScope("results_leases", "frs-results-tracker", {})
        mine = await leases.take(table.group_id, [0, 1], "zombie")
        tracker = PgTracker(state.pool)
        await tracker.put(ProbeState(probe_id="prb-a"))
        await leases.take(table.group_id, [1], "owner")
        with fenced_as(FenceScope(table.table, table.group_id, mine)), \
                pytest.raises(Fenced):
            await tracker.commit()
        # Forgotten: the next batch (under a good lease) does not carry it in.
        ours = await leases.take(table.group_id, [0, 1], "zombie")
        await tracker.put(ProbeState(probe_id="prb-b"))
        with fenced_as(FenceScope(table.table, table.group_id, ours)):
            await tracker.commit()
        async with state.pool.connection() as conn:
            rows = await (await conn.execute("SELECT probe_id FROM tracker_probes")).fetchall()
        assert rows == [("prb-b",)]
    finally:
        await state.close()

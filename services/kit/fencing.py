"""Fencing: a stale owner of a partition cannot act on the world.

The member a consumer group assigns partition ``p`` of a route's topics takes the lease of
``(group, p)`` in the shared store, bumping its epoch (``Leases.take``). The writes that
act on the world (dispatch's claim before a send and its completion, the results
tracker's commit of a batch, the vault's purge claim) check, in their own transaction,
that the lease still has the epoch their instance was handed (``check_fence``); a
zombie (an instance frozen past its session timeout, its partitions since given to
another) finds a newer epoch, its write is refused with ``Fenced``, and the processor
stops acting on that partition until the group hands it back.

How a store knows which partition a write belongs to: the processor sets a context
variable (``fenced_as``) around each handler call and each batch commit. A context
variable rather than a parameter because the writes sit several calls deep in plain
handlers and ports that know nothing of Kafka (DESIGN.md): threading a partition through
every handler, port and protocol would touch every service for a concern only the
PostgreSQL stores act on. asyncio copies the context into the tasks a handler starts, so
concurrent work of one record carries its scope; work outside a record (jobs, sweeps)
has no scope and is not fenced here.

On SQLite (one host, one state dir) there is nothing to fence against and no lease: the
processor sets no scope (no lease to check) and no store looks for one. psycopg is
imported only when a check runs, as in state.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool


class Fenced(Exception):
    """A write refused: this instance no longer holds the lease of these partitions."""

    def __init__(self, group_id: str, partitions: Iterable[int]) -> None:
        self.group_id = group_id
        self.partitions = tuple(sorted(partitions))
        super().__init__(f"lease of {group_id} partitions {list(self.partitions)} "
                         "is held by a newer owner")


@dataclass(frozen=True)
class FenceScope:
    """The partitions a write belongs to and the epochs this instance holds them under,
    in the lease table of the service's role (``<role>_leases``, migration 0009)."""

    table: str
    group_id: str
    epochs: Mapping[int, int]


# A fenced write's transaction idle longer than this is ended by the server (check_fence).
IDLE_IN_FENCED_S = 5

_scope: ContextVar[FenceScope | None] = ContextVar("frs_fence_scope", default=None)


@contextlib.contextmanager
def fenced_as(scope: FenceScope | None) -> Iterator[None]:
    """The writes made inside (and in tasks started inside) belong to ``scope``."""
    token = _scope.set(scope)
    try:
        yield
    finally:
        _scope.reset(token)


def current_scope() -> FenceScope | None:
    return _scope.get()


async def check_fence(conn: AsyncConnection[Any]) -> None:
    """Inside the caller's transaction: raise ``Fenced`` unless every partition of the
    current scope is still leased under the epoch this instance holds. ``FOR SHARE``
    holds the lease rows until the caller commits, so a new owner's ``take`` waits for
    this write and any write after the take sees the new epoch. An instance frozen inside
    that transaction (SIGSTOP) would hold the rows, and its successor's take, forever:
    the server ends a transaction idle for ``IDLE_IN_FENCED_S`` (the frozen one's commit
    then fails), which no live writer comes near (no I/O inside these transactions).
    No scope: no check."""
    scope = _scope.get()
    if scope is None or not scope.epochs:
        return
    from psycopg import sql  # only where PostgreSQL is used

    wanted = sorted(scope.epochs)
    cur = await conn.execute(sql.SQL(
        "SELECT l.partition_no, l.epoch FROM {} AS l, (SELECT set_config("
        "'idle_in_transaction_session_timeout', %s, true)) AS idle "
        "WHERE l.group_id = %s AND l.partition_no = ANY(%s) FOR SHARE OF l").format(
            sql.Identifier(scope.table)), (f"{IDLE_IN_FENCED_S}s", scope.group_id, wanted))
    found = {int(p): int(e) for p, e in await cur.fetchall()}
    lost = [p for p in wanted if found.get(p) != scope.epochs[p]]
    if lost:
        raise Fenced(scope.group_id, lost)


class Leases(Protocol):
    """Where a route's processor takes the leases of the partitions it is assigned."""

    table: str

    async def take(self, group_id: str, partitions: Iterable[int], holder: str
                   ) -> dict[int, int]: ...


class PgLeases:
    """Leases in the service role's table (``dispatch_leases``, ``results_leases``,
    ``intake_leases``; migration 0009), one row per (group, partition)."""

    def __init__(self, pool: AsyncConnectionPool, role: str) -> None:
        if role not in ("dispatch", "results", "intake"):
            raise ValueError(f"no lease table for role {role!r}")
        self.pool = pool
        self.table = f"{role}_leases"

    async def take(self, group_id: str, partitions: Iterable[int], holder: str
                   ) -> dict[int, int]:
        """The new epoch of each partition, bumped in one transaction (in partition order,
        so two takers lock alike)."""
        from psycopg import sql

        epochs: dict[int, int] = {}
        async with self.pool.connection() as conn:
            for p in sorted(set(partitions)):
                cur = await conn.execute(sql.SQL(
                    "INSERT INTO {0} AS l (group_id, partition_no, epoch, holder) "
                    "VALUES (%s, %s, 1, %s) ON CONFLICT (group_id, partition_no) DO UPDATE "
                    "SET epoch = l.epoch + 1, holder = excluded.holder, taken_at = now() "
                    "RETURNING epoch").format(sql.Identifier(self.table)), (group_id, p, holder))
                row = await cur.fetchone()
                assert row is not None
                epochs[p] = int(row[0])
        return epochs

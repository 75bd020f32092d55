"""The dispatch ledger: each (probe, provider) send happens once across redelivery,
restart and rebalance.

Behind the ``Ledger`` port: ``SqliteLedger``, a file in the state dir (WAL with
``synchronous=FULL``, so every commit is fsync'd before the call returns), or ``PgLedger``
in the shared PostgreSQL database (FRS_STATE_URL; table ``sends`` of migration 0006).
Protocol per send:

1. ``claim`` before sending. A new row is ``claimed``; an existing ``done`` row returns the
   recorded outcome (the events to re-emit, nothing is sent again); an existing
   ``claimed`` row means a previous run crashed between claim and record: the outcome is
   unknown and the caller resolves it per transport (resend with the same idempotency key,
   or fail with ``outcome_unknown``).
2. ``record_attempt`` before each attempt (attempt counts survive crashes); ``renew``
   before the last bytes of an attempt that did not leave soon after its record (the
   process was frozen meanwhile, or the connect was slow).
3. ``complete`` with the events the send produced, before the handler returns; the
   Kafka offset is committed only after those events are acknowledged.

Dispatch ids and request refs are derived from (probe, provider), not random, so two
instances racing on the same clearance after a rebalance use the same Idempotency-Key.
Instances share the ledger they are configured with: a SQLite ledger the instances of one
host (one state dir), a PostgreSQL ledger the instances on every host, so one of them
sends each (probe, provider). Only instances on different hosts that each keep a SQLite
ledger fall back on the vendors' idempotency keys.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from schemas.events import EVENTS_BY_TYPE, Event
from schemas.types import utcnow
from services.kit.cost import step
from services.kit.fencing import check_fence
from services.kit.sqlite import connect

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

_DISPATCH_NS = uuid.UUID("0b1e7c52-5a0f-4c47-9e55-3f3f0d8c2a11")
_REF_NS = uuid.UUID("9d2f6a0e-0f5c-4c7f-8f0e-6b8a3c1d2e44")
T = TypeVar("T")


def dispatch_id_for(probe_id: str, provider_id: str) -> str:
    return f"dsp-{uuid.uuid5(_DISPATCH_NS, f'{probe_id}/{provider_id}')}"


def request_ref_for(dispatch_id: str) -> str:
    """Opaque to the provider: it cannot be turned back into a probe or case id."""
    return f"ref-{uuid.uuid5(_REF_NS, dispatch_id)}"


@dataclass(frozen=True)
class Claim:
    dispatch_id: str
    request_ref: str
    state: Literal["new", "unknown", "done"]
    attempts: int
    claimed_at: datetime
    outcome: list[Event]
    owner: str = ""
    heartbeat_at: datetime | None = None


class Ledger(Protocol):
    owner: str

    async def claim(self, probe_id: str, provider_id: str) -> Claim: ...
    async def record_attempt(self, probe_id: str, provider_id: str) -> int: ...
    async def renew(self, probe_id: str, provider_id: str) -> bool: ...
    async def take_over(self, probe_id: str, provider_id: str, seen: Claim) -> bool: ...
    async def heartbeat(self) -> int: ...
    def release(self, probe_id: str, provider_id: str) -> None: ...
    async def complete(self, probe_id: str, provider_id: str, events: list[Event]) -> bool: ...
    async def counts(self) -> dict[str, int]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sends (
  probe_id TEXT NOT NULL, provider_id TEXT NOT NULL, dispatch_id TEXT NOT NULL,
  request_ref TEXT NOT NULL, state TEXT NOT NULL CHECK (state IN ('claimed', 'done')),
  attempts INTEGER NOT NULL DEFAULT 0, claimed_at TEXT NOT NULL, finished_at TEXT,
  outcome TEXT, owner TEXT NOT NULL DEFAULT '', heartbeat_at TEXT,
  PRIMARY KEY (probe_id, provider_id)
);
"""


def _dump(events: list[Event]) -> str:
    return json.dumps([{"type": e.TYPE, "data": e.model_dump(mode="json")} for e in events])


def _load(text: str | None) -> list[Event]:
    return [EVENTS_BY_TYPE[item["type"]].model_validate(item["data"])
            for item in json.loads(text or "[]")]


class _Holder:
    """What a ledger keeps in its process, whatever the store: the owner it writes claims
    as, and the claims it is working on (``heartbeat`` vouches for those)."""

    def __init__(self, owner: str | None) -> None:
        # Which process holds a claim: another live owner's claim is waited for, not resent.
        self.owner = owner or f"dispatch-{uuid.uuid4()}"
        self._held: set[tuple[str, str]] = set()  # claims this owner is working on
        self.transactions = 0  # committed write transactions

    def _claimed(self, probe_id: str, provider_id: str, claim: Claim) -> Claim:
        if claim.state == "new" or (claim.state == "unknown" and claim.owner == self.owner):
            self._held.add((probe_id, provider_id))  # on the loop thread, like heartbeat()
        return claim

    def _taken(self, probe_id: str, provider_id: str, taken: bool) -> bool:
        if taken:
            self._held.add((probe_id, provider_id))
        return taken

    def release(self, probe_id: str, provider_id: str) -> None:
        """Stop vouching for a claim this process gave up on (its handler raised): after the
        lease another instance may take it over."""
        self._held.discard((probe_id, provider_id))


class SqliteLedger(_Holder):
    """One connection, used from one worker thread, so the event loop never blocks on fsync.

    Writes use group commit: every write queued while a transaction is being fsync'd goes
    into the next transaction together, so many concurrent claims cost one fsync, and each
    caller still returns only once its own write is durable."""

    def __init__(self, path: Path | str, owner: str | None = None) -> None:
        super().__init__(owner)
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._db = self._pool.submit(self._open, str(path)).result()
        self._pending: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None  # group commit: transactions < writes

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        db = connect(Path(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        db.executescript(_SCHEMA)
        return db

    async def _run(self, fn: Any, *args: Any) -> Any:
        """A read, outside any transaction."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _write(self, fn: Callable[[], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                results = await loop.run_in_executor(self._pool, self._transaction,
                                                     [fn for fn, _ in batch])
            except Exception as exc:  # the commit failed: nothing in the batch is durable
                results = [(False, exc)] * len(batch)
            for (_, future), (ok, value) in zip(batch, results, strict=True):
                if not future.done():
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)

    def _transaction(self, fns: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        with step("state"):  # on the ledger's own thread: its CPU only
            return self._transaction_of(fns)

    def _transaction_of(self, fns: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
        db = self._db
        out: list[tuple[bool, Any]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for fn in fns:
                db.execute("SAVEPOINT op")
                try:
                    out.append((True, fn()))
                    db.execute("RELEASE op")
                except Exception as exc:  # one bad write must not sink the others
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    out.append((False, exc))
            db.execute("COMMIT")  # synchronous=FULL: fsync'd before this returns
            self.transactions += 1
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return out

    def close(self) -> None:
        self._pool.submit(self._db.close).result()
        self._pool.shutdown()

    # --- sends ----------------------------------------------------------------------

    async def claim(self, probe_id: str, provider_id: str) -> Claim:
        dispatch_id = dispatch_id_for(probe_id, provider_id)
        request_ref = request_ref_for(dispatch_id)

        def claim() -> Claim:
            now = utcnow()
            inserted = self._db.execute(
                "INSERT INTO sends (probe_id, provider_id, dispatch_id, request_ref, state, "
                "claimed_at, owner, heartbeat_at) VALUES (?, ?, ?, ?, 'claimed', ?, ?, ?) "
                "ON CONFLICT (probe_id, provider_id) DO NOTHING",
                (probe_id, provider_id, dispatch_id, request_ref, now.isoformat(), self.owner,
                 now.isoformat()),
            ).rowcount
            if inserted:
                return Claim(dispatch_id, request_ref, "new", 0, now, [], self.owner, now)
            state, attempts, claimed_at, outcome, owner, heartbeat = self._db.execute(
                "SELECT state, attempts, claimed_at, outcome, owner, heartbeat_at FROM sends "
                "WHERE probe_id = ? AND provider_id = ?", (probe_id, provider_id)).fetchone()
            return Claim(dispatch_id, request_ref, "done" if state == "done" else "unknown",
                         attempts, datetime.fromisoformat(claimed_at), _load(outcome), owner,
                         datetime.fromisoformat(heartbeat) if heartbeat else None)
        return self._claimed(probe_id, provider_id, await self._write(claim))

    # Every write to a claim is fenced by its owner: an owner whose claim was taken over
    # (its heartbeat stopped) cannot count an attempt or record an outcome any more.

    async def record_attempt(self, probe_id: str, provider_id: str) -> int:
        """The attempt's number, durable before the send; 0 if the claim is not ours."""
        def bump() -> int:
            row = self._db.execute(
                "UPDATE sends SET attempts = attempts + 1, heartbeat_at = ? "
                "WHERE probe_id = ? AND provider_id = ? AND owner = ? AND state = 'claimed' "
                "RETURNING attempts",
                (utcnow().isoformat(), probe_id, provider_id, self.owner)).fetchone()
            return int(row[0]) if row else 0
        return await self._write(bump)

    async def renew(self, probe_id: str, provider_id: str) -> bool:
        """Whether the claim is still this owner's and open; if so its heartbeat is renewed,
        so no other instance takes it over for a whole lease from now."""
        def beat() -> bool:
            return self._db.execute(
                "UPDATE sends SET heartbeat_at = ? WHERE probe_id = ? AND provider_id = ? "
                "AND owner = ? AND state = 'claimed'",
                (utcnow().isoformat(), probe_id, provider_id, self.owner)).rowcount == 1
        return await self._write(beat)

    async def take_over(self, probe_id: str, provider_id: str, seen: Claim) -> bool:
        """Take a claim whose owner and heartbeat are still those ``seen``: of two
        instances taking over one abandoned claim, one wins."""
        beat = seen.heartbeat_at.isoformat() if seen.heartbeat_at else None

        def swap() -> bool:
            return self._db.execute(
                "UPDATE sends SET owner = ?, heartbeat_at = ? WHERE probe_id = ? AND "
                "provider_id = ? AND state = 'claimed' AND owner = ? AND heartbeat_at IS ?",
                (self.owner, utcnow().isoformat(), probe_id, provider_id, seen.owner, beat),
            ).rowcount == 1
        return self._taken(probe_id, provider_id, await self._write(swap))

    async def complete(self, probe_id: str, provider_id: str, events: list[Event]) -> bool:
        """Record the outcome; False if the claim was taken over meanwhile (not recorded)."""
        outcome = _dump(events)
        done = await self._write(lambda: self._db.execute(
            "UPDATE sends SET state = 'done', finished_at = ?, outcome = ? "
            "WHERE probe_id = ? AND provider_id = ? AND owner = ? AND state = 'claimed'",
            (utcnow().isoformat(), outcome, probe_id, provider_id, self.owner)).rowcount == 1)
        self._held.discard((probe_id, provider_id))
        return bool(done)

    async def heartbeat(self) -> int:
        """Mark this owner's open claims alive, so other instances wait instead of resending."""
        held = list(self._held)
        if held:
            now = utcnow().isoformat()
            rows = [(now, p, q, self.owner) for p, q in held]
            await self._write(lambda: self._db.executemany(
                "UPDATE sends SET heartbeat_at = ? WHERE probe_id = ? AND "
                "provider_id = ? AND owner = ? AND state = 'claimed'", rows))
        return len(held)

    async def counts(self) -> dict[str, int]:
        def read() -> dict[str, int]:
            rows = self._db.execute("SELECT state, count(*) FROM sends GROUP BY state")
            return {str(s): int(n) for s, n in rows}
        result: dict[str, int] = await self._run(read)
        return result


def _utc(value: datetime | None) -> datetime | None:
    # timestamptz comes back in the session's time zone; claims carry UTC, like SQLite's.
    return value.astimezone(UTC) if value is not None else None


class PgLedger(_Holder):
    """PostgreSQL (migration 0006, the dispatch role): the same statements, each call its
    own transaction on a connection of the service's pool, committed before it returns.
    Row locks make the races safe across instances: of two claims of one send, the second
    ``INSERT … ON CONFLICT DO NOTHING`` waits for the first to commit, then reads its row
    (``unknown``); of two takeovers, the second ``UPDATE`` re-checks (owner, heartbeat_at)
    on the row the first wrote and changes nothing.

    The writes that act on the world (a claim before a send, the attempt just before it,
    the completion) also check this instance's partition lease in their transaction
    (services/kit/fencing.py): a stale owner's raises ``Fenced`` and it sends nothing."""

    def __init__(self, pool: AsyncConnectionPool, owner: str | None = None) -> None:
        super().__init__(owner)
        self.pool = pool

    async def _update(self, query: str, params: tuple[Any, ...], *, fenced: bool = False
                      ) -> int:
        """Rows changed by one committed UPDATE (after the lease check, when fenced)."""
        async with self.pool.connection() as conn:
            if fenced:
                await check_fence(conn)
            changed = (await conn.execute(query, params)).rowcount
        self.transactions += 1
        return changed

    async def claim(self, probe_id: str, provider_id: str) -> Claim:
        dispatch_id = dispatch_id_for(probe_id, provider_id)
        request_ref = request_ref_for(dispatch_id)
        now = utcnow()
        async with self.pool.connection() as conn:
            await check_fence(conn)
            inserted = (await conn.execute(
                "INSERT INTO sends (probe_id, provider_id, dispatch_id, request_ref, state, "
                "claimed_at, owner, heartbeat_at) VALUES (%s, %s, %s, %s, 'claimed', %s, %s, %s) "
                "ON CONFLICT (probe_id, provider_id) DO NOTHING",
                (probe_id, provider_id, dispatch_id, request_ref, now, self.owner, now),
            )).rowcount
            row = None if inserted else await (await conn.execute(
                "SELECT state, attempts, claimed_at, outcome, owner, heartbeat_at FROM sends "
                "WHERE probe_id = %s AND provider_id = %s", (probe_id, provider_id))).fetchone()
        self.transactions += 1
        if row is None:
            claim = Claim(dispatch_id, request_ref, "new", 0, now, [], self.owner, now)
        else:
            state, attempts, claimed_at, outcome, owner, heartbeat = row
            claim = Claim(dispatch_id, request_ref, "done" if state == "done" else "unknown",
                          int(attempts), claimed_at.astimezone(UTC), _load(outcome),
                          str(owner), _utc(heartbeat))
        return self._claimed(probe_id, provider_id, claim)

    # Every write is fenced by owner and state, as in SqliteLedger.

    async def record_attempt(self, probe_id: str, provider_id: str) -> int:
        """The attempt's number, durable before the send; 0 if the claim is not ours."""
        async with self.pool.connection() as conn:
            await check_fence(conn)  # the last write before the send goes out
            row = await (await conn.execute(
                "UPDATE sends SET attempts = attempts + 1, heartbeat_at = %s "
                "WHERE probe_id = %s AND provider_id = %s AND owner = %s AND state = 'claimed' "
                "RETURNING attempts", (utcnow(), probe_id, provider_id, self.owner))).fetchone()
        self.transactions += 1
        return int(row[0]) if row else 0

    async def renew(self, probe_id: str, provider_id: str) -> bool:
        """What ``record_attempt`` checked, asked again: the lease still ours (``Fenced`` if
        not), the claim still this owner's and open; its heartbeat renewed if so."""
        return await self._update(
            "UPDATE sends SET heartbeat_at = %s WHERE probe_id = %s AND provider_id = %s "
            "AND owner = %s AND state = 'claimed'",
            (utcnow(), probe_id, provider_id, self.owner), fenced=True) == 1

    async def take_over(self, probe_id: str, provider_id: str, seen: Claim) -> bool:
        """Compare-and-swap on (owner, heartbeat_at) as ``seen``: one of two wins."""
        return self._taken(probe_id, provider_id, await self._update(
            "UPDATE sends SET owner = %s, heartbeat_at = %s WHERE probe_id = %s AND "
            "provider_id = %s AND state = 'claimed' AND owner = %s AND "
            "heartbeat_at IS NOT DISTINCT FROM %s::timestamptz",
            (self.owner, utcnow(), probe_id, provider_id, seen.owner, seen.heartbeat_at),
            fenced=True) == 1)

    async def complete(self, probe_id: str, provider_id: str, events: list[Event]) -> bool:
        """Record the outcome; False if the claim was taken over meanwhile (not recorded)."""
        done = await self._update(
            "UPDATE sends SET state = 'done', finished_at = %s, outcome = %s "
            "WHERE probe_id = %s AND provider_id = %s AND owner = %s AND state = 'claimed'",
            (utcnow(), _dump(events), probe_id, provider_id, self.owner), fenced=True)
        self.release(probe_id, provider_id)
        return done == 1

    async def heartbeat(self) -> int:
        """Mark this owner's open claims alive, in one statement."""
        held = list(self._held)
        if held:
            await self._update(
                "UPDATE sends SET heartbeat_at = %s FROM unnest(%s::text[], %s::text[]) "
                "AS h(probe_id, provider_id) WHERE sends.probe_id = h.probe_id AND "
                "sends.provider_id = h.provider_id AND owner = %s AND state = 'claimed'",
                (utcnow(), [p for p, _ in held], [q for _, q in held], self.owner))
        return len(held)

    async def counts(self) -> dict[str, int]:
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(
                "SELECT state, count(*) FROM sends GROUP BY state")).fetchall()
        return {str(s): int(n) for s, n in rows}

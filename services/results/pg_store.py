"""The PostgreSQL twins of results' inbound stores (store.py), shared by every instance
of the service (migration 0004, the results role):

- ``PgNonceStore``: accepted webhook calls (``webhook_nonces``) and reply mails
  (``mail_replies``); a claim is one ``INSERT ... ON CONFLICT``, so of two instances
  claiming the same signature at once exactly one wins.
- ``PgRequestRefs``: request_ref -> (probe, provider). The tracker writes them here (with
  its batch) and the webhook and the inbox read them.
- ``PgTracker`` (migration 0007): each probe's tracking state. A batch's writes are kept
  in memory and written in one transaction by ``commit`` (the route's ``before_commit``);
  the deadline sweep claims due probes with ``FOR UPDATE SKIP LOCKED`` and records what
  it acted on in the same transaction, so of two instances sweeping at once exactly one
  acts on each deadline.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from psycopg import sql

from services.kit.fencing import Fenced, check_fence
from services.results.store import DueAction
from services.results.tracking import ProbeState

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

# The tables of migration 0004, by the names store.NonceStore uses for its SQLite tables.
NONCE_TABLES = {"nonces": "webhook_nonces", "mail_replies": "mail_replies"}
# Expired claims deleted per claim: pruning keeps pace without one call paying for all.
_PRUNE_BATCH = 64
# Due probes one sweep claims at most; another instance takes the rest meanwhile.
_SWEEP_BATCH = 256


class PgNonceStore:
    def __init__(self, pool: AsyncConnectionPool, table: str = "nonces") -> None:
        if table not in NONCE_TABLES:
            raise ValueError(f"bad table name {table!r}")
        self.pool = pool
        name = sql.Identifier(NONCE_TABLES[table])
        self._seen = sql.SQL("SELECT 1 FROM {} WHERE digest = %s AND seen_at >= %s").format(name)
        # Rows another claim is pruning are skipped, not waited for.
        self._prune = sql.SQL(
            "DELETE FROM {t} WHERE digest IN (SELECT digest FROM {t} WHERE seen_at < %s "
            "LIMIT %s FOR UPDATE SKIP LOCKED)").format(t=name)
        # New, or an expired claim of the same digest taken over; a live claim (even one
        # committed by another instance a moment ago) leaves no row changed.
        self._claim = sql.SQL(
            "INSERT INTO {t} AS n (digest, seen_at) VALUES (%s, %s) ON CONFLICT (digest) "
            "DO UPDATE SET seen_at = excluded.seen_at WHERE n.seen_at < %s").format(t=name)
        self._release = sql.SQL("DELETE FROM {} WHERE digest = %s").format(name)

    async def seen(self, digest: str, now: float, keep_s: float) -> bool:
        """True if ``digest`` was claimed within the last ``keep_s`` seconds (read only)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(self._seen, (digest, now - keep_s))
            return await cur.fetchone() is not None

    async def claim(self, digest: str, now: float, keep_s: float) -> bool:
        """True if ``digest`` was not claimed within ``keep_s``; records it durably."""
        async with self.pool.connection() as conn:
            await conn.execute(self._prune, (now - keep_s, _PRUNE_BATCH))
            await conn.commit()  # the claim waits for no lock of this prune's
            cur = await conn.execute(self._claim, (digest, now, now - keep_s))
            return cur.rowcount == 1

    async def release(self, digest: str) -> None:
        """Forget a claim whose call was not accepted, so the provider may retry it."""
        async with self.pool.connection() as conn:
            await conn.execute(self._release, (digest,))


class PgRequestRefs:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def lookup(self, request_ref: str) -> tuple[str, str] | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT probe_id, provider_id FROM request_refs WHERE request_ref = %s",
                (request_ref,))
            row = await cur.fetchone()
        return (str(row[0]), str(row[1])) if row else None

    async def record(self, refs: list[tuple[str, str, str]]) -> None:
        """(request_ref, probe_id, provider_id) rows; one already known is kept as it is."""
        async with self.pool.connection() as conn:
            await _record_refs(conn, refs)


async def _record_refs(conn: AsyncConnection[Any], refs: list[tuple[str, str, str]]) -> None:
    if refs:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO request_refs (request_ref, probe_id, provider_id) "
                "VALUES (%s, %s, %s) ON CONFLICT (request_ref) DO NOTHING", refs)


class PgTracker:
    """The ``Tracker`` port on PostgreSQL, shared by every instance. ``next_due`` is the
    earliest open deadline not yet acted on, so a probe whose events are out but not yet
    consumed is not claimed again each tick; ``acted`` holds those deadlines' keys."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool
        self._batch: dict[str, ProbeState] = {}

    async def get(self, probe_id: str) -> ProbeState:
        if probe_id in self._batch:
            return self._batch[probe_id]
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT state FROM tracker_probes WHERE probe_id = %s",
                                     (probe_id,))
            row = await cur.fetchone()
        return ProbeState(probe_id=probe_id) if row is None else ProbeState.model_validate(row[0])

    async def put(self, state: ProbeState) -> None:
        self._batch[state.probe_id] = state

    async def commit(self) -> None:
        if not self._batch:
            return
        # In probe order, so two writers of the same probes (a rebalance) lock alike.
        states = [self._batch[p] for p in sorted(self._batch)]
        rows = [(s.probe_id, s.model_dump_json(), s.next_due(), s.review == "requested",
                 sum(t.deletion == "overdue" for t in s.providers.values())) for s in states]
        refs = [(t.request_ref, s.probe_id, pid) for s in states
                for pid, t in s.providers.items() if t.request_ref is not None]
        try:
            async with self.pool.connection() as conn, conn.transaction():
                # Under this instance's partition leases (the processor's scope): a stale
                # owner's batch is refused whole, and forgotten, never written later.
                await check_fence(conn)
                async with conn.cursor() as cur:
                    # ``acted`` stays: the sweep prunes it against the state it locks.
                    await cur.executemany(
                        "INSERT INTO tracker_probes (probe_id, state, next_due, "
                        "review_pending, deletions_overdue) VALUES (%s, %s::jsonb, %s, %s, %s) "
                        "ON CONFLICT (probe_id) DO UPDATE SET state = excluded.state, "
                        "next_due = excluded.next_due, review_pending = excluded.review_pending, "
                        "deletions_overdue = excluded.deletions_overdue", rows)
                await _record_refs(conn, refs)
        except Fenced:
            self._batch.clear()
            raise
        self._batch.clear()

    async def act_on_due(self, now: datetime, act: DueAction) -> int:
        """Claims due probes (rows another sweep holds are skipped, not waited for), acts,
        and records what it acted on before the claim ends: a crash before the commit
        leaves the deadlines to the next sweep (reported again, at least once); two
        sweeps never act on one at the same time."""
        failure: Exception | None = None
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "SELECT state, acted FROM tracker_probes WHERE next_due <= %s "
                "ORDER BY next_due LIMIT %s FOR UPDATE SKIP LOCKED", (now, _SWEEP_BATCH))
            rows = await cur.fetchall()
            for doc, acted_list in rows:
                state = ProbeState.model_validate(doc)
                acted = frozenset(acted_list)
                try:
                    done = set(await act(state, acted))
                except Exception as exc:  # what was acted on so far is still recorded
                    failure = exc
                    break
                keep = (acted | done) & state.open_deadlines().keys()
                await conn.execute(
                    "UPDATE tracker_probes SET acted = %s, next_due = %s WHERE probe_id = %s",
                    (sorted(keep), state.next_due(keep), state.probe_id))
        if failure is not None:
            raise failure
        return len(rows)

    async def open_counts(self) -> tuple[int, int]:
        async with self.pool.connection() as conn:
            # Each count reads its partial index only, not every probe ever tracked.
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM tracker_probes WHERE review_pending), "
                "(SELECT coalesce(sum(deletions_overdue), 0) FROM tracker_probes "
                "WHERE deletions_overdue > 0)")
            row = await cur.fetchone()
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def close(self) -> None:
        self._batch.clear()  # an uncommitted batch is replayed from Kafka, never half-kept

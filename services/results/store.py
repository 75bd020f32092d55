"""Durable local stores of the results service, in SQLite (WAL), and their ports.

``Tracker`` is the port of each probe's tracking state; ``TrackerStore`` is its SQLite
implementation, ``pg_store.PgTracker`` its PostgreSQL one. Writes of one consumed batch
are kept together and committed by the processor's ``before_commit`` hook, after the
batch's outputs are acknowledged and before its offsets are committed: a crash before
that commit replays the batch against the old state (outputs may repeat only if the
crash falls between the broker's ack and this commit); a crash after it replays against
the new state, where every transition is a no-op, so nothing is emitted twice.

``NonceStore`` remembers accepted webhook calls for the replay window, and accepted reply
mails for ``FRS_RESULTS_SMTP_REPLAY_KEEP_DAYS``, across restarts.

The inbound channels use the ``Nonces`` and ``RefLookup`` ports; their PostgreSQL twins,
shared by every instance, are in pg_store.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Protocol

from services.kit.cost import step
from services.kit.sqlite import connect
from services.results.tracking import ProbeState


def _connect(path: Path) -> sqlite3.Connection:
    return connect(path, isolation_level="DEFERRED", check_same_thread=False)


# What a deadline sweep does with a due probe: given its state and the deadline keys
# (tracking.deadline_key) already acted on, act on the others and return their keys.
DueAction = Callable[[ProbeState, frozenset[str]], Awaitable[Iterable[str]]]


class Tracker(Protocol):
    async def get(self, probe_id: str) -> ProbeState: ...
    async def put(self, state: ProbeState) -> None:
        """Kept with the batch's other writes until ``commit``; ``get`` sees it at once."""
    async def commit(self) -> None:
        """The batch's writes, durable (the route's ``before_commit``)."""
    async def act_on_due(self, now: datetime, act: DueAction) -> int:
        """Call ``act`` on each probe with a deadline passed by ``now``; a key it returns
        is not offered again. Returns how many probes were offered."""
    async def open_counts(self) -> tuple[int, int]:
        """(probes awaiting examiner review, provider deletion receipts overdue)."""
    def close(self) -> None:
        """Drop an uncommitted batch: it is replayed from Kafka, never half-kept."""


# The two counts of a row, from its JSON state (filling in a file of an older version).
_REVIEW_PENDING = "json_extract(state, '$.review') = 'requested'"
_DELETIONS_OVERDUE = ("(SELECT count(*) FROM json_each(state, '$.providers') AS p "
                      "WHERE json_extract(p.value, '$.deletion') = 'overdue')")


class TrackerStore:
    """SQLite, one instance: the batch is the connection's open transaction, and the keys
    acted on live in memory (after a restart a deadline whose event the tracker has not
    consumed yet is reported again, and the tracker ignores the repeat)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = _connect(path)
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS probes (
                probe_id TEXT PRIMARY KEY, state TEXT NOT NULL, next_due TEXT);
            CREATE INDEX IF NOT EXISTS probes_next_due ON probes(next_due);
            CREATE TABLE IF NOT EXISTS request_refs (
                request_ref TEXT PRIMARY KEY, probe_id TEXT NOT NULL,
                provider_id TEXT NOT NULL);
        """)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(probes)")}
        if not {"review_pending", "deletions_overdue"} <= columns:
            # The gauges' counts, kept per row and read through partial indexes: the
            # deadline job counted them each second with JSON over every probe ever
            # tracked (1.3 ms at 700 probes, seconds at a million). A file of an older
            # version is filled in once, here, in one transaction: a crash midway leaves
            # the old layout, done again at the next start.
            added = "".join(
                f"ALTER TABLE probes ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0;"
                for name in ("review_pending", "deletions_overdue") if name not in columns)
            self._db.executescript(f"""
                BEGIN IMMEDIATE;
                {added}
                UPDATE probes SET review_pending = {_REVIEW_PENDING},
                                  deletions_overdue = {_DELETIONS_OVERDUE};
                COMMIT;
            """)
        self._db.executescript("""
            CREATE INDEX IF NOT EXISTS probes_review_pending ON probes(review_pending)
                WHERE review_pending;
            CREATE INDEX IF NOT EXISTS probes_deletions_overdue ON probes(deletions_overdue)
                WHERE deletions_overdue > 0;
        """)
        self._db.commit()
        self._acted: dict[str, frozenset[str]] = {}

    async def get(self, probe_id: str) -> ProbeState:
        with step("state"):
            row = self._db.execute("SELECT state FROM probes WHERE probe_id = ?",
                                   (probe_id,)).fetchone()
            if row is None:
                return ProbeState(probe_id=probe_id)
            return ProbeState.model_validate_json(row[0])

    async def put(self, state: ProbeState) -> None:
        with step("state"):
            self._put(state)

    def _put(self, state: ProbeState) -> None:
        due = state.next_due()
        self._db.execute(
            "INSERT INTO probes(probe_id, state, next_due, review_pending, deletions_overdue) "
            "VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(probe_id) DO UPDATE SET state = excluded.state, "
            "next_due = excluded.next_due, review_pending = excluded.review_pending, "
            "deletions_overdue = excluded.deletions_overdue",
            (state.probe_id, state.model_dump_json(), due.isoformat() if due else None,
             state.review == "requested",
             sum(t.deletion == "overdue" for t in state.providers.values())),
        )
        for pid, track in state.providers.items():
            if track.request_ref is not None:
                self._db.execute(
                    "INSERT OR IGNORE INTO request_refs VALUES (?, ?, ?)",
                    (track.request_ref, state.probe_id, pid),
                )

    async def act_on_due(self, now: datetime, act: DueAction) -> int:
        # ISO strings of UTC datetimes sort like the datetimes themselves.
        rows = self._db.execute(
            "SELECT state FROM probes WHERE next_due IS NOT NULL AND next_due <= ?",
            (now.isoformat(),),
        ).fetchall()
        due: set[str] = set()
        for (text,) in rows:
            state = ProbeState.model_validate_json(text)
            due.add(state.probe_id)
            acted = self._acted.get(state.probe_id, frozenset())
            done = await act(state, acted)
            # Only keys still open: once the tracker consumed an event it is not due again.
            self._acted[state.probe_id] = (acted | set(done)) & state.open_deadlines().keys()
        self._acted = {p: keys for p, keys in self._acted.items() if p in due and keys}
        return len(rows)

    async def open_counts(self) -> tuple[int, int]:
        reviews, overdue = self._db.execute(
            "SELECT (SELECT count(*) FROM probes WHERE review_pending), "
            "(SELECT coalesce(sum(deletions_overdue), 0) FROM probes "
            "WHERE deletions_overdue > 0)").fetchone()
        return int(reviews), int(overdue)

    async def commit(self) -> None:
        with step("commit"):  # the batch's one transaction: its fsync
            self._db.commit()

    def close(self) -> None:
        self._db.rollback()  # an uncommitted batch is replayed from Kafka, never half-kept
        self._db.close()


class RefLookup(Protocol):
    async def lookup(self, request_ref: str) -> tuple[str, str] | None: ...


class Arrivals:
    """Word, within this process, that the tracker has committed request refs: an inbound
    answer that came before its ref (a vendor answering at once) looks again when a batch
    holding it is committed, instead of every 10 ms (about ten lookups a probe)."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._written: set[str] = set()  # put in the open batch, not yet committed

    def written(self, refs: Iterable[str]) -> None:
        self._written.update(refs)

    def committed(self) -> None:
        for ref in self._written:
            for waiter in self._waiting.pop(ref, ()):
                if not waiter.done():
                    waiter.set_result(None)
        self._written.clear()

    def watch(self, request_ref: str) -> asyncio.Future[None]:
        """Resolved once a commit of this process holds ``request_ref``; ``forget`` it."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(request_ref, []).append(waiter)
        return waiter

    def forget(self, request_ref: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiting.get(request_ref)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiting[request_ref]


class Nonces(Protocol):
    async def seen(self, digest: str, now: float, keep_s: float) -> bool: ...
    async def claim(self, digest: str, now: float, keep_s: float) -> bool: ...
    async def release(self, digest: str) -> None: ...


class RequestRefs:
    """Read-only view of request_ref -> (probe, provider), committed rows only."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)

    async def lookup(self, request_ref: str) -> tuple[str, str] | None:
        with step("state"):
            row = self._db.execute(
                "SELECT probe_id, provider_id FROM request_refs WHERE request_ref = ?",
                (request_ref,),
            ).fetchone()
        return (str(row[0]), str(row[1])) if row else None

    def close(self) -> None:
        self._db.close()


class NonceStore:
    """Accepted inbound calls, kept for a while (durable): webhook signatures (table
    ``nonces``) and reply mails (table ``mail_replies``), so a replay is refused across
    restarts too."""

    def __init__(self, path: Path, table: str = "nonces") -> None:
        if not table.isidentifier():
            raise ValueError(f"bad table name {table!r}")
        self._table = table
        self._db = _connect(path)
        # Survives a process crash (WAL); a power cut may forget the last claims, and a
        # call replayed then is a duplicate answer the tracker already ignores. FULL cost
        # an fsync per webhook call on the event loop.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} ("
                         "digest TEXT PRIMARY KEY, seen_at REAL NOT NULL)")
        # Without it every claim's prune scanned the whole window (~20k rows at 35/s).
        self._db.execute(f"CREATE INDEX IF NOT EXISTS {table}_seen_at ON {table} (seen_at)")
        self._db.commit()

    async def seen(self, digest: str, now: float, keep_s: float) -> bool:
        """True if ``digest`` was claimed within the last ``keep_s`` seconds (read only)."""
        row = self._db.execute(f"SELECT 1 FROM {self._table} WHERE digest = ? AND seen_at >= ?",
                               (digest, now - keep_s)).fetchone()
        return row is not None

    async def claim(self, digest: str, now: float, keep_s: float) -> bool:
        """True if ``digest`` was not claimed within ``keep_s``; records it durably."""
        with step("state"):
            self._db.execute(f"DELETE FROM {self._table} WHERE seen_at < ?", (now - keep_s,))
            cur = self._db.execute(f"INSERT OR IGNORE INTO {self._table} VALUES (?, ?)",
                                   (digest, now))
            self._db.commit()
        return cur.rowcount == 1

    async def release(self, digest: str) -> None:
        """Forget a claim whose call was not accepted, so the provider may retry it."""
        self._db.execute(f"DELETE FROM {self._table} WHERE digest = ?", (digest,))
        self._db.commit()

    def close(self) -> None:
        self._db.close()

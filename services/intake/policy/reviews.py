"""Durable exigent-review flags, behind the ``Reviews`` port: ``ReviewStore``, a small
SQLite file in the state dir (one host), or ``PgReviewStore`` in the shared PostgreSQL
database (many instances).

A flag is raised by an exigent clearance and lowered by a supervisor's review. An overdue
flag is claimed by one watch for a lease (``claim_overdue``: every instance runs the watch,
one reports each flag), then marked reported (``overdue_reported_at``) once its event is on
the bus; a claim whose holder died lapses and is claimed again. The store survives
restarts. The gate raises a flag before it sends the clearance, the reviews route lowers
it from the reviews topic (at-least-once: raising or lowering twice changes nothing)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from services.kit.sqlite import connect

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exigent_reviews (
    probe_id TEXT PRIMARY KEY,
    due_at TEXT,
    reviewed_at TEXT,
    approved INTEGER,
    overdue_reported_at TEXT,
    claimed_until TEXT
)
"""


def _ts(value: datetime) -> str:
    # Fixed-width UTC text sorts like the instant it names.
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class Reviews(Protocol):
    async def flag(self, probe_id: str, due_at: datetime) -> None: ...
    async def resolve(self, probe_id: str, reviewed_at: datetime, approved: bool) -> None: ...
    async def claim_overdue(self, now: datetime, lease: timedelta
                            ) -> list[tuple[str, datetime]]: ...
    async def mark_reported(self, probe_id: str, now: datetime) -> None: ...
    async def pending_count(self) -> int: ...
    async def status(self, probe_id: str) -> dict[str, object] | None: ...


def _status(row: tuple[object, ...] | None) -> dict[str, object] | None:
    if row is None:
        return None
    due, reviewed, approved, reported = (
        _ts(v) if isinstance(v, datetime) else v for v in row)
    return {"due_at": due, "reviewed_at": reviewed,
            "approved": None if approved is None else bool(approved),
            "overdue_reported_at": reported}


class ReviewStore:
    """SQLite (one host)."""

    def __init__(self, path: Path) -> None:
        self._db = connect(path, isolation_level=None)
        self._db.execute(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(exigent_reviews)")}
        if "claimed_until" not in have:  # a file from before claims
            self._db.execute("ALTER TABLE exigent_reviews ADD COLUMN claimed_until TEXT")

    def close(self) -> None:
        self._db.close()

    async def flag(self, probe_id: str, due_at: datetime) -> None:
        self._db.execute(
            "INSERT INTO exigent_reviews (probe_id, due_at) VALUES (?, ?) "
            "ON CONFLICT(probe_id) DO UPDATE SET due_at = excluded.due_at",
            (probe_id, _ts(due_at)))

    async def resolve(self, probe_id: str, reviewed_at: datetime, approved: bool) -> None:
        # A review may be read before its flag (another route's lag): keep it either way.
        self._db.execute(
            "INSERT INTO exigent_reviews (probe_id, reviewed_at, approved) VALUES (?, ?, ?) "
            "ON CONFLICT(probe_id) DO UPDATE SET reviewed_at = excluded.reviewed_at, "
            "approved = excluded.approved",
            (probe_id, _ts(reviewed_at), int(approved)))

    async def claim_overdue(self, now: datetime, lease: timedelta
                            ) -> list[tuple[str, datetime]]:
        """Flags past due, unreviewed, unreported and unclaimed (or their claim lapsed),
        now claimed until ``now + lease``; oldest first."""
        rows = self._db.execute(
            "UPDATE exigent_reviews SET claimed_until = ? WHERE due_at IS NOT NULL "
            "AND reviewed_at IS NULL AND overdue_reported_at IS NULL AND due_at <= ? "
            "AND (claimed_until IS NULL OR claimed_until <= ?) RETURNING probe_id, due_at",
            (_ts(now + lease), _ts(now), _ts(now))).fetchall()
        return sorted(((str(p), _parse(str(d))) for p, d in rows), key=lambda r: r[1])

    async def mark_reported(self, probe_id: str, now: datetime) -> None:
        self._db.execute("UPDATE exigent_reviews SET overdue_reported_at = ? WHERE probe_id = ?",
                         (_ts(now), probe_id))

    async def pending_count(self) -> int:
        row = self._db.execute("SELECT count(*) FROM exigent_reviews WHERE due_at IS NOT NULL "
                               "AND reviewed_at IS NULL").fetchone()
        return int(row[0])

    async def status(self, probe_id: str) -> dict[str, object] | None:
        return _status(self._db.execute(
            "SELECT due_at, reviewed_at, approved, overdue_reported_at FROM exigent_reviews "
            "WHERE probe_id = ?", (probe_id,)).fetchone())


class PgReviewStore:
    """PostgreSQL (migration 0003, the intake role): the same flags, shared by every
    instance. ``claim_overdue`` locks what it claims and skips rows another instance is
    claiming (``FOR UPDATE SKIP LOCKED``): two watches never claim the same flag."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def flag(self, probe_id: str, due_at: datetime) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO exigent_reviews (probe_id, due_at) VALUES (%s, %s) "
                "ON CONFLICT (probe_id) DO UPDATE SET due_at = excluded.due_at",
                (probe_id, due_at))

    async def resolve(self, probe_id: str, reviewed_at: datetime, approved: bool) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO exigent_reviews (probe_id, reviewed_at, approved) "
                "VALUES (%s, %s, %s) ON CONFLICT (probe_id) DO UPDATE SET "
                "reviewed_at = excluded.reviewed_at, approved = excluded.approved",
                (probe_id, reviewed_at, approved))

    async def claim_overdue(self, now: datetime, lease: timedelta
                            ) -> list[tuple[str, datetime]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "WITH due AS (SELECT probe_id FROM exigent_reviews WHERE due_at <= %(now)s "
                "AND reviewed_at IS NULL AND overdue_reported_at IS NULL "
                "AND (claimed_until IS NULL OR claimed_until <= %(now)s) "
                "FOR UPDATE SKIP LOCKED) "
                "UPDATE exigent_reviews r SET claimed_until = %(until)s FROM due "
                "WHERE r.probe_id = due.probe_id RETURNING r.probe_id, r.due_at",
                {"now": now, "until": now + lease})
            rows = await cur.fetchall()
        return sorted(((str(p), d.astimezone(UTC)) for p, d in rows), key=lambda r: r[1])

    async def mark_reported(self, probe_id: str, now: datetime) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE exigent_reviews SET overdue_reported_at = %s WHERE probe_id = %s",
                (now, probe_id))

    async def pending_count(self) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM exigent_reviews "
                                     "WHERE due_at IS NOT NULL AND reviewed_at IS NULL")
            row = await cur.fetchone()
        return int(row[0]) if row is not None else 0

    async def status(self, probe_id: str) -> dict[str, object] | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT due_at, reviewed_at, approved, overdue_reported_at "
                "FROM exigent_reviews WHERE probe_id = %s", (probe_id,))
            return _status(await cur.fetchone())

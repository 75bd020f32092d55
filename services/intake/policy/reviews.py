"""Durable exigent-review flags: a small SQLite file in the state dir.

A flag is raised by an exigent clearance and lowered by a supervisor's review; an
overdue flag is reported once (``overdue_reported_at``) after its event is on the bus.
The file survives restarts; the review route's committed offsets keep it in step with
the decisions topic (at-least-once: raising or lowering twice changes nothing)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exigent_reviews (
    probe_id TEXT PRIMARY KEY,
    due_at TEXT,
    reviewed_at TEXT,
    approved INTEGER,
    overdue_reported_at TEXT
)
"""


def _ts(value: datetime) -> str:
    # Fixed-width UTC text sorts like the instant it names.
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class ReviewStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def flag(self, probe_id: str, due_at: datetime) -> None:
        self._db.execute(
            "INSERT INTO exigent_reviews (probe_id, due_at) VALUES (?, ?) "
            "ON CONFLICT(probe_id) DO UPDATE SET due_at = excluded.due_at",
            (probe_id, _ts(due_at)))

    def resolve(self, probe_id: str, reviewed_at: datetime, approved: bool) -> None:
        # A review may be read before its flag (another route's lag): keep it either way.
        self._db.execute(
            "INSERT INTO exigent_reviews (probe_id, reviewed_at, approved) VALUES (?, ?, ?) "
            "ON CONFLICT(probe_id) DO UPDATE SET reviewed_at = excluded.reviewed_at, "
            "approved = excluded.approved",
            (probe_id, _ts(reviewed_at), int(approved)))

    def overdue(self, now: datetime) -> list[tuple[str, datetime]]:
        rows = self._db.execute(
            "SELECT probe_id, due_at FROM exigent_reviews WHERE due_at IS NOT NULL "
            "AND reviewed_at IS NULL AND overdue_reported_at IS NULL AND due_at <= ? "
            "ORDER BY due_at", (_ts(now),)).fetchall()
        return [(str(p), _parse(str(d))) for p, d in rows]

    def mark_reported(self, probe_id: str, now: datetime) -> None:
        self._db.execute("UPDATE exigent_reviews SET overdue_reported_at = ? WHERE probe_id = ?",
                         (_ts(now), probe_id))

    def pending_count(self) -> int:
        row = self._db.execute("SELECT count(*) FROM exigent_reviews WHERE due_at IS NOT NULL "
                               "AND reviewed_at IS NULL").fetchone()
        return int(row[0])

    def status(self, probe_id: str) -> dict[str, object] | None:
        row = self._db.execute(
            "SELECT due_at, reviewed_at, approved, overdue_reported_at FROM exigent_reviews "
            "WHERE probe_id = ?", (probe_id,)).fetchone()
        if row is None:
            return None
        return {"due_at": row[0], "reviewed_at": row[1],
                "approved": None if row[2] is None else bool(row[2]),
                "overdue_reported_at": row[3]}

"""Request outcomes: the one event each request id ended in (REQ: exactly one outcome).

A redelivered or resubmitted request id gets the recorded event back instead of a second
probe. Stored in the intake's SQLite file, which holds no image bytes."""

from __future__ import annotations

import sqlite3

from schemas.events import EVENTS_BY_TYPE, Event, ProbeRejected, ProbeSubmitted

_SCHEMA = """
CREATE TABLE IF NOT EXISTS request_outcomes (
  request_id TEXT PRIMARY KEY,
  probe_id TEXT NOT NULL,
  event_type TEXT NOT NULL,
  event_json TEXT NOT NULL
);
"""


class OutcomeLog:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.executescript(_SCHEMA)

    def get(self, request_id: str) -> ProbeSubmitted | ProbeRejected | None:
        row = self.conn.execute(
            "SELECT event_type, event_json FROM request_outcomes WHERE request_id=?",
            (request_id,)).fetchone()
        if row is None:
            return None
        event = EVENTS_BY_TYPE[row[0]].model_validate_json(row[1])
        assert isinstance(event, (ProbeSubmitted, ProbeRejected))
        return event

    def record(self, request_id: str, event: Event) -> None:
        # First outcome wins: a concurrent duplicate cannot replace it.
        self.conn.execute(
            "INSERT OR IGNORE INTO request_outcomes VALUES (?,?,?,?)",
            (request_id, getattr(event, "probe_id", ""), event.TYPE,
             event.model_dump_json()))

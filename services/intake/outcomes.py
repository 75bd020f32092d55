"""Request outcomes: the one event each request id ended in (REQ: exactly one outcome),
bound to a digest of the request's content as an idempotency key is bound to its request.

The same id with the same content gets the recorded event back (a redelivery, a client
retry) instead of a second probe; the same id with other content is refused
(``request_id_reused``), and that refusal is kept per content so a redelivery of it gets
the same event. Stored in the intake's SQLite file, which holds no image bytes (digests
only)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass

from schemas.events import EVENTS_BY_TYPE, Event, ProbeRejected, ProbeRequested, ProbeSubmitted

_SCHEMA = """
CREATE TABLE IF NOT EXISTS request_outcomes (
  request_id TEXT PRIMARY KEY,
  probe_id TEXT NOT NULL,
  event_type TEXT NOT NULL,
  event_json TEXT NOT NULL,
  content_sha256 TEXT,
  record_sha256 TEXT
);
CREATE TABLE IF NOT EXISTS request_reuses (
  request_id TEXT NOT NULL,
  content_sha256 TEXT NOT NULL,
  event_json TEXT NOT NULL,
  PRIMARY KEY (request_id, content_sha256)
);
"""
# Files written before the binding have the table without these columns: their rows keep
# NULL digests (see ``Recorded.content_sha256``).
_ADDED_COLUMNS = ("content_sha256", "record_sha256")

# What a request is, for binding its id: every field but the encrypted image (its ephemeral
# key, nonce and ciphertext are new on each encryption of the same photo) and requested_at
# (the sender's clock, new on each retry). The image counts by the digest of its plaintext.
CONTENT_FIELDS = frozenset(ProbeRequested.model_fields) - {"image", "requested_at"}


def _canonical(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_digest(request: ProbeRequested | ProbeSubmitted, image_digest: str) -> str:
    """SHA-256 of the request's fields (canonical JSON) and of its image.

    ``image_digest`` is ``sha256:<hex>`` of the decrypted image, or
    ``ciphertext-sha256:<hex>`` when it does not decrypt. A ProbeSubmitted carries every
    content field and the received image's digest, so it yields its request's digest."""
    doc = request.model_dump(mode="json", include=set(CONTENT_FIELDS))
    doc["image"] = image_digest
    return hashlib.sha256(_canonical(doc)).hexdigest()


def record_digest(request: ProbeRequested) -> str:
    """SHA-256 of the content fields and the encrypted image as sent: equal digests mean
    the same ciphertext under the same ephemeral key and nonce, hence the same image, so a
    redelivered record is recognized without decrypting it."""
    doc = request.model_dump(mode="json", include={*CONTENT_FIELDS, "image"})
    return hashlib.sha256(_canonical(doc)).hexdigest()


def raw_digest(value: bytes | None) -> str:
    """The content of a record that is not a valid request: its bytes."""
    return hashlib.sha256(b"undecodable\n" + (value or b"")).hexdigest()


@dataclass(frozen=True)
class Recorded:
    event: ProbeSubmitted | ProbeRejected
    # None on rows recorded before the binding existed.
    content_sha256: str | None
    record_sha256: str | None


def _outcome(event_type: str, event_json: str) -> ProbeSubmitted | ProbeRejected:
    event = EVENTS_BY_TYPE[event_type].model_validate_json(event_json)
    assert isinstance(event, (ProbeSubmitted, ProbeRejected))
    return event


class OutcomeLog:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.executescript(_SCHEMA)
        have = {row[1] for row in conn.execute("PRAGMA table_info(request_outcomes)")}
        for column in _ADDED_COLUMNS:
            if column not in have:
                conn.execute(f"ALTER TABLE request_outcomes ADD COLUMN {column} TEXT")

    def find(self, request_id: str) -> Recorded | None:
        row = self.conn.execute(
            "SELECT event_type, event_json, content_sha256, record_sha256"
            " FROM request_outcomes WHERE request_id=?", (request_id,)).fetchone()
        if row is None:
            return None
        return Recorded(_outcome(row[0], row[1]), row[2], row[3])

    def get(self, request_id: str) -> ProbeSubmitted | ProbeRejected | None:
        found = self.find(request_id)
        return found.event if found is not None else None

    def record(self, request_id: str, event: Event, *, content_sha256: str | None = None,
               record_sha256: str | None = None) -> None:
        # First outcome wins: a concurrent duplicate cannot replace it.
        self.conn.execute(
            "INSERT OR IGNORE INTO request_outcomes VALUES (?,?,?,?,?,?)",
            (request_id, getattr(event, "probe_id", ""), event.TYPE,
             event.model_dump_json(), content_sha256, record_sha256))

    def bind(self, request_id: str, content_sha256: str, record_sha256: str | None) -> None:
        """Give a row recorded before the binding existed the digests it was matched by."""
        self.conn.execute(
            "UPDATE request_outcomes SET content_sha256=?, record_sha256=?"
            " WHERE request_id=? AND content_sha256 IS NULL",
            (content_sha256, record_sha256, request_id))

    def reuse(self, request_id: str, content_sha256: str) -> ProbeRejected | None:
        row = self.conn.execute(
            "SELECT event_json FROM request_reuses WHERE request_id=? AND content_sha256=?",
            (request_id, content_sha256)).fetchone()
        return None if row is None else ProbeRejected.model_validate_json(row[0])

    def record_reuse(self, request_id: str, content_sha256: str,
                     event: ProbeRejected) -> None:
        self.conn.execute("INSERT OR IGNORE INTO request_reuses VALUES (?,?,?)",
                          (request_id, content_sha256, event.model_dump_json()))

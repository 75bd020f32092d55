"""Request outcomes: the one event each request id ended in (REQ: exactly one outcome),
bound to a digest of the request's content as an idempotency key is bound to its request.

The same id with the same content gets the recorded event back (a redelivery, a client
retry) instead of a second probe; the same id with other content is refused
(``request_id_reused``), and that refusal is kept per content so a redelivery of it gets
the same event. Behind the ``Outcomes`` port: ``OutcomeLog`` in the intake's SQLite file
(one host), ``PgOutcomeLog`` in the shared PostgreSQL database (many instances, one
outcome per request id across all). Neither holds image bytes (digests only)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from schemas.events import EVENTS_BY_TYPE, Event, ProbeRejected, ProbeRequested, ProbeSubmitted
from services.kit.cost import step

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

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


class Outcomes(Protocol):
    """The port: the first outcome recorded for a request id wins, everywhere."""

    async def find(self, request_id: str) -> Recorded | None: ...
    async def get(self, request_id: str) -> ProbeSubmitted | ProbeRejected | None: ...
    async def record(self, request_id: str, event: Event, *, content_sha256: str | None = None,
                     record_sha256: str | None = None) -> None: ...
    async def bind(self, request_id: str, content_sha256: str,
                   record_sha256: str | None) -> None: ...
    async def reuse(self, request_id: str, content_sha256: str) -> ProbeRejected | None: ...
    async def record_reuse(self, request_id: str, content_sha256: str,
                           event: ProbeRejected) -> None: ...


def _recorded(row: tuple[str, str, str | None, str | None] | None) -> Recorded | None:
    return None if row is None else Recorded(_outcome(row[0], row[1]), row[2], row[3])


def _row(event: Event) -> tuple[str, str, str]:
    return getattr(event, "probe_id", ""), event.TYPE, event.model_dump_json()


class OutcomeLog:
    """SQLite, in the vault index's file (one host)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        conn.executescript(_SCHEMA)
        have = {row[1] for row in conn.execute("PRAGMA table_info(request_outcomes)")}
        for column in _ADDED_COLUMNS:
            if column not in have:
                conn.execute(f"ALTER TABLE request_outcomes ADD COLUMN {column} TEXT")

    async def find(self, request_id: str) -> Recorded | None:
        with step("state"):
            row = self.conn.execute(
                "SELECT event_type, event_json, content_sha256, record_sha256"
                " FROM request_outcomes WHERE request_id=?", (request_id,)).fetchone()
            return _recorded(row)

    async def get(self, request_id: str) -> ProbeSubmitted | ProbeRejected | None:
        found = await self.find(request_id)
        return found.event if found is not None else None

    async def record(self, request_id: str, event: Event, *, content_sha256: str | None = None,
                     record_sha256: str | None = None) -> None:
        # First outcome wins: a concurrent duplicate cannot replace it.
        with step("state"):
            self.conn.execute("INSERT OR IGNORE INTO request_outcomes VALUES (?,?,?,?,?,?)",
                              (request_id, *_row(event), content_sha256, record_sha256))

    async def bind(self, request_id: str, content_sha256: str,
                   record_sha256: str | None) -> None:
        """Give a row recorded before the binding existed the digests it was matched by."""
        self.conn.execute(
            "UPDATE request_outcomes SET content_sha256=?, record_sha256=?"
            " WHERE request_id=? AND content_sha256 IS NULL",
            (content_sha256, record_sha256, request_id))

    async def reuse(self, request_id: str, content_sha256: str) -> ProbeRejected | None:
        row = self.conn.execute(
            "SELECT event_json FROM request_reuses WHERE request_id=? AND content_sha256=?",
            (request_id, content_sha256)).fetchone()
        return None if row is None else ProbeRejected.model_validate_json(row[0])

    async def record_reuse(self, request_id: str, content_sha256: str,
                           event: ProbeRejected) -> None:
        self.conn.execute("INSERT OR IGNORE INTO request_reuses VALUES (?,?,?)",
                          (request_id, content_sha256, event.model_dump_json()))


class PgOutcomeLog:
    """PostgreSQL (tables of migration 0002, the intake role): the same statements, each
    its own transaction; ``ON CONFLICT DO NOTHING`` keeps the first outcome when two
    instances record the same request id at once."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def find(self, request_id: str) -> Recorded | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT event_type, event_json, content_sha256, record_sha256"
                " FROM request_outcomes WHERE request_id = %s", (request_id,))
            return _recorded(await cur.fetchone())

    async def get(self, request_id: str) -> ProbeSubmitted | ProbeRejected | None:
        found = await self.find(request_id)
        return found.event if found is not None else None

    async def record(self, request_id: str, event: Event, *, content_sha256: str | None = None,
                     record_sha256: str | None = None) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO request_outcomes VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (request_id) DO NOTHING",
                (request_id, *_row(event), content_sha256, record_sha256))

    async def bind(self, request_id: str, content_sha256: str,
                   record_sha256: str | None) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE request_outcomes SET content_sha256 = %s, record_sha256 = %s"
                " WHERE request_id = %s AND content_sha256 IS NULL",
                (content_sha256, record_sha256, request_id))

    async def reuse(self, request_id: str, content_sha256: str) -> ProbeRejected | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT event_json FROM request_reuses"
                " WHERE request_id = %s AND content_sha256 = %s", (request_id, content_sha256))
            row = await cur.fetchone()
        return None if row is None else ProbeRejected.model_validate_json(row[0])

    async def record_reuse(self, request_id: str, content_sha256: str,
                           event: ProbeRejected) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO request_reuses VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                (request_id, content_sha256, event.model_dump_json()))

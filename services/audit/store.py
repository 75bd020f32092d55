"""Append-only audit store: a segment file of leaves plus a SQLite index.

Each leaf is the canonical JSON of one record (topic, partition, offset, CloudEvent
attributes and data), with anything that could hold image bytes replaced by its digest.
The SQLite row is the commit point: on open, segment bytes past the last indexed leaf
(a crash between the two writes) are cut off. (topic, partition, offset) is unique, so
a redelivered record is recognized and not appended twice."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS leaves (
  idx INTEGER PRIMARY KEY,
  topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL,
  ce_id TEXT, ce_type TEXT, subject TEXT, time TEXT,
  seg_pos INTEGER NOT NULL, seg_len INTEGER NOT NULL,
  UNIQUE (topic, partition, "offset")
);
CREATE INDEX IF NOT EXISTS leaves_subject ON leaves(subject);
CREATE INDEX IF NOT EXISTS leaves_type ON leaves(ce_type);
"""


@dataclass(frozen=True)
class LeafMeta:
    topic: str
    partition: int
    offset: int
    ce_id: str | None
    ce_type: str | None
    subject: str | None
    time: str | None


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class AuditStore:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._db = sqlite3.connect(directory / "index.sqlite3", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._segment_path = directory / "leaves.seg"
        row = self._db.execute(
            "SELECT seg_pos + seg_len FROM leaves ORDER BY idx DESC LIMIT 1"
        ).fetchone()
        committed = int(row[0]) if row else 0
        self._segment = open(self._segment_path, "ab+")  # noqa: SIM115 - lives with the store
        if self._segment.seek(0, os.SEEK_END) > committed:
            self._segment.truncate(committed)  # torn write after the last committed leaf
        self._pos = committed
        self._size = self._count()
        self._in_tx = False

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM leaves").fetchone()[0])

    @property
    def size(self) -> int:
        return self._size

    def append(self, meta: LeafMeta, leaf: bytes) -> int | None:
        """Append one leaf; returns its index, or None when this record is already in."""
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True
        try:
            self._db.execute(
                'INSERT INTO leaves (idx, topic, partition, "offset", ce_id, ce_type, subject,'
                " time, seg_pos, seg_len) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (self._size, meta.topic, meta.partition, meta.offset, meta.ce_id, meta.ce_type,
                 meta.subject, meta.time, self._pos, len(leaf)),
            )
        except sqlite3.IntegrityError:
            return None
        self._segment.write(leaf)
        self._pos += len(leaf)
        self._size += 1
        return self._size - 1

    def commit(self) -> None:
        """Durable before the consumer commits: fsync the segment, then the index."""
        if not self._in_tx:
            return
        self._segment.flush()
        os.fsync(self._segment.fileno())
        self._db.execute("COMMIT")
        self._in_tx = False

    def leaves(self, start: int = 0, end: int | None = None) -> list[bytes]:
        rows = self._db.execute(
            "SELECT seg_pos, seg_len FROM leaves WHERE idx >= ? AND idx < ? ORDER BY idx",
            (start, end if end is not None else self._size),
        ).fetchall()
        out = []
        with open(self._segment_path, "rb") as f:
            for pos, length in rows:
                f.seek(pos)
                out.append(f.read(length))
        return out

    def rows(self, subject: str | None = None) -> list[LeafMeta]:
        query = 'SELECT topic, partition, "offset", ce_id, ce_type, subject, time FROM leaves'
        args: tuple[Any, ...] = ()
        if subject is not None:
            query += " WHERE subject = ?"
            args = (subject,)
        return [LeafMeta(*r) for r in self._db.execute(query + " ORDER BY idx", args)]

    def close(self) -> None:
        self.commit()
        self._segment.close()
        self._db.close()


def value_digest(value: bytes | None) -> str:
    return hashlib.sha256(value or b"").hexdigest()

"""Append-only audit store: a segment file of leaves plus a SQLite index.

Each leaf is the canonical JSON of one record (its index in the log, topic, partition,
offset, CloudEvent attributes and data), with anything that could hold image bytes
replaced by its digest. The SQLite row is the commit point: on open, segment bytes past
the last indexed leaf (a crash between the two writes) are cut off. (topic, partition,
offset) is unique, so a redelivered record is recognized and not appended twice.

The index keeps each leaf's RFC 9162 hash and the tree's right edge (``Frontier``), so
an append costs O(log n) hashes and signed checkpoints never recompute the tree.

``AuditLog`` is the port the service, the invariants and the auditors' commands use:
``AuditStore`` here (one host), ``pg_store.PgAuditStore`` in the shared PostgreSQL
database, where the leaf bytes live in their row. ``open_store`` opens either."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from services.audit.merkle import Frontier, leaf_hash
from services.kit.sqlite import connect, private_path

SCHEMA = """
CREATE TABLE IF NOT EXISTS leaves (
  idx INTEGER PRIMARY KEY,
  topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL,
  ce_id TEXT, ce_type TEXT, subject TEXT, time TEXT,
  seg_pos INTEGER NOT NULL, seg_len INTEGER NOT NULL, leaf_hash BLOB NOT NULL,
  UNIQUE (topic, partition, "offset")
);
CREATE INDEX IF NOT EXISTS leaves_subject ON leaves(subject);
CREATE INDEX IF NOT EXISTS leaves_ce_id ON leaves(ce_id);  -- proofs look events up by id
CREATE TABLE IF NOT EXISTS tree (
  id INTEGER PRIMARY KEY CHECK (id = 0), size INTEGER NOT NULL, frontier BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
  seq INTEGER PRIMARY KEY, tree_size INTEGER NOT NULL, root BLOB NOT NULL,
  note TEXT NOT NULL, created_at TEXT NOT NULL
);
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


@dataclass(frozen=True)
class StoredCheckpoint:
    seq: int
    tree_size: int
    root: bytes
    note: str
    created_at: str

    @classmethod
    def of(cls, row: tuple[Any, ...] | Any) -> StoredCheckpoint:
        """From a (seq, tree_size, root, note, created_at) row of either backend."""
        s, n, r, t, c = row
        return cls(int(s), int(n), bytes(r), str(t), str(c))


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class PgLocation:
    """A store in PostgreSQL: the role's conninfo (no password in it) and its password."""

    conninfo: str
    password: str | None = field(default=None, repr=False)


# An index row as ``iter_leaves`` yields it: (idx, byte position, length, leaf hash).
IndexRow = tuple[Any, ...]


class AuditLog(Protocol):
    """The port. SQL given to ``execute``/``query`` (the invariants' own tables) is written
    once for both backends: ``?`` placeholders, ``ON CONFLICT (key)``, no SQLite-only
    functions."""

    readonly: bool
    frontier: Frontier

    @property
    def size(self) -> int: ...
    @property
    def in_tx(self) -> bool: ...
    def append(self, meta: LeafMeta, body: dict[str, Any]) -> int | None: ...
    def savepoint(self) -> AbstractContextManager[None]: ...
    def snapshot(self) -> AbstractContextManager[None]: ...
    def prepare(self, schema: str) -> None: ...
    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> None: ...
    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]: ...
    def commit(self) -> None: ...
    def add_checkpoint(self, tree_size: int, root: bytes, note: str,
                       created_at: str) -> None: ...
    def checkpoints(self) -> list[StoredCheckpoint]: ...
    def last_checkpoint(self) -> StoredCheckpoint | None: ...
    def leaves(self, start: int = 0, end: int | None = None) -> list[bytes]: ...
    def iter_leaves(self, start: int = 0, end: int | None = None
                    ) -> Iterator[tuple[IndexRow, bytes]]: ...
    def leaf_hashes(self, end: int) -> list[bytes]: ...
    def index_of(self, ce_id: str) -> int | None: ...
    def count_since(self, start: int, other_than_topic: str) -> int: ...
    def rows(self, subject: str | None = None) -> list[LeafMeta]: ...
    def close(self) -> None: ...


def open_store(where: Path | PgLocation, *, readonly: bool = False) -> AuditLog:
    """The store at a directory (SQLite and its segment) or in PostgreSQL."""
    if isinstance(where, Path):
        return AuditStore(where, readonly=readonly)
    from services.audit.pg_store import PgAuditStore

    return PgAuditStore.connect(where, readonly=readonly)


class AuditStore:
    def __init__(self, directory: Path, *, readonly: bool = False) -> None:
        self.directory = directory
        self.readonly = readonly
        self._segment_path = directory / "leaves.seg"
        index = directory / "index.sqlite3"
        if readonly:
            # Auditors read a live store: never truncate, never write.
            if not index.exists():
                raise FileNotFoundError(f"no audit store at {directory}")
            self._db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, isolation_level=None)
            if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tree'"
                                    ).fetchone():
                self._db.close()
                raise FileNotFoundError(f"audit store at {directory} is not initialized yet")
        else:
            self._db = connect(index, isolation_level=None)
            self._db.executescript(SCHEMA)
        row = self._db.execute(
            "SELECT seg_pos + seg_len FROM leaves ORDER BY idx DESC LIMIT 1"
        ).fetchone()
        committed = int(row[0]) if row else 0
        self._pos = committed
        self._size = self._count()
        self._in_tx = False
        self._segment = None
        if not readonly:
            self._segment = open(private_path(self._segment_path), "ab+")  # noqa: SIM115 - lives with the store
            if self._segment.seek(0, os.SEEK_END) > committed:
                self._segment.truncate(committed)  # torn write after the last committed leaf
        self.frontier = self._load_frontier()

    def _count(self) -> int:
        row = self._db.execute("SELECT MAX(idx) FROM leaves").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def _load_frontier(self) -> Frontier:
        row = self._db.execute("SELECT size, frontier FROM tree WHERE id = 0").fetchone()
        if row is not None and int(row[0]) == self._size:
            try:
                return Frontier.from_bytes(int(row[0]), bytes(row[1]))
            except ValueError:
                pass  # damaged: rebuild below (verify judges the leaves, not this row)
        # Missing or stale (an older store): rebuild once from the stored leaf hashes.
        frontier = Frontier()
        for (h,) in self._db.execute("SELECT leaf_hash FROM leaves ORDER BY idx"):
            frontier.append(bytes(h))
        return frontier

    @property
    def size(self) -> int:
        return self._size

    @property
    def in_tx(self) -> bool:
        return self._in_tx

    def append(self, meta: LeafMeta, body: dict[str, Any]) -> int | None:
        """Append one leaf; returns its index, or None when this record is already in."""
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True
        idx = self._size
        # The leaf names its own index: a deleted or reordered leaf shows at once.
        leaf = canonical({**body, "index": idx})
        lh = leaf_hash(leaf)
        try:
            self._db.execute(
                'INSERT INTO leaves (idx, topic, partition, "offset", ce_id, ce_type, subject,'
                " time, seg_pos, seg_len, leaf_hash) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (idx, meta.topic, meta.partition, meta.offset, meta.ce_id, meta.ce_type,
                 meta.subject, meta.time, self._pos, len(leaf), lh),
            )
        except sqlite3.IntegrityError:
            return None
        assert self._segment is not None
        self._segment.write(leaf)
        self._pos += len(leaf)
        self._size += 1
        self.frontier.append(lh)
        return idx

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """One record's effects (its leaf and its invariant state) happen all or not at
        all: a handler that fails halfway is retried from a clean state."""
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True
        self._db.execute("SAVEPOINT record")
        state = (self._pos, self._size, self.frontier.copy())
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK TO record")
            self._db.execute("RELEASE record")
            self._pos, self._size, self.frontier = state
            if self._segment is not None:
                self._segment.flush()
                self._segment.truncate(self._pos)
            raise
        self._db.execute("RELEASE record")

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """A consistent view of a live store for readers (leaves and checkpoints together)."""
        self._db.execute("BEGIN")
        try:
            yield
        finally:
            self._db.execute("COMMIT")

    def prepare(self, schema: str) -> None:
        """Make the invariants' tables (PostgreSQL has them from its migration)."""
        for stmt in schema.split(";"):
            if stmt.strip():
                self.execute(stmt)
        self.commit()

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        """Run a statement inside the current batch's transaction (invariant state)."""
        if not self._in_tx and not self.readonly:
            self._db.execute("BEGIN")
            self._in_tx = True
        self._db.execute(sql, args)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        return self._db.execute(sql, args).fetchall()

    def commit(self) -> None:
        """Durable before the consumer commits: fsync the segment, then the index."""
        if not self._in_tx:
            return
        assert self._segment is not None
        self._segment.flush()
        os.fsync(self._segment.fileno())
        self._db.execute(
            "INSERT INTO tree (id, size, frontier) VALUES (0, ?, ?) ON CONFLICT(id) DO UPDATE"
            " SET size = excluded.size, frontier = excluded.frontier",
            (self.frontier.size, self.frontier.to_bytes()),
        )
        self._db.execute("COMMIT")
        self._in_tx = False

    # --- checkpoints ----------------------------------------------------------------

    def add_checkpoint(self, tree_size: int, root: bytes, note: str, created_at: str) -> None:
        if self._in_tx:
            raise RuntimeError("commit the batch before writing a checkpoint")
        self._db.execute(
            "INSERT INTO checkpoints (tree_size, root, note, created_at) VALUES (?,?,?,?)",
            (tree_size, root, note, created_at),
        )

    def checkpoints(self) -> list[StoredCheckpoint]:
        return [StoredCheckpoint.of(row) for row in self._db.execute(
            "SELECT seq, tree_size, root, note, created_at FROM checkpoints ORDER BY seq")]

    def last_checkpoint(self) -> StoredCheckpoint | None:
        cps = self._db.execute(
            "SELECT seq, tree_size, root, note, created_at FROM checkpoints"
            " ORDER BY seq DESC LIMIT 1").fetchone()
        return None if cps is None else StoredCheckpoint.of(cps)

    # --- reading ----------------------------------------------------------------------

    def leaves(self, start: int = 0, end: int | None = None) -> list[bytes]:
        return [leaf for _, leaf in self.iter_leaves(start, end)]

    def iter_leaves(self, start: int = 0, end: int | None = None
                    ) -> Iterator[tuple[IndexRow, bytes]]:
        """(index row, leaf bytes) in index order; the row is (idx, seg_pos, seg_len,
        leaf_hash). Reads the segment sequentially in large blocks."""
        cur = self._db.execute(
            "SELECT idx, seg_pos, seg_len, leaf_hash FROM leaves WHERE idx >= ? AND idx < ?"
            " ORDER BY idx", (start, end if end is not None else 1 << 62),
        )
        # A missing segment reads as empty: every leaf then shows as short, not a crash.
        source = open(self._segment_path, "rb") if self._segment_path.exists() \
            else io.BytesIO()  # noqa: SIM115
        with source as f:
            block_start, block = 0, b""
            for row in cur:
                pos, length = int(row[1]), int(row[2])
                if pos < block_start or pos + length > block_start + len(block):
                    f.seek(pos)
                    block_start, block = pos, f.read(max(length, 1 << 20))
                rel = pos - block_start
                yield row, block[rel:rel + length]

    def leaf_hashes(self, end: int) -> list[bytes]:
        """The hashes of leaves [0, end), for proofs."""
        return [bytes(h) for (h,) in self._db.execute(
            "SELECT leaf_hash FROM leaves WHERE idx < ? ORDER BY idx", (end,))]

    def index_of(self, ce_id: str) -> int | None:
        """The first leaf of an event on its own topic (not a DLQ copy)."""
        row = self._db.execute(
            "SELECT idx FROM leaves WHERE ce_id = ? AND topic NOT LIKE 'frs.dlq.%'"
            " ORDER BY idx LIMIT 1", (ce_id,)).fetchone()
        return None if row is None else int(row[0])

    def count_since(self, start: int, other_than_topic: str) -> int:
        """Leaves from ``start`` on, those of one topic left out."""
        row = self._db.execute("SELECT COUNT(*) FROM leaves WHERE idx >= ? AND topic != ?",
                               (start, other_than_topic)).fetchone()
        return int(row[0])

    def rows(self, subject: str | None = None) -> list[LeafMeta]:
        query = 'SELECT topic, partition, "offset", ce_id, ce_type, subject, time FROM leaves'
        args: tuple[Any, ...] = ()
        if subject is not None:
            query += " WHERE subject = ?"
            args = (subject,)
        return [LeafMeta(*r) for r in self._db.execute(query + " ORDER BY idx", args)]

    def close(self) -> None:
        if not self.readonly:
            self.commit()
        if self._segment is not None:
            self._segment.close()
        self._db.close()


def value_digest(value: bytes | None) -> str:
    return hashlib.sha256(value or b"").hexdigest()

"""The audit log in the shared PostgreSQL database (migration 0008, the audit role): the
``AuditLog`` port of store.py, with each leaf's bytes in its row instead of a segment file.

A batch is one transaction: its first statement locks the one ``audit_tree`` row, so
appenders are serialized (a second instance waits, then reloads the head it finds); the
batch's leaves go in by one ``COPY`` at commit, with the new right edge and the
invariants' state. That commit is the commit point: a crash before it leaves nothing, so
there is no torn tail to cut. (topic, partition, offset) is unique: a redelivered record
is found and not appended twice (checked at append time, so that neither its index nor
its invariants are taken; a new offset above a partition's highest is known new without
asking the server).

Many audit instances (migration 0010, sequencer.py): each ingests into ``audit_queue``;
the one holding the sequencer lease takes queued entries (``take_queued``) and appends
them (``append_leaf``) in batches. With ``fence`` set to its epoch, every transaction of
this store first reads the lease row ``FOR SHARE``: a takeover (which updates that row)
waits for the batch in flight, and a stale leader's next batch or checkpoint fails with
``Fenced``, so two leaders never both write.

The store is synchronous like its SQLite twin: the audit service's one route and its
timer job use it between awaits, and the auditors' commands run it in a thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql

from services.audit.merkle import Frontier, leaf_hash
from services.audit.store import IndexRow, LeafMeta, PgLocation, StoredCheckpoint, canonical
from services.kit.migrate import latest
from services.kit.state import SchemaMismatch

_COLUMNS = 'idx, topic, partition, "offset", ce_id, ce_type, subject, time, leaf, leaf_hash'
_COLUMN_TYPES = ["int8", "text", "int4", "int8", "text", "text", "text", "text", "bytea", "bytea"]
# Locks the head for the batch (made on first use: the table may have been emptied).
_LOCK_HEAD = ("INSERT INTO audit_tree (id, size, frontier) VALUES (0, 0, '') ON CONFLICT (id)"
              " DO UPDATE SET id = excluded.id RETURNING size, frontier")
_CHECKPOINT = "SELECT seq, tree_size, root, note, created_at FROM audit_checkpoints"

_FENCE = "SELECT epoch FROM audit_sequencer_lease WHERE id = 0 FOR SHARE"
# Queued entries in arrival order, taken out of the queue in the sequencer's transaction;
# one already sequenced (ingested twice: by CloudEvents id, or a redelivery after its
# entry was taken) is flagged, to be dropped.
_TAKE = """WITH taken AS (
  DELETE FROM audit_queue WHERE seq IN (SELECT seq FROM audit_queue ORDER BY seq LIMIT %s)
  RETURNING seq, topic, partition, "offset", ce_id, ce_type, subject, time, leaf, cut, record)
SELECT t.*, EXISTS (SELECT 1 FROM audit_leaves l WHERE l.topic = t.topic
                    AND l.partition = t.partition AND l."offset" = t."offset")
  OR (t.ce_id IS NOT NULL AND EXISTS (
    SELECT 1 FROM (SELECT topic FROM audit_leaves WHERE ce_id = t.ce_id OFFSET 0) l
    WHERE l.topic = t.topic))
FROM taken t ORDER BY t.seq"""
# (OFFSET 0 keeps the topic out of the index condition: by the ce_id index alone, a
# look-up costs one row, not a scan of the topic's leaves as the planner may choose.)
# A session idle inside a transaction this long is ended by the server: a writer stopped
# mid-batch (SIGSTOP) does not hold the tree's lock, or the lease's, for ever.
IDLE_IN_TX_S = 5

Key = tuple[str, int, int]


class Fenced(RuntimeError):
    """The sequencer lease's epoch is no longer ours: another instance leads."""


@dataclass(frozen=True)
class Queued:
    """An ingested record waiting for its index: its leaf's canonical JSON without the
    index (which goes in at byte ``cut``), and what the invariants read (``record``,
    only for records they concern)."""

    meta: LeafMeta
    template: bytes
    cut: int
    record: bytes | None
    sequenced: bool = False  # already a leaf: dropped

    def leaf(self, idx: int) -> bytes:
        return self.template[:self.cut] + str(idx).encode() + self.template[self.cut:]


def _dialect(sql: str) -> str:
    """The invariants' statements (``?`` placeholders) in psycopg's style."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgAuditStore:
    def __init__(self, conn: psycopg.Connection[Any], *, readonly: bool = False) -> None:
        # A writer's batch is one transaction (autocommit off); a reader runs each read
        # on its own unless in ``snapshot``.
        self._conn = conn
        self.readonly = readonly
        self._in_tx = False
        self._savepoint = False  # a record's savepoint, released with the next one's
        self._pending: list[tuple[Any, ...]] = []
        self._flushed = 0  # pending rows already sent (a read of leaves mid-batch)
        self._keys: set[Key] = set()
        self._high: dict[tuple[str, int], int] = {}  # highest offset stored, per partition
        self._sql: dict[str, str] = {}
        # The sequencer's epoch: when set, every transaction checks it first.
        self.fence: int | None = None
        self.location: PgLocation | None = None  # where connect() found it (reconnect)
        self._size, self.frontier = self._head()

    def reconnect(self) -> None:
        """A new session after the old one broke (the server ended it, a restart): the
        batch in flight is gone; the head is read again."""
        assert self.location is not None
        fresh = type(self).connect(self.location, readonly=self.readonly)
        with suppress(psycopg.Error):
            self._conn.close()
        self._conn = fresh._conn
        self._end()
        self._high.clear()
        self._size, self.frontier = self._head()

    @classmethod
    def connect(cls, where: PgLocation, *, readonly: bool = False) -> PgAuditStore:
        """Connect, refuse a schema other than this build's (SchemaMismatch), open."""
        conn = psycopg.connect(where.conninfo, password=where.password,
                               application_name="frs-audit-reader" if readonly else "frs-audit",
                               connect_timeout=10, autocommit=readonly,
                               options="" if readonly else
                               f"-c idle_in_transaction_session_timeout={IDLE_IN_TX_S}s")
        try:
            version = 0
            if conn.execute("SELECT to_regclass('schema_migrations')").fetchone() != (None,):
                row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
                version = int(row[0]) if row is not None and row[0] is not None else 0
            if version != latest():
                raise SchemaMismatch(f"database schema is at {version}, this build needs "
                                     f"{latest()}: run frs db migrate")
            if not readonly:
                conn.rollback()
            store = cls(conn, readonly=readonly)
            store.location = where
            return store
        except BaseException:
            conn.close()
            raise

    def _head(self) -> tuple[int, Frontier]:
        """Size and right edge as committed: from the tree row, rebuilt from the leaf
        hashes if that row is missing or does not match them."""
        with self._reading():
            (count,) = self._one("SELECT COALESCE(MAX(idx) + 1, 0) FROM audit_leaves")
            row = self._conn.execute("SELECT size, frontier FROM audit_tree WHERE id = 0"
                                     ).fetchone()
            size = int(count)
            if row is not None and int(row[0]) == size:
                try:
                    return size, Frontier.from_bytes(size, bytes(row[1]))
                except ValueError:
                    pass  # damaged: rebuilt below (verify judges the leaves, not this row)
            return size, Frontier.of(self.leaf_hashes(size))

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...]:
        row = self._conn.execute(sql, args).fetchone()
        assert row is not None
        return tuple(row)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """A read outside a batch: a reader's own transaction (a named cursor needs one);
        a writer's implicit one is ended at once, so it holds no snapshot."""
        idle = self._conn.info.transaction_status == pq.TransactionStatus.IDLE
        if self.readonly:
            if idle:
                with self._conn.transaction():
                    yield
            else:
                yield
            return
        try:
            yield
        finally:
            if not self._in_tx:
                self._conn.rollback()

    @property
    def size(self) -> int:
        return self._size

    @property
    def in_tx(self) -> bool:
        return self._in_tx

    # --- writing ----------------------------------------------------------------------

    def _begin(self) -> None:
        if self._in_tx:
            return
        if self.readonly:
            raise RuntimeError("a read-only audit store does not write")
        if self.fence is not None:
            row = self._conn.execute(_FENCE).fetchone()
            if row is None or int(row[0]) != self.fence:
                self._conn.rollback()
                raise Fenced(f"sequencer epoch {self.fence} is no longer the lease's")
        size, frontier = self._one(_LOCK_HEAD)
        self._in_tx = True
        if int(size) != self._size:
            # Another instance appended since our last batch: take the head it left.
            self._size, self.frontier = int(size), Frontier.from_bytes(int(size),
                                                                       bytes(frontier))
            self._high.clear()

    def _stored(self, key: Key) -> bool:
        if key in self._keys:
            return True
        part = (key[0], key[1])
        high = self._high.get(part)
        if high is None:
            (found,) = self._one('SELECT MAX("offset") FROM audit_leaves'
                                 " WHERE topic = %s AND partition = %s", part)
            high = self._high[part] = -1 if found is None else int(found)
        if key[2] > high:
            return False  # consumed in order: above the highest is new
        return self._conn.execute(
            'SELECT 1 FROM audit_leaves WHERE topic = %s AND partition = %s AND "offset" = %s',
            key).fetchone() is not None

    def append(self, meta: LeafMeta, body: dict[str, Any]) -> int | None:
        """Append one leaf; returns its index, or None when this record is already in."""
        self._begin()
        key = (meta.topic, meta.partition, meta.offset)
        if self._stored(key):
            return None
        idx = self._size
        leaf = canonical({**body, "index": idx})
        lh = leaf_hash(leaf)
        self._pending.append((idx, meta.topic, meta.partition, meta.offset, meta.ce_id,
                              meta.ce_type, meta.subject, meta.time, leaf, lh))
        self._keys.add(key)
        part = (meta.topic, meta.partition)
        self._high[part] = max(self._high.get(part, -1), meta.offset)
        self._size += 1
        self.frontier.append(lh)
        return idx

    def take_queued(self, limit: int) -> list[Queued]:
        """Up to ``limit`` ingested entries, oldest first, out of the queue in this batch's
        transaction (fenced, under the head's lock): they become leaves in the same commit
        or stay queued."""
        self._begin()
        out = []
        for *meta, template, cut, record, sequenced in self._conn.execute(
                _TAKE, (limit,), binary=True).fetchall():  # the bytes as they are, not hex
            out.append(Queued(LeafMeta(*meta[1:]), bytes(template), int(cut),
                              None if record is None else bytes(record), bool(sequenced)))
        return out

    def append_leaf(self, entry: Queued) -> int:
        """Append a queued entry (not sequenced yet) at the head; its index."""
        self._begin()
        idx = self._size
        leaf = entry.leaf(idx)
        lh = leaf_hash(leaf)
        m = entry.meta
        self._pending.append((idx, m.topic, m.partition, m.offset, m.ce_id, m.ce_type,
                              m.subject, m.time, leaf, lh))
        self._high.pop((m.topic, m.partition), None)  # append()'s cache: ask again
        self._size += 1
        self.frontier.append(lh)
        return idx

    @contextmanager
    def pipelined(self) -> Iterator[None]:
        """The batch's statements sent without waiting for each answer (psycopg's pipeline
        mode): a write costs no round trip, a read waits for what was sent before it. An
        error may surface at a later statement than its own, so there is no savepoint per
        record here: on any error the caller rolls the whole batch back."""
        self._begin()
        with self._conn.pipeline():
            yield

    def rollback(self) -> None:
        """Nothing of the batch in flight is kept; back to the committed head."""
        if self._in_tx:
            self._abort()

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """One record's effects (its leaf and its invariant state) happen all or not at
        all: a handler that fails halfway is retried from a clean state."""
        self._begin()
        # The previous record's savepoint is released only now, in the same round trip
        # (the commit ends it otherwise): one round trip per record, not two.
        self._conn.execute("RELEASE SAVEPOINT record; SAVEPOINT record" if self._savepoint
                           else "SAVEPOINT record")
        self._savepoint = True
        state = (len(self._pending), self._size, self.frontier.copy(), dict(self._high))
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK TO SAVEPOINT record; RELEASE SAVEPOINT record")
            self._savepoint = False
            kept, self._size, self.frontier, self._high = state
            for row in self._pending[kept:]:
                self._keys.discard((row[1], row[2], row[3]))
            del self._pending[kept:]
            self._flushed = min(self._flushed, kept)
            raise

    def _flush(self) -> None:
        rows = self._pending[self._flushed:]
        if not rows:
            return
        # Binary: the leaf bytes go as they are, not as hex text for the server to parse.
        with self._conn.cursor().copy(
                f"COPY audit_leaves ({_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(_COLUMN_TYPES)
            for row in rows:
                copy.write_row(row)
        self._flushed = len(self._pending)

    def commit(self) -> None:
        """The batch's leaves, the new head and the invariants' state, in one commit."""
        if not self._in_tx:
            return
        try:
            self._flush()
            self._conn.execute("UPDATE audit_tree SET size = %s, frontier = %s WHERE id = 0",
                               (self.frontier.size, self.frontier.to_bytes()))
            self._conn.commit()
        except BaseException:
            self._abort()
            raise
        self._end()

    def _abort(self) -> None:
        """Nothing of the batch is in: back to the committed head."""
        self._conn.rollback()
        self._end()
        self._high.clear()
        self._size, self.frontier = self._head()

    def _end(self) -> None:
        self._in_tx = False
        self._savepoint = False
        self._pending.clear()
        self._keys.clear()
        self._flushed = 0

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """A consistent view of a live store for readers (leaves and checkpoints together)."""
        if self._in_tx:
            yield
            return
        with self._conn.transaction():
            self._conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield
        if not self.readonly:
            self._conn.commit()

    def prepare(self, schema: str) -> None:
        """The invariants' tables come from migration 0008 (the role may create none)."""

    def execute(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        """Run a statement inside the current batch's transaction (invariant state)."""
        self._begin()
        self._conn.execute(self._translated(sql), args)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._reading():
            return self._conn.execute(self._translated(sql), args).fetchall()

    def _translated(self, sql: str) -> str:
        found = self._sql.get(sql)
        if found is None:
            found = self._sql[sql] = _dialect(sql)
        return found

    # --- checkpoints ----------------------------------------------------------------

    def add_checkpoint(self, tree_size: int, root: bytes, note: str, created_at: str) -> None:
        if self._in_tx:
            raise RuntimeError("commit the batch before writing a checkpoint")
        self._begin()  # under the head's lock: one sequence number each
        try:
            self._conn.execute(
                "INSERT INTO audit_checkpoints (seq, tree_size, root, note, created_at)"
                " SELECT COALESCE(MAX(seq), 0) + 1, %s, %s, %s, %s FROM audit_checkpoints",
                (tree_size, root, note, created_at))
            self._conn.commit()
        except BaseException:
            self._abort()
            raise
        self._end()

    def checkpoints(self) -> list[StoredCheckpoint]:
        with self._reading():
            rows = self._conn.execute(_CHECKPOINT + " ORDER BY seq").fetchall()
        return [StoredCheckpoint.of(row) for row in rows]

    def last_checkpoint(self) -> StoredCheckpoint | None:
        with self._reading():
            row = self._conn.execute(_CHECKPOINT + " ORDER BY seq DESC LIMIT 1").fetchone()
        return None if row is None else StoredCheckpoint.of(row)

    # --- reading ----------------------------------------------------------------------

    def leaves(self, start: int = 0, end: int | None = None) -> list[bytes]:
        return [leaf for _, leaf in self.iter_leaves(start, end)]

    def iter_leaves(self, start: int = 0, end: int | None = None
                    ) -> Iterator[tuple[IndexRow, bytes]]:
        """(index row, leaf bytes) in index order, streamed by a server-side cursor. The
        row is (idx, position, length, leaf hash) as store.py gives it; the position is
        where the leaf would start in a segment of the leaves before it."""
        if self._in_tx:
            self._flush()
        pos = 0
        with self._reading(), self._conn.cursor(name="audit_leaves_read") as cur:
            cur.itersize = 2000
            cur.execute("SELECT idx, leaf, leaf_hash FROM audit_leaves"
                        " WHERE idx >= %s AND idx < %s ORDER BY idx",
                        (start, end if end is not None else 1 << 62))
            for idx, leaf, lh in cur:
                data = bytes(leaf)
                yield (idx, pos, len(data), bytes(lh)), data
                pos += len(data)

    def leaf_hashes(self, end: int) -> list[bytes]:
        """The hashes of leaves [0, end), for proofs."""
        if self._in_tx:
            self._flush()
        with self._reading():
            rows = self._conn.execute(
                "SELECT leaf_hash FROM audit_leaves WHERE idx < %s ORDER BY idx", (end,)
            ).fetchall()
        return [bytes(h) for (h,) in rows]

    def index_of(self, ce_id: str) -> int | None:
        """The first leaf of an event on its own topic (not a DLQ copy)."""
        if self._in_tx:
            self._flush()
        with self._reading():
            row = self._conn.execute(
                "SELECT idx FROM audit_leaves WHERE ce_id = %s AND topic NOT LIKE 'frs.dlq.%%'"
                " ORDER BY idx LIMIT 1", (ce_id,)).fetchone()
        return None if row is None else int(row[0])

    def count_since(self, start: int, other_than_topic: str) -> int:
        """Leaves from ``start`` on, those of one topic left out."""
        if self._in_tx:
            self._flush()
        with self._reading():
            (count,) = self._one("SELECT COUNT(*) FROM audit_leaves WHERE idx >= %s"
                                 " AND topic <> %s", (start, other_than_topic))
        return int(count)

    def rows(self, subject: str | None = None) -> list[LeafMeta]:
        query = ('SELECT topic, partition, "offset", ce_id, ce_type, subject, time'
                 " FROM audit_leaves")
        args: tuple[Any, ...] = ()
        if subject is not None:
            query += " WHERE subject = %s"
            args = (subject,)
        if self._in_tx:
            self._flush()
        with self._reading():
            found = self._conn.execute(query + " ORDER BY idx", args).fetchall()
        return [LeafMeta(*r) for r in found]

    def close(self) -> None:
        try:
            if not self.readonly and not self._conn.broken:
                self.commit()
        except psycopg.OperationalError:
            pass  # the session is gone (ended by the server): its batch was never committed
        finally:
            self._conn.close()


# Every table of migration 0008, the invariants' state included, then 0010's queue and
# sequencer lease.
LOG_TABLES = ("audit_leaves", "audit_tree", "audit_checkpoints", "inv_cleared",
              "inv_dispatches", "inv_purged", "inv_probes", "inv_exigent", "inv_liveness",
              "inv_probe_ends", "inv_providers", "inv_trusted_keys", "inv_provider_purposes",
              "inv_decisions_waiting", "inv_violations", "audit_queue", "audit_sequencer_lease")


def clear_log(where: PgLocation, *, refuse_if_not_empty: bool) -> None:
    """For the bench's scratch database only: delete the whole log (refused, when asked,
    on one that holds leaves, so a live log is never emptied by a bench)."""
    with psycopg.connect(where.conninfo, password=where.password, connect_timeout=10) as conn:
        if refuse_if_not_empty and conn.execute("SELECT 1 FROM audit_leaves LIMIT 1"
                                                ).fetchone() is not None:
            raise RuntimeError("the PostgreSQL audit log is not empty: bench on a scratch "
                               "database")
        for table in LOG_TABLES:
            conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))

"""One audit log, many audit instances (PostgreSQL, migration 0010), after Trillian's split
of frontend and sequencer.

Ingest (every instance): each consumed record becomes a queued entry in ``audit_queue``:
its leaf without the index, and what the invariants read when they concern it. A
Kafka batch is one insert of arrays that skips what is queued already (by CloudEvents id
per topic, or by topic, partition and offset), committed before the consumer commits its
offsets. No tree work, no invariants.

Sequencing (the one instance holding ``audit_sequencer_lease``): the lease row names a
holder and an epoch and expires at a time of the database's clock; the leader renews it
every ``renew_s``, a standby takes it once expired, bumping the epoch. The leader takes
queued entries oldest first, gives them the next indices, appends the leaves, extends the
right edge and runs the invariants, in one transaction that begins by checking the epoch
(``PgAuditStore.fence``): a leader that lost the lease while stopped fails its next batch
and its next checkpoint, and stops leading. The tree goes on across a change of leader:
the new one starts from the head the old one committed.

Locally a leader counts its lease from the moment it asked for it, so it stops acting
before the database would let another take over (clock rates agree; clocks need not)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg

from schemas.events import ComplianceViolation
from services.audit import handlers
from services.audit.invariants import Invariants, count
from services.audit.pg_store import Fenced, PgAuditStore, Queued
from services.audit.store import LeafMeta, PgLocation

log = logging.getLogger("frs.audit.sequencer")

# The lease lasts LEASE_TTL_S from each renewal, renewed every RENEW_S: a standby, trying
# every RENEW_S, sequences at most LEASE_TTL_S + RENEW_S after the leader's death.
LEASE_TTL_S = 8.0
RENEW_S = 2.0
SEQUENCE_TICK_S = 0.2
SEQUENCE_BATCH = 5000

_QUEUE_COLUMNS = 'topic, partition, "offset", ce_id, ce_type, subject, time, leaf, cut, record'
# A batch in one statement, as arrays (COPY cannot skip what is queued already, and the
# service roles may make no temporary table to COPY into); ON CONFLICT covers both keys.
# Binary parameters (%b): no hex text for the bytes, no text for the server to parse; half
# the CPU of text ones, on both sides.
_INGEST = (f"INSERT INTO audit_queue ({_QUEUE_COLUMNS}) SELECT * FROM unnest("
           "%b::text[], %b::int[], %b::bigint[], %b::text[], %b::text[], %b::text[],"
           " %b::text[], %b::bytea[], %b::int[], %b::bytea[]) ON CONFLICT DO NOTHING")


def _connect(where: PgLocation, name: str, **options: Any) -> psycopg.Connection[Any]:
    extra = " ".join(f"-c {k}={v}" for k, v in options.items())
    return psycopg.connect(where.conninfo, password=where.password, application_name=name,
                           connect_timeout=10, options=extra)


class IngestQueue:
    """Every instance's ingest: entries buffered per Kafka batch, written by ``commit``."""

    def __init__(self, where: PgLocation) -> None:
        self.where = where
        self._conn: psycopg.Connection[Any] | None = None
        self._rows: list[tuple[Any, ...]] = []

    def add(self, meta: LeafMeta, body: dict[str, Any], record: bytes | None) -> None:
        template, cut = handlers.queued_leaf(body)
        self._rows.append((meta.topic, meta.partition, meta.offset, meta.ce_id, meta.ce_type,
                           meta.subject, meta.time, template, cut, record))

    def commit(self) -> int:
        """The batch's entries in the queue, durably; how many were new."""
        if not self._rows:
            return 0
        if self._conn is None or self._conn.closed:
            self._conn = _connect(self.where, "frs-audit-ingest")
        columns = [list(c) for c in zip(*self._rows, strict=True)]
        try:
            added = self._conn.execute(_INGEST, columns).rowcount
            self._conn.commit()
        except psycopg.OperationalError:
            self._conn.close()  # a new session next time; the consumer redelivers
            raise
        except BaseException:
            self._conn.rollback()
            raise
        self._rows.clear()
        return added

    def discard(self) -> None:
        self._rows.clear()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


# --- the lease ------------------------------------------------------------------------


class LeaseTable(Protocol):
    """The lease row's three operations (PgLeaseTable; a fake in the unit tests)."""

    def acquire(self, holder: str, ttl_s: float) -> int | None: ...
    def renew(self, holder: str, epoch: int, ttl_s: float) -> bool: ...
    def release(self, holder: str, epoch: int) -> None: ...


_ACQUIRE = """INSERT INTO audit_sequencer_lease AS l (id, holder, epoch, expires_at)
VALUES (0, %(holder)s, 1, now() + %(ttl)s * interval '1 second')
ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, epoch = l.epoch + 1,
  expires_at = excluded.expires_at
WHERE l.expires_at < now()
RETURNING epoch"""
_RENEW = """UPDATE audit_sequencer_lease SET expires_at = now() + %(ttl)s * interval '1 second'
WHERE id = 0 AND holder = %(holder)s AND epoch = %(epoch)s AND expires_at >= now()"""
_RELEASE = """UPDATE audit_sequencer_lease SET expires_at = now() - interval '1 second'
WHERE id = 0 AND holder = %(holder)s AND epoch = %(epoch)s"""


class PgLeaseTable:
    """``audit_sequencer_lease`` on its own autocommit session; a lock held by a batch in
    flight makes a takeover wait at most ``lock_timeout`` before it tries again."""

    def __init__(self, where: PgLocation) -> None:
        self.where = where
        self._conn: psycopg.Connection[Any] | None = None

    def _run(self, sql: str, args: dict[str, Any]) -> psycopg.Cursor[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = _connect(self.where, "frs-audit-lease", lock_timeout="1s",
                                  statement_timeout="5s")
            self._conn.autocommit = True
        try:
            return self._conn.execute(sql, args)
        except psycopg.OperationalError:
            self._conn.close()
            raise

    def acquire(self, holder: str, ttl_s: float) -> int | None:
        row = self._run(_ACQUIRE, {"holder": holder, "ttl": ttl_s}).fetchone()
        return None if row is None else int(row[0])

    def renew(self, holder: str, epoch: int, ttl_s: float) -> bool:
        return self._run(_RENEW, {"holder": holder, "epoch": epoch, "ttl": ttl_s}
                         ).rowcount == 1

    def release(self, holder: str, epoch: int) -> None:
        self._run(_RELEASE, {"holder": holder, "epoch": epoch})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


@dataclass(frozen=True)
class LeaseHolder:
    holder: str
    epoch: int
    expires_at: str
    live: bool


def read_lease(conn: psycopg.Connection[Any]) -> LeaseHolder | None:
    """Who holds the lease (frs status; the auditor role may read it)."""
    row = conn.execute("SELECT holder, epoch, expires_at, expires_at >= now()"
                       " FROM audit_sequencer_lease WHERE id = 0").fetchone()
    return None if row is None else LeaseHolder(str(row[0]), int(row[1]),
                                                row[2].isoformat(), bool(row[3]))


class Lease:
    """This instance's view of the lease: ``keep`` every ``renew_s`` renews it while
    leading, else tries to take it. ``leading`` is false from the local end of the lease
    on, even before a renewal says it was lost."""

    def __init__(self, table: LeaseTable, holder: str, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.table = table
        self.holder = holder
        self.ttl_s = ttl_s
        self.clock = clock
        self.epoch: int | None = None
        self._until = 0.0

    @property
    def leading(self) -> bool:
        return self.epoch is not None and self.clock() < self._until

    def keep(self) -> bool:
        asked = self.clock()  # before the round trip: the server's expiry is later
        if self.epoch is not None:
            if self.table.renew(self.holder, self.epoch, self.ttl_s):
                self._until = asked + self.ttl_s
                return self.leading
            log.warning("sequencer lease lost", extra={"epoch": self.epoch})
            self.epoch = None
        epoch = self.table.acquire(self.holder, self.ttl_s)
        if epoch is not None:
            self.epoch, self._until = epoch, asked + self.ttl_s
            log.info("sequencer lease taken", extra={"epoch": epoch, "holder": self.holder})
        return self.leading

    def lost(self) -> None:
        """A fenced write said another leads."""
        self.epoch = None

    def release(self) -> None:
        """On a clean stop: a standby need not wait for the lease to expire."""
        if self.epoch is not None:
            self.table.release(self.holder, self.epoch)
            self.epoch = None


# --- sequencing -----------------------------------------------------------------------


def sequence_batch(store: PgAuditStore, invariants: Invariants,
                   limit: int) -> tuple[int, list[ComplianceViolation]]:
    """Up to ``limit`` queued entries into the log, with their invariants, in one fenced
    transaction: (entries taken, violations found). Raises ``Fenced`` when another leads.

    The batch's statements go out pipelined, without a savepoint per record: a write costs
    no round trip. Should any record's invariants fail, the whole batch is rolled back and
    done again record by record, each in its own savepoint, so the one that fails is still
    a leaf (only its invariants are skipped) and every other record is judged as before."""
    invariants.counting = False  # a batch redone must not count its violations twice
    try:
        taken = store.take_queued(limit)
        try:
            with store.pipelined():
                found = _sequence(store, invariants, taken, _observe)
        except Fenced:
            raise
        except Exception as exc:
            if isinstance(exc, psycopg.OperationalError) and not isinstance(
                    exc, psycopg.errors.PipelineAborted):
                raise  # the session, not a record: the caller reconnects
            store.rollback()
            log.warning("a batch's invariants failed; sequencing it record by record",
                        extra={"entries": len(taken), "error": type(exc).__name__})
            taken = store.take_queued(limit)
            found = _sequence(store, invariants, taken, _with_invariants)
        store.commit()
    finally:
        invariants.counting = True
    count(found)
    return len(taken), found


Observe = Callable[[PgAuditStore, Invariants, Queued], list[ComplianceViolation]]


def _sequence(store: PgAuditStore, invariants: Invariants, taken: list[Queued],
              observe: Observe) -> list[ComplianceViolation]:
    found: list[ComplianceViolation] = []
    for entry in taken:
        if entry.sequenced:
            continue  # ingested twice: the first is the leaf
        if entry.record is None:
            store.append_leaf(entry)
            continue
        found += observe(store, invariants, entry)
    return found


def _observe(store: PgAuditStore, invariants: Invariants,
             entry: Queued) -> list[ComplianceViolation]:
    store.append_leaf(entry)
    return handlers.observe_queued(entry.meta.topic, entry.record or b"", invariants)


def _with_invariants(store: PgAuditStore, invariants: Invariants,
                     entry: Queued) -> list[ComplianceViolation]:
    try:
        with store.savepoint():
            return _observe(store, invariants, entry)
    except psycopg.OperationalError:
        raise
    except Exception as exc:
        # The log must not stall on one record: it is a leaf all the same, and the
        # error says which one the invariants did not judge.
        log.error("invariants failed on a record; sequenced without them",
                  extra={"topic": entry.meta.topic, "partition": entry.meta.partition,
                         "offset": entry.meta.offset, "error": type(exc).__name__})
        store.append_leaf(entry)
        return []

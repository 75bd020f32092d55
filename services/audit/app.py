"""Audit service: ``build(settings)`` declares the route that consumes every catalog
topic, DLQs included, into the audit store and checks the compliance invariants, and the
job that runs the time rules and signs checkpoints of the log."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Protocol

import psycopg
from prometheus_client import Gauge, Histogram

from schemas.catalog import AUDITED_TOPICS
from schemas.envelope import DecodeError, Envelope
from schemas.events import CandidatesReceived, ComplianceViolation, Event, ProbeRequested
from schemas.types import probe_id_for, utcnow
from services.audit import handlers
from services.audit.checkpoint import Signer, load_or_create_key
from services.audit.invariants import Invariants
from services.audit.pg_store import Fenced, PgAuditStore
from services.audit.sequencer import (
    LEASE_TTL_S,
    RENEW_S,
    SEQUENCE_BATCH,
    SEQUENCE_TICK_S,
    IngestQueue,
    Lease,
    PgLeaseTable,
    sequence_batch,
)
from services.audit.settings import AuditSettings
from services.audit.store import AuditLog, PgLocation, open_store
from services.kit.app import Context, Job, ServiceApp, Wiring
from services.kit.metrics import audit_leader
from services.kit.routing import RawRecord, Route, RouteProgress, dlq_for
from services.kit.state import SchemaMismatch

log = logging.getLogger("frs.audit")


@cache
def log_metrics() -> tuple[Gauge, Gauge, Gauge]:
    return (Gauge("frs_audit_tree_size", "Leaves durably in the audit log."),
            Gauge("frs_audit_checkpoint_tree_size", "Tree size of the last signed checkpoint."),
            Gauge("frs_audit_last_checkpoint_timestamp_seconds",
                  "Unix time the last checkpoint was signed."))


@cache
def end_to_end_seconds() -> Histogram:
    # The audit service sees every event, so it alone can time a probe across services.
    return Histogram("frs_audit_end_to_end_seconds",
                     "From a probe's request to each candidate list received for it.",
                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600))


class RequestTimes:
    """When each recent probe was requested (CloudEvent time), bounded in memory: a
    restart only loses latency samples, never audit data."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._times: OrderedDict[str, datetime] = OrderedDict()

    def observe(self, envelope: Envelope) -> float | None:
        """Record a request; return the latency when this is a candidate list."""
        event = envelope.event
        if isinstance(event, ProbeRequested):
            self._times[probe_id_for(event.request_id)] = envelope.time
            if len(self._times) > self.capacity:
                self._times.popitem(last=False)
        elif isinstance(event, CandidatesReceived):
            requested = self._times.get(event.probe_id)
            if requested is not None:
                return max(0.0, (envelope.time - requested).total_seconds())
        return None



class Marks(Protocol):
    """How far the route's processor has read: the kit's ``RouteProgress``."""

    async def mark(self) -> object: ...

    async def reached(self, mark: object) -> bool: ...

    async def committed_past(self, mark: object) -> bool: ...


class CompleteUntil:
    """A time before which every record on the audited topics is in the log: the clock
    when the partitions' ends were last taken, once the consumer has read up to them.

    Every rule on an absence (a dispatch's clearance, a purge, a review, a probe's end)
    is judged as of this time, not the clock, so an audit that lags (a restart, a rebuild
    from the topics' start, the other instance's share read slower) never takes an event
    it has not read yet for a missing one. On one host (SQLite) one consumer holds every
    partition and "read" is its own position. With many instances (``by_group``) each reads
    a share into the shared queue: "read" is the group's committed offsets, which pass a
    record only once its instance's queue write is durable, and the leader sequences the
    queue to its end before judging."""

    def __init__(self, marks: Marks, clock: Callable[[], datetime], *,
                 by_group: bool = False) -> None:
        self.marks = marks
        self.clock = clock
        self.by_group = by_group
        self._pending: tuple[object, datetime] | None = None
        self._complete: datetime | None = None

    async def advance(self) -> None:
        """Once per tick: see whether the last mark was reached; take a new one if so."""
        read = self.marks.committed_past if self.by_group else self.marks.reached
        if self._pending is not None and await read(self._pending[0]):
            self._complete, self._pending = self._pending[1], None
        if self._pending is None:
            # The clock before the ends: a record written before it lies below them.
            taken_at = self.clock()
            ends = await self.marks.mark()
            self._pending = (ends, taken_at) if ends is not None else None

    def take(self) -> datetime | None:
        """The newest complete time not yet judged (None: nothing new since the last)."""
        complete, self._complete = self._complete, None
        return complete

    def put_back(self, complete: datetime) -> None:
        """A time taken but not judged (the queue was not sequenced to its end yet): judged
        on a later tick, unless a newer one has come meanwhile."""
        if self._complete is None:
            self._complete = complete


def signer_for(settings: AuditSettings) -> Signer:
    signer = Signer(settings.origin, load_or_create_key(settings.key_file()))
    # The verifier key is public: auditors take it from here (or from the log's operator).
    vkey = settings.key_file().with_suffix(".vkey")
    if not vkey.exists() or vkey.read_text().strip() != signer.verifier_key:
        vkey.write_text(signer.verifier_key + "\n")
    return signer


def open_log(settings: AuditSettings) -> AuditLog:
    """The store FRS_STATE_URL names; a shared database that cannot be used (unreachable,
    refused, a schema other than this build's) stops the start in one line."""
    where = settings.store_at()
    try:
        return open_store(where)
    except Exception as exc:
        if isinstance(where, Path):
            raise
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error(text if isinstance(exc, SchemaMismatch)
                  else f"cannot use the shared state at {settings.state().shown()}: {text}")
        raise SystemExit(1) from None


class Shared:
    """This instance's part in the one log on PostgreSQL: its ingest queue, its view of
    the sequencer lease, and the sequencing it does while it holds that lease."""

    def __init__(self, store: PgAuditStore, queue: IngestQueue, lease: Lease) -> None:
        self.store = store
        self.queue = queue
        self.lease = lease
        self._renewed_at = float("-inf")
        self._broken = False
        self.emptied = False  # whether the last drain sequenced the queue to its end

    @classmethod
    def open(cls, settings: AuditSettings, store: AuditLog) -> Shared:
        where = settings.store_at()
        assert isinstance(store, PgAuditStore) and isinstance(where, PgLocation)
        holder = f"frs-{settings.service}-{settings.instance_id}"  # its client id
        return cls(store, IngestQueue(where), Lease(PgLeaseTable(where), holder, LEASE_TTL_S))

    def ingest(self, raw: RawRecord, decoded: Envelope | DecodeError,
               invariants: Invariants) -> None:
        meta, body = handlers.leaf_for(raw.topic, raw.partition, raw.offset, raw.value,
                                       decoded, raw.headers)
        kept = handlers.invariant_input(raw.headers, raw.key, raw.value, decoded) \
            if invariants.concerns(raw.topic, decoded) else None
        self.queue.add(meta, body, kept)

    def tick(self) -> bool:
        """Keep or take the lease every RENEW_S; whether this instance leads now."""
        now = time.monotonic()
        if now - self._renewed_at >= RENEW_S:
            self._renewed_at = now
            try:
                self.lease.keep()
            except psycopg.Error as exc:
                log.error("sequencer lease unreachable", extra={"error": type(exc).__name__})
        leading = self.lease.leading
        self.store.fence = self.lease.epoch if leading else None
        return leading

    def drain(self, invariants: Invariants) -> list[ComplianceViolation]:
        """Sequence what is queued, batch by batch, for at most about a second (the event
        loop waits meanwhile)."""
        if self._broken:
            self.store.reconnect()
            self._broken = False
        found: list[ComplianceViolation] = []
        started = time.monotonic()
        self.emptied = False
        try:
            while self.lease.leading:
                taken, violations = sequence_batch(self.store, invariants, SEQUENCE_BATCH)
                found += violations
                if taken < SEQUENCE_BATCH:
                    self.emptied = True  # all that was queued before this drain is a leaf
                    break
                if time.monotonic() - started > 1.0:
                    break
        except psycopg.OperationalError:
            self._broken = True  # the session is gone (ended by the server, a restart)
            raise
        return found

    def close(self) -> None:
        with suppress(psycopg.Error):  # else it expires on its own
            self.lease.release()
        self.queue.close()


def build(settings: AuditSettings) -> ServiceApp:
    """One route reads every catalog topic (DLQs included) into the store and checks the
    invariants; one job runs the time rules and signs time-due checkpoints."""

    def wire(ctx: Context) -> Wiring:
        publisher = ctx.publisher
        # FRS_STATE_URL: leaves, tree, checkpoints and the invariants' state in the shared
        # PostgreSQL database, or the segment and SQLite index in store_dir.
        store = open_log(settings)
        ctx.stack.callback(store.close)
        invariants = Invariants(store, settings.invariant_settings(), utcnow)
        # On PostgreSQL, many instances: each ingests into the queue, the lease's holder
        # sequences (sequencer.py). On SQLite, one host: this instance is the leader and
        # ingest and sequencing stay one step.
        shared = Shared.open(settings, store) if isinstance(settings.store_at(),
                                                             PgLocation) else None
        if shared is not None:
            ctx.stack.callback(shared.close)
        audit_leader(shared is None)
        ports = handlers.AuditPorts(store=store, invariants=invariants)
        policy = handlers.CheckpointPolicy(signer_for(settings), settings.origin,
                                           settings.checkpoint_every_n,
                                           settings.checkpoint_interval_s, utcnow)
        last_checkpoint_at = [time.monotonic()]

        async def publish(events: list[Event]) -> None:
            try:
                await publisher.publish(events)
            except Exception as exc:  # kept in the store; the next one is published again
                log.error("publish failed", extra={"error": type(exc).__name__,
                                                   "count": len(events)})

        async def checkpoint_if_due() -> None:
            now = time.monotonic()
            if store.in_tx or not handlers.checkpoint_due(store, policy,
                                                          last_checkpoint_at[0], now):
                return
            event = handlers.make_checkpoint(store, policy)
            last_checkpoint_at[0] = now
            log_metrics()[1].set(event.tree_size)
            log_metrics()[2].set(event.published_at.timestamp())
            log.info("checkpoint signed", extra={"tree_size": event.tree_size})
            await publish([event])

        request_times = RequestTimes()
        tree, checkpointed, checkpoint_ts = log_metrics()
        tree.set(store.size)
        last = store.last_checkpoint()
        if last is not None:
            checkpointed.set(last.tree_size)
            checkpoint_ts.set(datetime.fromisoformat(last.created_at).timestamp())
        else:
            # A new log has signed nothing yet: its staleness counts from now, not from
            # 1970 (which paged FrsAuditCheckpointStale before the first checkpoint was due).
            checkpoint_ts.set(time.time())

        async def record(raw: RawRecord, decoded: Envelope | DecodeError) -> list[Event]:
            out: list[Event] = []
            if shared is not None:
                shared.ingest(raw, decoded, invariants)
            else:
                out = await handlers.on_record(raw.topic, raw.partition, raw.offset,
                                               raw.value, decoded, ports, raw.headers)
            if isinstance(decoded, Envelope):
                latency = request_times.observe(decoded)
                if latency is not None:
                    end_to_end_seconds().observe(latency)
            return out

        async def durable() -> None:
            if shared is not None:
                shared.queue.commit()  # the leader sequences it
                return
            store.commit()
            log_metrics()[0].set(store.size)
            await checkpoint_if_due()

        progress = RouteProgress()
        log_route = Route("audit", settings.group_id, tuple(t.name for t in AUDITED_TOPICS),
                          {}, dlq_for("audit"), on_record=record, before_commit=durable,
                          progress=progress)
        complete = CompleteUntil(progress, utcnow, by_group=shared is not None)

        async def report(violations: list[ComplianceViolation]) -> None:
            if violations:
                for v in violations:
                    log.warning("compliance violation", extra={"invariant": v.invariant.value})
                await publish(list(violations))

        async def timers() -> None:
            await complete.advance()  # awaits: before the in_tx check, not after it
            if store.in_tx:
                return  # a batch is open; its own commit hook runs the checks next
            if shared is not None and not shared.lease.leading:
                return  # the leader judges the sequenced log
            try:
                violations: list[ComplianceViolation] = []
                until = complete.take()
                if until is not None and shared is not None:
                    await report(shared.drain(invariants))  # everything read by then
                    if not shared.emptied:
                        complete.put_back(until)  # more queued than one drain takes
                        until = None
                if until is not None:
                    violations = invariants.deadline_rules(until) + invariants.liveness(until)
                store.commit()
                await report(violations)
                await checkpoint_if_due()
            except Fenced:
                shared_lost()

        def shared_lost() -> None:
            assert shared is not None
            shared.lease.lost()
            audit_leader(False)
            log.warning("another audit instance sequences now: this one stops")

        async def sequence() -> None:
            assert shared is not None
            try:
                leading = shared.tick()
                audit_leader(leading)
                if not leading:
                    return
                await report(shared.drain(invariants))
                log_metrics()[0].set(store.size)
                await checkpoint_if_due()
            except Fenced:
                shared_lost()

        jobs = [Job("invariant timers and checkpoints", settings.tick_s, timers)]
        if shared is not None:
            jobs.append(Job("audit sequencer", SEQUENCE_TICK_S, sequence))
        return Wiring(routes=[log_route], jobs=jobs)

    # The registry topics are audited like any other: read as events, not followed.
    return ServiceApp(settings, wire, follows_registries=False)

"""The at-least-once processor loop that runs each Route (the publisher is publisher.py).

The loop is the same for every service: fetch a batch, decode each record into its
CloudEvent envelope and typed model, call the handler, publish what it returns, wait
until every published record is acknowledged by all in-sync replicas, then commit. The
wait and the commit of one batch overlap the handling of the next (not for routes with a
``before_commit`` hook), so a round trip to the broker is not paid per batch twice. A
record that cannot be decoded, or whose handler keeps failing, goes to the service's
DLQ with its original headers plus error headers, and the partition moves on. A handler
that raises ``NotYet`` (a valid record that cannot be handled yet, see signals.py) is
retried for as long as the processor runs and never dead-lettered.
Records with the same key are handled in order; different keys run concurrently.

Ownership (issue 18): a route's input topics must be co-partitioned (checked at start) and
are assigned by partition number (services/kit/assignor.py), so one instance holds all of
a key's records. On revocation the processor stops waiting on the revoked partitions,
lets the work in hand finish for a bounded time (else abandons it), commits, then lets the
rebalance go on. On assignment it takes the partitions' leases (services/kit/fencing.py)
and calls the route's ``on_assigned``; a write refused by the fence makes it drop that
partition's work and stop fetching it until the group hands it out again.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from schemas.catalog import TOPIC_BY_NAME
from schemas.envelope import DecodeError, Envelope, decode
from schemas.events import Event
from services.kit.assignor import CopartitionedAssignor
from services.kit.cost import step
from services.kit.fencing import Fenced, FenceScope, fenced_as
from services.kit.kafka import KafkaSettings, client_options
from services.kit.metrics import owned_partitions, processor_metrics
from services.kit.publisher import EventTooLarge, Publisher
from services.kit.routing import RawRecord, Route
from services.kit.signals import NotYet, store_unavailable

log = logging.getLogger("frs.processor")


class _LeftForNextOwner(Exception):
    """Stop came while a record waited or failed: its batch must not be committed."""


class NotCopartitioned(Exception):
    """A route's input topics differ in partition count: one key would be on partition
    numbers that different instances hold."""


def copartition_fault(group_id: str, counts: dict[str, int | None]) -> str | None:
    """The one line that stops a start, or None when every topic has as many partitions."""
    if len(set(counts.values())) <= 1 and None not in counts.values():
        return None
    shown = ", ".join(f"{t}={'missing' if n is None else n}" for t, n in sorted(counts.items()))
    return (f"consumer group {group_id}: its input topics must have as many partitions each "
            f"(co-partitioned by key), found {shown}")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, revoked: Callable[[set[TopicPartition]], Awaitable[None]],
                 assigned: Callable[[set[TopicPartition]], Awaitable[None]]) -> None:
        self._revoked = revoked
        self._assigned = assigned

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._assigned(set(assigned))


class Processor:
    """Runs one Route until ``stop()``: at-least-once, commit after durable effects."""

    def __init__(
        self,
        route: Route,
        publisher: Publisher,
        bootstrap: str,
        *,
        max_retries: int = 3,
        retry_backoff_s: float = 0.2,
        batch_max: int = 500,
        concurrency: int = 64,
        commit_interval_s: float = 0.0,
        stop_timeout_s: float = 60.0,
        revoke_wait_s: float = 5.0,
        kill_before_commit: bool = False,
        kafka: KafkaSettings | None = None,
    ) -> None:
        self.route = route
        self.kill_before_commit = kill_before_commit
        self.publisher = publisher
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.batch_max = batch_max
        self.commit_interval_s = commit_interval_s
        self.stop_timeout_s = stop_timeout_s
        # How long a revocation waits for the work in hand: well inside the rebalance
        # timeout (the session timeout, 10 s), or the group goes on without this member.
        self.revoke_wait_s = revoke_wait_s
        # Offsets whose batches are done (effects acknowledged) but not yet committed.
        self._done: dict[TopicPartition, int] = {}
        self._committed_at = 0.0
        self._slots = asyncio.Semaphore(concurrency)
        self._stopping = asyncio.Event()
        self._abandoning = False
        # Bumped for a partition each time a rebalance takes it: a batch fetched under an
        # older epoch never records its offsets, even if the partition has come back.
        self._epoch: dict[TopicPartition, int] = {}
        self._batch_epoch: dict[TopicPartition, int] = {}
        # First offset per partition of the batch in hand (fetched, not yet handled).
        self._in_hand_from: dict[TopicPartition, int] = {}
        self._idle = asyncio.Event()  # no batch's handlers are running
        self._idle.set()
        self._finishing: asyncio.Task[None] | None = None
        # Partitions being revoked: a record of them waiting on NotYet gives up now.
        self._revoking: set[TopicPartition] = set()
        # The epoch of each partition number's lease this instance holds (route.leases),
        # taken at assignment; a number missing here is not ours to act on.
        self._leases: dict[int, int] = {}
        self._leases_ready = asyncio.Event()
        if route.leases is None:
            self._leases_ready.set()
        self.holder = f"{route.group_id}-{uuid.uuid4().hex[:12]}"
        # One per consumer: it remembers this member's partitions (sticky).
        self.assignor = CopartitionedAssignor()
        self._metrics = processor_metrics(route.service)
        self._client_options = client_options(kafka, bootstrap)
        options: dict[str, Any] = {
            **self._client_options,
            "group_id": route.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": route.auto_offset_reset,
            "isolation_level": "read_committed",
            # What a consumer prefetches is what it holds when a backlog waits: 1 MiB per
            # partition (16 MiB let intake grow by 70 MB with 10,000 probes queued). A larger
            # record (a 10 MB probe) still comes whole: the broker returns at least one.
            "max_partition_fetch_bytes": 1024 * 1024,
            "fetch_max_bytes": 8 * 1024 * 1024,
            # Partition p of every input topic to one member (the assignor's docstring).
            # This one only: aiokafka offering two livelocks the join of two members, so a
            # group on another assignor is stopped whole, not rolled, to switch.
            "partition_assignment_strategy": (self.assignor,),
        }
        options.update(route.consumer_options)
        self._consumer = AIOKafkaConsumer(**options)
        self.processed = 0

    def stop(self) -> None:
        self._stopping.set()
        self._leases_ready.set()  # a loop waiting for an assignment's leases stops too

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def _check_copartitioned(self) -> None:
        """NotCopartitioned unless the route's topics have as many partitions each. Only
        topics keyed alike are co-partitioned (the catalog's key; a topic not in the
        catalog counts as keyed alike): audit reads every topic, whatever its key, as one
        log, and no key of one topic is looked for on another."""
        keys = {TOPIC_BY_NAME[t].key if t in TOPIC_BY_NAME else None
                for t in self.route.topics}
        if len(self.route.topics) < 2 or len(keys - {None}) > 1:
            return
        # Before subscribing, so a refused start never joins the group; aiokafka's consumer
        # has no public call for a topic's partitions before it tracks the topic.
        cluster = await self._consumer._client.fetch_all_metadata()
        counts: dict[str, int | None] = {}
        for topic in self.route.topics:
            found = cluster.partitions_for_topic(topic)
            counts[topic] = len(found) if found else None
        fault = copartition_fault(self.route.group_id, counts)
        if fault is not None:
            raise NotCopartitioned(fault)

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        """Before the group moves ``revoked``: waits on them stop, the work in hand finishes
        (at most ``revoke_wait_s``, then it is abandoned: its offsets are not recorded, and
        the next owner handles it again), the done offsets are committed, then the
        rebalance goes on. aiokafka stops fetching them while it rebalances."""
        self._leases_ready.clear()
        self._revoking |= revoked
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled(), self.revoke_wait_s)
        if not self._idle.is_set():
            log.warning("revoked with work in hand: abandoned to the next owner",
                        extra={"group": self.route.group_id,
                               "partitions": ",".join(map(str, sorted(_numbers(revoked))))})
        for tp in revoked:
            self._epoch[tp] = self._epoch.get(tp, 0) + 1
        offsets = {tp: o for tp, o in self._done.items() if tp in revoked}
        for tp in revoked:
            self._done.pop(tp, None)
        if offsets:
            try:
                await self._consumer.commit(offsets)
            except KafkaError as exc:  # the next owner redelivers: repeated work only
                log.warning("commit at revocation failed",
                            extra={"group": self.route.group_id, "error": type(exc).__name__})
        self._revoking -= revoked
        kept = self._consumer.assignment() - revoked
        for number in _numbers(revoked) - _numbers(kept):
            self._leases.pop(number, None)
        self._owned(kept)

    async def _settled(self) -> None:
        """Until the batch in hand is handled and every finishing batch committed."""
        while True:
            await self._idle.wait()
            finishing = self._finishing
            if finishing is None or finishing.done():
                return
            await asyncio.wait({finishing})

    async def _assigned(self, assigned: set[TopicPartition]) -> None:
        """Take the leases of the partitions just assigned (their epoch + 1: whoever held
        them before is fenced from now on), then let the service load their state."""
        numbers = sorted(_numbers(assigned))
        self._owned(assigned)
        log.info("partitions assigned", extra={
            "group": self.route.group_id, "partitions": ",".join(map(str, numbers)),
            "assigned": " ".join(sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))})
        leases = self.route.leases
        try:
            await self._inherit_offsets(assigned)
            if leases is not None:
                self._leases = {}
                delay = 0.25
                while numbers and not self.stopping:
                    try:
                        self._leases = await leases.take(self.route.group_id, numbers,
                                                         self.holder)
                        break
                    except Exception as exc:
                        # Retried until the store answers: no rebalance may come to retry
                        # it (was a finding: both dispatch instances of the chaos set idle
                        # for good after a PostgreSQL restart during their assignment).
                        # Nothing is handled meanwhile; if the store stays away past the
                        # session timeout (no heartbeat in this callback), the group moves
                        # the partitions and this member rejoins once the take returns.
                        log.error("could not take partition leases; retrying",
                                  extra={"group": self.route.group_id,
                                         "error": type(exc).__name__, "retry_in_s": delay})
                        await asyncio.sleep(delay)
                        delay = min(2.0, delay * 2)
            if self.route.on_assigned is not None and numbers:
                await self.route.on_assigned(numbers)
        finally:
            self._leases_ready.set()

    async def _inherit_offsets(self, assigned: set[TopicPartition]) -> None:
        """Partitions of a topic in ``route.offsets_from`` that this group has never
        committed start where the group named there last committed (none: the reset policy
        applies, as on a new install). Retried until the broker answers: starting from the
        reset policy instead would handle a week of records again."""
        taken = [tp for tp in assigned if tp.topic in self.route.offsets_from]
        delay = 0.25
        while taken and not self.stopping:
            try:
                own = await self._consumer._coordinator.fetch_committed_offsets(taken)
                fresh = [tp for tp in taken if tp not in own or own[tp].offset < 0]
                if fresh:
                    await self._seek_to_former(fresh)
                return
            except KafkaError as exc:
                log.error("could not read the former group's offsets; retrying",
                          extra={"group": self.route.group_id, "error": type(exc).__name__,
                                 "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _seek_to_former(self, fresh: list[TopicPartition]) -> None:
        admin = AIOKafkaAdminClient(**self._client_options)
        taken: dict[TopicPartition, int] = {}
        try:
            await admin.start()
            for former in sorted({self.route.offsets_from[tp.topic] for tp in fresh}):
                theirs = await admin.list_consumer_group_offsets(
                    former, partitions=[tp for tp in fresh
                                        if self.route.offsets_from[tp.topic] == former])
                for tp, meta in sorted(theirs.items()):
                    if meta.offset >= 0:
                        self._consumer.seek(tp, meta.offset)
                        taken[tp] = meta.offset
                        log.info("starting where the former group stopped", extra={
                            "group": self.route.group_id, "former_group": former,
                            "partition": f"{tp.topic}:{tp.partition}", "offset": meta.offset})
        finally:
            await admin.close()
        if taken:
            # Ours from now on: a partition that gets no record for a while must not fall
            # back to the reset policy once the former group's offsets expire, and the
            # group's committed position is what "caught up" is judged by.
            await self._consumer.commit(taken)

    def _owned(self, tps: set[TopicPartition]) -> None:
        for topic in self.route.topics:  # frs_partitions_owned, for frs status and alerts
            owned_partitions(topic, sum(1 for tp in tps if tp.topic == topic))

    def _scope(self, partitions: Iterable[int], leases: dict[int, int] | None = None
                ) -> FenceScope | None:
        if self.route.leases is None:
            return None
        held = self._leases if leases is None else leases
        return FenceScope(self.route.leases.table, self.route.group_id,
                          {p: held.get(p, -1) for p in partitions})

    def _fenced(self, exc: Fenced, tried: FenceScope | None) -> None:
        """A write of ours was refused: stop acting on those partitions. Work from before
        our own newer lease (a rebalance that gave them back) is only dropped; a lease
        another instance took means we are stale: stop fetching until the group rebalances
        (it hands the partitions to their owner, or back to us with a new lease)."""
        for number in exc.partitions:
            stale_try = tried is not None and tried.epochs.get(number) != self._leases.get(
                number, -1)
            tps = [tp for tp in self._consumer.assignment() if tp.partition == number]
            for tp in tps:
                self._epoch[tp] = self._epoch.get(tp, 0) + 1  # its batch is not recorded
            if stale_try or number not in self._leases:
                continue
            del self._leases[number]
            if tps:
                self._consumer.pause(*tps)
            log.warning("partition lease lost to a newer owner: dropped its work",
                        extra={"group": self.route.group_id, "partition": number})

    async def mark(self) -> object:
        """The end of every partition of this route's topics now, for ``reached`` (None if
        unknown). Every partition, not only ours: a record on a partition another member
        of the group holds is not one this processor will ever hand out."""
        if self.stopping:
            return None
        partitions = [TopicPartition(topic, p) for topic in self.route.topics
                      for p in self._consumer.partitions_for_topic(topic) or ()]
        if not partitions:
            return None
        try:
            ends = await asyncio.wait_for(self._consumer.end_offsets(partitions), 5.0)
        except (KafkaError, TimeoutError):
            return None
        return dict(ends)

    async def committed_past(self, mark: object) -> bool:
        """Whether the group (any member, this one included) has committed every
        partition of ``mark`` up to its end: every record on them at ``mark`` is handled
        and its effects durable (offsets commit only after). For work one member does for
        records all members read (the audit sequencer). False whenever not known."""
        if not isinstance(mark, dict) or self.stopping:
            return False
        wanted = [tp for tp, end in mark.items() if end > 0]
        if not wanted:
            return True
        try:  # one OffsetFetch for all (the public committed() asks per partition)
            done = await asyncio.wait_for(
                self._consumer._coordinator.fetch_committed_offsets(wanted), 5.0)
        except (KafkaError, TimeoutError):
            return False
        return all(tp in done and done[tp].offset >= mark[tp] for tp in wanted)

    async def reached(self, mark: object) -> bool:
        """Whether every record that was on the partitions at ``mark`` has been handled
        here. False whenever that is not known (no mark, stopping, a rebalance under way):
        the caller then waits rather than concluding that a record does not exist."""
        if not isinstance(mark, dict) or self.stopping:
            return False
        for tp, end in mark.items():
            if end == 0:
                continue  # an empty partition has nothing to hand out
            if tp not in self._consumer.assignment():
                return False
            upto = self._in_hand_from.get(tp)
            if upto is None:
                try:  # the next offset getmany hands out; waits only before a first fetch
                    upto = await asyncio.wait_for(self._consumer.position(tp), 1.0)
                except (KafkaError, TimeoutError):
                    return False
            if upto < end:
                return False
        return True

    async def run(self) -> None:
        await self._consumer.start()
        try:
            await self._check_copartitioned()
        except NotCopartitioned:
            await self._consumer.stop()
            raise  # the runtime says it in one line and stops the start
        self._consumer.subscribe(list(self.route.topics),
                                 listener=_Rebalance(self._revoked, self._assigned))
        log.info("consumer started", extra={"group": self.route.group_id,
                                            "topics": ",".join(self.route.topics)})
        finishing: asyncio.Task[None] | None = None
        try:
            while not self._stopping.is_set():
                if finishing is not None and finishing.done():
                    finishing.result()  # a failed acknowledgement or commit stops the loop
                batch = await self._consumer.getmany(timeout_ms=200, max_records=self.batch_max)
                if not batch:
                    if self._done and (finishing is None or finishing.done()):
                        finishing = asyncio.create_task(self._commit(finishing, force=True))
                    continue
                if self.route.before_commit is not None and finishing is not None:
                    # The hook makes local state durable; it must not take in effects of
                    # a batch whose outputs are not yet acknowledged, so no overlap here.
                    await finishing
                if not self._leases_ready.is_set():
                    await self._leases_ready.wait()  # an assignment is taking its leases
                self._batch_epoch = {tp: self._epoch.get(tp, 0) for tp in batch}
                self._in_hand_from = {tp: records[0].offset for tp, records in batch.items()}
                self._idle.clear()
                try:
                    pending = await self._handle_batch(batch)
                finally:
                    self._idle.set()
                self._in_hand_from = {}
                if finishing is not None:
                    # At most one batch finishing behind the one in hand: a stalled commit
                    # or acknowledgement holds the loop instead of queueing batches.
                    await asyncio.wait({finishing})
                    finishing.result()
                # Acknowledgements and the commit of this batch overlap the handling of the
                # next one; commits stay in order.
                finishing = self._finishing = asyncio.create_task(self._finish_batch(
                    batch, dict(self._batch_epoch), pending, finishing, dict(self._leases)))
        except _LeftForNextOwner:
            log.info("stopped with a batch left uncommitted for the next owner",
                     extra={"group": self.route.group_id})
        finally:
            try:
                await asyncio.wait_for(self._commit(finishing, force=True), self.stop_timeout_s)
            except TimeoutError:
                # The broker does not answer: uncommitted offsets are redelivered later.
                log.warning("final commit timed out", extra={"group": self.route.group_id})
            finally:
                await self._consumer.stop()
                log.info("consumer stopped", extra={"group": self.route.group_id})

    async def _handle_batch(self, batch: dict[TopicPartition, list[ConsumerRecord]]
                            ) -> list[asyncio.Future[Any]]:
        by_key: dict[tuple[TopicPartition, bytes | None], list[ConsumerRecord]] = {}
        for tp, records in batch.items():
            for record in records:
                by_key.setdefault((tp, record.key), []).append(record)
        pending: list[asyncio.Future[Any]] = []
        # Every key's records run to the end before a failure is raised: nothing is left
        # running behind a processor that stops.
        results = await asyncio.gather(
            *(self._handle_in_order(rs, pending) for rs in by_key.values()),
            return_exceptions=True)
        # A real failure outranks a record left for the next owner at stop.
        failures = sorted((r for r in results if isinstance(r, BaseException)),
                          key=lambda r: isinstance(r, _LeftForNextOwner))
        if failures:
            raise failures[0]
        return pending

    async def _finish_batch(self, batch: dict[TopicPartition, list[ConsumerRecord]],
                            epochs: dict[TopicPartition, int],
                            pending: list[asyncio.Future[Any]],
                            previous: asyncio.Task[None] | None,
                            leases: dict[int, int] | None = None) -> None:
        if previous is not None:
            await previous
        # Effects are durable before the offsets move: at-least-once, never at-most-once.
        if pending:
            await asyncio.gather(*pending)
        if self.route.before_commit is not None:
            # The batch's state is written under the leases it was handled under.
            scope = self._scope(_numbers(batch), leases)
            try:
                with fenced_as(scope):
                    await self.route.before_commit()
            except Fenced as exc:
                # Nothing of the batch is durable: no offset of it is recorded, and the
                # partitions still ours go back to its start to be handled again.
                self._fenced(exc, scope)
                assigned = self._consumer.assignment()
                for tp, records in batch.items():
                    self._epoch[tp] = self._epoch.get(tp, 0) + 1
                    if tp in assigned and tp.partition in self._leases:
                        self._consumer.seek(tp, records[0].offset)
                return
        if self.kill_before_commit and pending:
            # Fault injection for crash tests: effects are out, offsets are not.
            log.warning("fault injection: SIGKILL before commit",
                        extra={"group": self.route.group_id})
            os.kill(os.getpid(), signal.SIGKILL)
        for tp, records in batch.items():
            if self._epoch.get(tp, 0) == epochs[tp]:  # else revoked since: not ours
                self._done[tp] = records[-1].offset + 1
        self.processed += sum(len(r) for r in batch.values())
        await self._commit(None, force=False)
        # Only partitions still ours: aiokafka asserts on highwater() of a revoked one.
        assigned = self._consumer.assignment()
        for tp, records in batch.items():
            highwater = self._consumer.highwater(tp) if tp in assigned else None
            if highwater is not None:
                self._metrics.consumer_lag.labels(tp.topic).set(
                    max(0, highwater - records[-1].offset - 1)
                )

    async def _commit(self, previous: asyncio.Task[None] | None, *, force: bool) -> None:
        """Commit the done offsets, at most every ``commit_interval_s`` unless forced: each
        commit is a replicated write on the broker, and a later one only means more
        redelivery after a crash (handlers are idempotent), never a lost record."""
        if previous is not None:
            await previous
        if not self._done or (not force and time.monotonic() - self._committed_at
                              < self.commit_interval_s):
            return
        # Partitions revoked meanwhile are the new owner's to commit.
        assigned = self._consumer.assignment()
        offsets = {tp: offset for tp, offset in self._done.items() if tp in assigned}
        self._done.clear()
        self._committed_at = time.monotonic()
        try:
            if offsets:
                await self._consumer.commit(offsets)
        except KafkaError as exc:
            # A rebalance took the partitions (CommitFailedError, IllegalStateError) or the
            # coordinator moved: the next owner redelivers and handlers are idempotent, so a
            # commit that does not happen costs only repeated work, never a lost record.
            log.warning("commit failed", extra={"group": self.route.group_id,
                                                "error": type(exc).__name__})

    async def _handle_in_order(
        self, records: list[ConsumerRecord], pending: list[asyncio.Future[Any]]
    ) -> None:
        async with self._slots:
            for record in records:
                if self._abandoning:
                    return  # stop came while an earlier record of the batch waited
                pending.extend(await self._handle_record(record))

    async def _handle_record(self, record: ConsumerRecord) -> list[asyncio.Future[Any]]:
        tp = TopicPartition(record.topic, record.partition)
        if self.route.leases is not None and record.partition not in self._leases:
            # Not ours (fenced, or no lease taken): dropped, and its batch not recorded.
            self._epoch[tp] = self._epoch.get(tp, 0) + 1
            return []
        scope = self._scope((record.partition,))
        raw = RawRecord(
            record.topic, record.partition, record.offset, record.key, record.value,
            [(k, bytes(v)) for k, v in (record.headers or ())],
        )
        decoded: Envelope | DecodeError
        try:
            with step("envelope"):
                decoded = decode(raw.headers, raw.key, raw.value,
                                 timestamp_ms=record.timestamp,
                                 timestamp_type=record.timestamp_type)
        except DecodeError as err:
            decoded = err
        on_record = self.route.on_record
        if on_record is not None:
            etype = decoded.type if isinstance(decoded, Envelope) else "undecodable"

            async def call() -> Sequence[Event]:
                assert on_record is not None
                return await on_record(raw, decoded)
        else:
            if isinstance(decoded, DecodeError):
                return await self._invalid(raw, decoded)
            handler = self.route.handlers.get(type(decoded.event))
            if handler is None:
                if self.route.on_invalid is not None:
                    # A route that answers every record (intake's requests) answers a valid
                    # event of a type it does not take like any record it cannot use.
                    return await self._invalid(raw, DecodeError(
                        "unexpected_type", f"{decoded.type} is not taken on {raw.topic}"))
                return []  # a type this service does not react to
            etype = decoded.type
            envelope_ = decoded

            async def call() -> Sequence[Event]:
                assert handler is not None
                return await handler(envelope_.event, envelope_)

        envelope = decoded if isinstance(decoded, Envelope) else None
        self._metrics.events_in.labels(etype).inc()
        delay = self.retry_backoff_s
        attempt = 0
        waited = 0
        while True:
            started = time.perf_counter()
            try:
                with fenced_as(scope):
                    try:
                        outputs = await call()
                    except Exception as exc:
                        if store_unavailable(exc):
                            raise NotYet("state store unavailable") from exc
                        raise
            except Fenced as exc:
                self._fenced(exc, scope)
                return []  # the owner of the lease handles it
            except NotYet as exc:
                if tp in self._revoking:
                    self._epoch[tp] = self._epoch.get(tp, 0) + 1  # abandoned: not recorded
                if self._epoch.get(tp, 0) != self._batch_epoch.get(tp, 0):
                    return []  # revoked while waiting: the new owner handles it
                waited += 1
                if waited == 1 or waited % 20 == 0:
                    cause = exc.__cause__
                    log.info("waiting for a prerequisite",
                             extra={"type": etype, "offset": raw.offset, "waits": waited,
                                    "reason": type(exc).__name__,
                                    "cause": type(cause).__name__ if cause else None})
                self._metrics.waits.labels(etype).inc()
                pause = min(self.retry_backoff_s * 2 ** min(waited, 6), 5.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), pause)
                if self._stopping.is_set():
                    self._abandoning = True
                    raise _LeftForNextOwner from exc
                continue
            except Exception as exc:
                self._metrics.handler_failures.labels(etype).inc()
                log.warning(
                    "handler failed",
                    extra={"type": etype, "offset": raw.offset, "attempt": attempt + 1,
                           "error": type(exc).__name__},
                )
                if self._stopping.is_set():
                    # Not dead-lettered for a failure that may be the stop's own doing.
                    self._abandoning = True
                    raise _LeftForNextOwner from exc
                if attempt == self.max_retries:
                    return [await self._to_dlq(raw, "handler_failed", type(exc).__name__)]
                attempt += 1
                await asyncio.sleep(delay)
                delay *= 2
                continue
            self._metrics.handler_seconds.labels(etype).observe(time.perf_counter() - started)
            try:
                # Every output checked before any is sent: none of a refused record's go.
                with step("produce"):
                    prepared = [self.publisher.prepare(out, envelope) for out in outputs]
            except EventTooLarge as exc:
                return [await self._to_dlq(raw, "event_too_large", str(exc))]
            futures = []
            for out, ready in zip(outputs, prepared, strict=True):
                futures.append(await self.publisher.send_prepared(ready))
                self._metrics.events_out.labels(out.TYPE).inc()
            return futures

    async def _invalid(self, raw: RawRecord, err: DecodeError) -> list[asyncio.Future[Any]]:
        log.warning("undecodable record", extra={"topic": raw.topic, "partition": raw.partition,
                                                 "offset": raw.offset, "code": err.code})
        if self.route.on_invalid is not None:
            outputs = await self.route.on_invalid(raw, err)
            try:
                prepared = [self.publisher.prepare(out) for out in outputs]
            except EventTooLarge as exc:
                return [await self._to_dlq(raw, "event_too_large", str(exc))]
            futures = [await self.publisher.send_prepared(ready) for ready in prepared]
            for out in outputs:
                self._metrics.events_out.labels(out.TYPE).inc()
            return futures
        return [await self._to_dlq(raw, err.code, err.message)]

    async def _to_dlq(self, raw: RawRecord, code: str, message: str) -> asyncio.Future[Any]:
        self._metrics.dlq.labels(code).inc()
        value = raw.value
        if self.route.dlq_value is not None:
            # What the DLQ keeps of the record: a route whose records carry an image keeps
            # metadata and digests only (the image would outlive its TTL there).
            value = self.route.dlq_value(raw.value)
        headers = [
            *raw.headers,
            ("frs_value_sha256", hashlib.sha256(raw.value or b"").hexdigest().encode()),
            ("frs_error_code", code.encode()),
            ("frs_error", message[:1000].encode()),
            ("frs_error_service", self.route.service.encode()),
            ("frs_source_topic", raw.topic.encode()),
            ("frs_source_partition", str(raw.partition).encode()),
            ("frs_source_offset", str(raw.offset).encode()),
        ]
        log.error("sent to DLQ", extra={"topic": raw.topic, "offset": raw.offset, "code": code})
        return await self.publisher.send_raw(self.route.dlq_topic, raw.key, value, headers)


def _numbers(tps: Iterable[TopicPartition]) -> set[int]:
    """Partition numbers: the unit of ownership, the same in every input topic."""
    return {tp.partition for tp in tps}

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
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from schemas.envelope import DecodeError, Envelope, decode
from schemas.events import Event
from services.kit.kafka import KafkaSettings, client_options
from services.kit.metrics import processor_metrics
from services.kit.publisher import EventTooLarge, Publisher
from services.kit.routing import RawRecord, Route
from services.kit.signals import NotYet

log = logging.getLogger("frs.processor")


class _LeftForNextOwner(Exception):
    """Stop came while a record waited or failed: its batch must not be committed."""


class _Revocations(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_revoked: Callable[[Iterable[TopicPartition]], None]) -> None:
        self._on_revoked = on_revoked

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        return None


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
        self._metrics = processor_metrics(route.service)
        options: dict[str, Any] = {
            **client_options(kafka, bootstrap),
            "group_id": route.group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": route.auto_offset_reset,
            "isolation_level": "read_committed",
            # What a consumer prefetches is what it holds when a backlog waits: 1 MiB per
            # partition (16 MiB let intake grow by 70 MB with 10,000 probes queued). A larger
            # record (a 10 MB probe) still comes whole: the broker returns at least one.
            "max_partition_fetch_bytes": 1024 * 1024,
            "fetch_max_bytes": 8 * 1024 * 1024,
        }
        options.update(route.consumer_options)
        self._consumer = AIOKafkaConsumer(**options)
        self._consumer.subscribe(list(route.topics), listener=_Revocations(self._revoked))
        self.processed = 0

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _revoked(self, revoked: Iterable[TopicPartition]) -> None:
        for tp in revoked:
            self._epoch[tp] = self._epoch.get(tp, 0) + 1
            self._done.pop(tp, None)  # the next owner commits it

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
                self._batch_epoch = {tp: self._epoch.get(tp, 0) for tp in batch}
                self._in_hand_from = {tp: records[0].offset for tp, records in batch.items()}
                pending = await self._handle_batch(batch)
                self._in_hand_from = {}
                if finishing is not None:
                    # At most one batch finishing behind the one in hand: a stalled commit
                    # or acknowledgement holds the loop instead of queueing batches.
                    await asyncio.wait({finishing})
                    finishing.result()
                # Acknowledgements and the commit of this batch overlap the handling of the
                # next one; commits stay in order.
                finishing = asyncio.create_task(self._finish_batch(
                    batch, dict(self._batch_epoch), pending, finishing))
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
                            previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await previous
        # Effects are durable before the offsets move: at-least-once, never at-most-once.
        if pending:
            await asyncio.gather(*pending)
        if self.route.before_commit is not None:
            await self.route.before_commit()
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
        raw = RawRecord(
            record.topic, record.partition, record.offset, record.key, record.value,
            [(k, bytes(v)) for k, v in (record.headers or ())],
        )
        decoded: Envelope | DecodeError
        try:
            decoded = decode(raw.headers, raw.key, raw.value, timestamp_ms=record.timestamp,
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
                outputs = await call()
            except NotYet as exc:
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

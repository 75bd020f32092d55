"""Processor bookkeeping that must survive a rebalance, without a broker."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from aiokafka import TopicPartition

from services.kit.processor import Processor
from services.kit.publisher import Publisher
from services.kit.routing import Route

TP = TopicPartition("t", 0)


def _processor(commit_interval_s: float = 0.0) -> Processor:
    # A consumer that was never started owns no partition: exactly a batch's state after a
    # rebalance took its partition while its acknowledgements were awaited.
    route = Route(service="unit_revoked", group_id="g", topics=("t",), handlers={},
                  dlq_topic="t.dlq")
    return Processor(route, cast(Publisher, None), "127.0.0.1:9",
                     commit_interval_s=commit_interval_s)


async def test_a_batch_whose_partition_was_revoked_finishes_without_crashing() -> None:
    proc = _processor()
    batch: dict[TopicPartition, list[Any]] = {TP: [SimpleNamespace(offset=41)]}
    try:
        await proc._finish_batch(batch, {TP: 0}, [], None)
    finally:
        await proc._consumer.stop()
    assert proc.processed == 1
    # Nothing to commit for a partition that is no longer ours, and nothing kept for later.
    assert proc._done == {}


async def test_offsets_of_a_batch_fetched_before_a_revocation_are_never_recorded() -> None:
    # A long commit interval keeps what is recorded in _done, for the test to see.
    proc = _processor(commit_interval_s=3600)
    batch: dict[TopicPartition, list[Any]] = {TP: [SimpleNamespace(offset=41)]}
    try:
        proc._committed_at = float("inf")
        await proc._finish_batch(batch, {TP: 0}, [], None)
        assert proc._done == {TP: 42}
        # A rebalance takes the partition (and may give it back): what was done under the
        # old assignment is dropped, and a batch fetched before it records nothing.
        await proc._revoked({TP})
        assert proc._done == {}
        await proc._finish_batch(batch, {TP: 0}, [], None)
        assert proc._done == {}
        await proc._finish_batch(batch, {TP: 1}, [], None)  # fetched after it: recorded
        assert proc._done == {TP: 42}
    finally:
        await proc._consumer.stop()


def test_a_store_that_does_not_answer_is_waited_out_not_blamed_on_the_record() -> None:
    import sqlite3

    import psycopg

    from services.kit.signals import store_unavailable

    assert store_unavailable(psycopg.OperationalError("the database system is shutting down"))
    assert store_unavailable(psycopg.errors.AdminShutdown("terminating connection"))
    assert store_unavailable(sqlite3.OperationalError("database is locked"))
    assert not store_unavailable(sqlite3.OperationalError("no such table: sends"))
    assert not store_unavailable(psycopg.errors.UniqueViolation("duplicate key"))
    assert not store_unavailable(ValueError("a bad record"))


async def test_a_record_whose_store_restarts_is_handled_once_it_answers_not_dead_lettered(
) -> None:
    """PostgreSQL restarting outlasts the handler's quick retries (4 in about 1.5 s): the
    record waits for the store, as for any prerequisite, and is then handled."""
    import psycopg
    from aiokafka.structs import ConsumerRecord

    from schemas.events import Event

    calls = 0

    async def on_record(_raw: Any, _decoded: Any) -> list[Event]:
        nonlocal calls
        calls += 1
        if calls <= 6:
            raise psycopg.errors.AdminShutdown("terminating connection")
        return []

    route = Route(service="unit_store_down", group_id="g", topics=("t",), handlers={},
                  dlq_topic="t.dlq", on_record=on_record)
    # No publisher: a dead letter would fail the test with an AttributeError.
    proc = Processor(route, cast(Publisher, None), "127.0.0.1:9", retry_backoff_s=0.001)
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        "t", 0, 7, 0, 0, b"k", b"not an event", None, 1, 12, ())
    try:
        assert await proc._handle_record(record) == []
    finally:
        await proc._consumer.stop()
    assert calls == 7

"""Races on the vault index (PostgreSQL): two instances (two pools of one connection, two
threads released together) purge the same object at once, 1,000 times: each transition is
made by exactly one of them, the other finds it done, nothing fails, and the object's
ImagePurged is published once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from schemas.events import Event, ImagePurged
from services.intake.purge import Purger
from services.vault import (
    FileObjectStore,
    LocalKek,
    PgVaultIndex,
    Vault,
    VaultEntry,
    probe_ref,
)
from tests.integration.stores.test_vault_index_contract import empty_vault, pg_index
from tests.pg import PgServer

TRIALS = 1000
T0 = datetime(2026, 1, 1, tzinfo=UTC)
R = TypeVar("R")


@pytest.fixture
def two_instances(pg_migrated: PgServer) -> Iterator[tuple[PgVaultIndex, PgVaultIndex]]:
    empty_vault(pg_migrated)
    pair = (pg_index(pg_migrated, max_size=1), pg_index(pg_migrated, max_size=1))
    yield pair
    for index in pair:
        index.close()


def at_once(a: Callable[[], R], b: Callable[[], R]) -> tuple[R, R]:
    """Run ``a`` and ``b`` on two threads released by one barrier."""
    gate = threading.Barrier(2)

    def run(work: Callable[[], R]) -> R:
        gate.wait()
        return work()

    with ThreadPoolExecutor(2) as threads:
        first, second = threads.submit(run, a), threads.submit(run, b)
        return first.result(), second.result()


def stored(probe_id: str, expires: datetime) -> VaultEntry:
    return VaultEntry(probe_ref(probe_id), probe_id, "CASE-R", "probe", f"probe/{probe_id}",
                      T0, expires, "stored", None, None)


def test_each_purge_transition_is_made_once(
        two_instances: tuple[PgVaultIndex, PgVaultIndex]) -> None:
    a, b = two_instances

    def purge(index: PgVaultIndex, ref: str) -> Callable[[], tuple[bool, bool, bool]]:
        def steps() -> tuple[bool, bool, bool]:
            began = index.mark_purging(ref, "expired")
            shredded = index.shred(ref, T0)
            with index.announcing(ref) as ours:
                return began, shredded, ours
        return steps

    for trial in range(TRIALS):
        ref = probe_ref(f"t-{trial}")
        a.upsert(stored(f"t-{trial}", T0), "epoch", b"wrapped")
        made = at_once(purge(a, ref), purge(b, ref))
        # Per step (began, shredded, announced): one True between the two instances.
        assert [x + y for x, y in zip(*made, strict=True)] == [1, 1, 1], (trial, made)
        for index in (a, b):
            seen = index.get(ref)
            assert seen is not None and seen.state == "announced"
            assert index.wrapped_key(ref)[1] is None


def test_two_purgers_sweeping_at_once_announce_each_object_once(
        two_instances: tuple[PgVaultIndex, PgVaultIndex], tmp_path: Path) -> None:
    store, keys = FileObjectStore(tmp_path / "objects"), LocalKek(tmp_path / "kek")
    published: list[ImagePurged] = []

    async def publish(events: Sequence[Event]) -> None:
        published.extend(e for e in events if isinstance(e, ImagePurged))

    clock = [T0]
    purgers = [Purger(Vault(index, store, keys), dict, publish, lambda: clock[0])
               for index in two_instances]
    loops = [asyncio.new_event_loop() for _ in purgers]  # one per instance's thread
    writer = purgers[0].vault
    try:
        for trial in range(TRIALS):
            clock[0] = T0 + timedelta(seconds=trial + 1)
            writer.put(probe_id=f"s-{trial}", case_id="CASE-R", data=b"\xff\xd8img",
                       created_at=T0, expires_at=clock[0])
            swept = at_once(*(lambda p=p, loop=loop: loop.run_until_complete(p.sweep())
                              for p, loop in zip(purgers, loops, strict=True)))
            assert sorted(len(s) for s in swept) == [0, 1], trial
            assert [e.probe_id for e in published] == [f"s-{trial}"], trial
            published.clear()
    finally:
        for loop in loops:
            loop.close()
    assert writer.index.count_stored() == 0 and writer.index.due(clock[0]) == []

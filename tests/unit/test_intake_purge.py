"""Purger: stored expiries, case closing, crypto-shredding, restart mid-sweep (tmp files)."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from schemas.events import CaseRecord, ImagePurged, PurgeReason
from schemas.types import Purpose
from services.intake.purge import Purger, purge_metrics
from services.kit.clock import BrokerClock
from services.kit.runtime import run_jobs
from services.vault import (
    ObjectPurged,
    Vault,
)
from tests.unit.fakes import EventSink, FakeClock, tmp_vault

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def gauge() -> float | None:
    purge_metrics()  # registered once per process
    return REGISTRY.get_sample_value("frs_intake_vault_objects_past_expiry")


def case(case_id: str, status: str) -> CaseRecord:
    return CaseRecord(case_id=case_id, status=status,  # type: ignore[arg-type]
                      offense_category=Purpose.FINANCIAL_FRAUD, updated_at=T0)


def fill(vault: Vault, n: int, case_id: str = "C1", ttl_h: float = 1) -> list[str]:
    return [vault.put(probe_id=f"prb-{case_id}-{i}", case_id=case_id, data=b"img" * 100,
                      created_at=T0, expires_at=T0 + timedelta(hours=ttl_h)) for i in range(n)]


async def test_purges_only_what_is_past_expiry(tmp_path: Path) -> None:
    vault, clock, sink = tmp_vault(tmp_path), FakeClock(T0), EventSink()
    fill(vault, 2, "C1", ttl_h=1)
    fill(vault, 1, "C2", ttl_h=72)
    purger = Purger(vault, dict, sink, clock)
    assert await purger.sweep() == []
    clock.now = T0 + timedelta(hours=2)
    out = await purger.sweep()
    assert sorted(e.probe_id for e in out) == ["prb-C1-0", "prb-C1-1"]
    assert all(isinstance(e, ImagePurged) and e.reason == PurgeReason.EXPIRED for e in out)
    assert sink.events == out
    assert len(list((tmp_path / "objects").rglob("*.bin"))) == 1
    assert gauge() == 0
    assert await purger.sweep() == []  # nothing announced twice


async def test_closed_case_purges_within_one_sweep(tmp_path: Path) -> None:
    vault, clock, sink = tmp_vault(tmp_path), FakeClock(T0), EventSink()
    refs = fill(vault, 2, "C1", ttl_h=72)
    fill(vault, 1, "C2", ttl_h=72)
    cases = {"C1": case("C1", "open"), "C2": case("C2", "open")}
    purger = Purger(vault, lambda: cases, sink, clock)
    assert await purger.sweep() == []
    cases["C1"] = case("C1", "closed")
    clock.now = T0 + timedelta(minutes=5)
    out = await purger.sweep()
    assert {e.vault_ref for e in out} == set(refs)
    assert {e.reason for e in out} == {PurgeReason.CASE_CLOSED}
    assert all(e.expires_at == clock.now for e in out)


async def test_a_broker_out_of_reach_delays_announcements_not_purges(tmp_path: Path) -> None:
    vault, clock = tmp_vault(tmp_path), FakeClock(T0)
    refs = fill(vault, 3, ttl_h=1)
    clock.now = T0 + timedelta(hours=2)
    purger = Purger(vault, dict, EventSink(fail_after=0), clock)
    with pytest.raises(ConnectionError):
        await purger.sweep()
    assert gauge() == 3  # as the sweep began
    # Every image is destroyed on time although none could be announced yet.
    assert vault.index.count_past_expiry(clock.now) == 0 and vault.index.count_stored() == 0
    later = EventSink()
    assert sorted(e.vault_ref for e in await Purger(vault, dict, later, clock).sweep()) \
        == sorted(refs)


async def test_one_object_that_will_not_go_holds_back_no_other(tmp_path: Path) -> None:
    vault, clock = tmp_vault(tmp_path), FakeClock(T0)
    refs = fill(vault, 3, ttl_h=1)
    stuck = vault.index.get(refs[0])
    assert stuck is not None
    delete = vault.store.delete

    def refuse_one(name: str) -> None:
        if name == stuck.object_name:
            raise PermissionError("access denied")
        delete(name)
    vault.store.delete = refuse_one  # type: ignore[method-assign]
    clock.now = T0 + timedelta(hours=2)
    purger = Purger(vault, dict, EventSink(), clock)
    assert sorted(e.vault_ref for e in await purger.sweep()) == sorted(refs[1:])
    purger.refresh_gauges()
    assert gauge() == 1 and vault.index.count_past_expiry(clock.now) == 1


async def test_restart_mid_sweep_finishes_it(tmp_path: Path) -> None:
    vault, clock = tmp_vault(tmp_path), FakeClock(T0)
    refs = fill(vault, 5, ttl_h=1)
    assert vault.index.count_stored() == 5
    copies = {r: vault.read_ciphertext(r) for r in refs}
    clock.now = T0 + timedelta(hours=2)
    first = EventSink(fail_after=2)  # the third announcement dies, as a crash would
    with pytest.raises(ConnectionError):
        await Purger(vault, dict, first, clock).sweep()
    assert len(first.events) == 2
    # A new process over the same files: the sweep is finished, nothing is lost.
    vault2 = tmp_vault(tmp_path)
    second = EventSink()
    out = await Purger(vault2, dict, second, clock).sweep()
    announced = {e.vault_ref for e in first.events} | {e.vault_ref for e in out}
    assert announced == set(refs)
    assert {e.vault_ref for e in first.events}.isdisjoint({e.vault_ref for e in out})
    assert vault2.index.count_stored() == 0
    assert REGISTRY.get_sample_value("frs_intake_vault_objects") == 0
    assert not list((tmp_path / "objects").rglob("*.bin"))
    for ref, blob in copies.items():
        with pytest.raises(ObjectPurged):
            vault2.open_blob(ref, blob)


async def test_gauges_follow_expiry_between_sweeps(tmp_path: Path) -> None:
    vault, clock = tmp_vault(tmp_path), FakeClock(T0)
    fill(vault, 2, ttl_h=1)
    purger = Purger(vault, dict, EventSink(), clock, interval_s=3600, gauge_interval_s=0.01)
    task = asyncio.create_task(run_jobs(purger.jobs()))
    try:
        await asyncio.sleep(0.1)  # the first sweep ran: nothing was due
        assert gauge() == 0
        assert REGISTRY.get_sample_value("frs_intake_vault_objects") == 2
        clock.now = T0 + timedelta(hours=2)  # expired, and the next sweep is an hour away
        await asyncio.sleep(0.1)
        assert gauge() == 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- judged by the broker's clock (services/kit/clock.py) ------------------------------


class Broker:
    """A fake clock topic: the broker's time is T0 + the monotonic time elapsed."""

    def __init__(self) -> None:
        self.mono = 0.0
        self.up = True

    def monotonic(self) -> float:
        return self.mono

    async def stamp(self) -> int:
        if not self.up:
            raise ConnectionError("broker down")
        return int((T0.timestamp() + self.mono) * 1000)


def skipped() -> float:
    return REGISTRY.get_sample_value("frs_intake_purge_sweeps_skipped_total") or 0.0


@pytest.mark.parametrize("skew", [timedelta(minutes=10), timedelta(minutes=-10)],
                         ids=["fast", "slow"])
async def test_a_skewed_local_clock_neither_purges_early_nor_late(
        tmp_path: Path, skew: timedelta) -> None:
    vault, sink, broker = tmp_vault(tmp_path), EventSink(), Broker()
    early = fill(vault, 1, "C1", ttl_h=1)  # expires T0+1h
    late = fill(vault, 1, "C2", ttl_h=1.1)  # T0+1h06
    trusted = BrokerClock(broker.stamp, monotonic=broker.monotonic)
    purger = Purger(vault, dict, sink, lambda: T0 + timedelta(seconds=broker.mono) + skew,
                    trusted=trusted, skew_warn_s=5)
    broker.mono = 3600 - 60  # a minute before the first expiry, in the broker's time
    assert await purger.sweep() == []
    assert REGISTRY.get_sample_value("frs_intake_clock_skew_seconds") == pytest.approx(
        skew.total_seconds(), abs=0.01)
    broker.mono = 3600 + 60
    assert [e.vault_ref for e in await purger.sweep()] == early
    broker.mono = 3960 + 60
    assert [e.vault_ref for e in await purger.sweep()] == late


async def test_no_broker_sample_no_sweep(tmp_path: Path) -> None:
    vault, sink, broker = tmp_vault(tmp_path), EventSink(), Broker()
    fill(vault, 2, ttl_h=1)
    broker.up = False
    trusted = BrokerClock(broker.stamp, max_age_s=300, monotonic=broker.monotonic)
    # The local clock says everything expired long ago: it must not be believed.
    purger = Purger(vault, dict, sink, lambda: T0 + timedelta(days=30), trusted=trusted)
    before = skipped()
    assert await purger.sweep() == []
    assert skipped() == before + 1
    assert vault.index.count_stored() == 2 and sink.events == []
    broker.up = True
    broker.mono = 7200
    assert len(await purger.sweep()) == 2  # the next sweep, with a sample, does the work


async def test_an_old_sample_still_purges_by_its_lower_bound(tmp_path: Path) -> None:
    vault, sink, broker = tmp_vault(tmp_path), EventSink(), Broker()
    fill(vault, 1, ttl_h=1)
    trusted = BrokerClock(broker.stamp, resample_s=30, max_age_s=300,
                          monotonic=broker.monotonic)
    purger = Purger(vault, dict, sink, lambda: T0, trusted=trusted)
    assert await purger.sweep() == []  # sampled at T0
    broker.up = False
    before = skipped()
    broker.mono = 200  # resample fails; a 200 s old sample still serves
    assert await purger.sweep() == []
    assert skipped() == before
    broker.mono = 3700  # expired now by the hour-old sample's lower bound: purged
    assert len(await purger.sweep()) == 1
    assert skipped() == before and vault.index.count_stored() == 0


async def test_purges_are_announced_only_once_the_index_log_is_truncated(
        tmp_path: Path) -> None:
    import sqlite3

    vault, clock = tmp_vault(tmp_path), FakeClock(T0)
    refs = fill(vault, 2, ttl_h=1)
    wrapped = [vault.index.wrapped_key(r)[1] for r in refs]
    # A reader (dispatch shares the file) holds a snapshot: the checkpoint cannot finish,
    # so the destroyed keys may still sit in the WAL.
    reader = sqlite3.connect(tmp_path / "intake.db", isolation_level=None, timeout=0.1)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM vault_objects").fetchone()
    clock.now = T0 + timedelta(hours=2)
    sink = EventSink()
    purger = Purger(vault, dict, sink, clock)
    assert await purger.sweep() == [] and sink.events == []
    assert vault.index.count_stored() == 0  # destroyed all the same
    reader.execute("COMMIT")
    reader.close()
    assert sorted(e.vault_ref for e in await purger.sweep()) == sorted(refs)
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("intake.db*"))
    assert all(w is not None and w not in on_disk for w in wrapped)

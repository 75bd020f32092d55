"""Races on PostgreSQL: two results instances (two pools, one connection each) sweep for
due deadlines at the same moment, 1,000 times; each deadline is acted on by exactly one,
every time, also while a tracker batch rewrites the same probe. Then the same with two
results services on the real broker: one NoResponse and one DeletionOverdue per missed
deadline, and no tracker file in either host's state dir."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.events import DeletionOverdue, NoResponse, ProbeSettled
from services.results.pg_store import PgTracker
from services.results.tracking import ProbeState, ProviderTrack, deadline_key, due
from tests.conftest import ServiceProcess
from tests.integration.results.conftest import (
    cleared,
    count,
    dispatched,
    provider_record,
    publish,
    results_for,
    uid,
    wait_results,
)
from tests.integration.stores.conftest import empty_tables, shared_state
from tests.pg import PgServer

TRIALS = 1000
T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = T0 + timedelta(days=1)  # when both sweep: every deadline of overdue_probe passed


def overdue_probe(trial: int) -> ProbeState:
    """A probe whose answer and deletion receipt, from two providers, are all late."""
    late = T0 + timedelta(seconds=trial)
    return ProbeState(probe_id=f"prb-{trial}", cleared=["p1", "p2"], providers={
        pid: ProviderTrack(request_ref=f"ref-{trial}-{pid}", response_due_at=late,
                           deletion_due_at=late, deletion="pending") for pid in ("p1", "p2")})


# The four deadlines of an overdue_probe, by deadline_key.
EVERY_DEADLINE = sorted(f"{kind.TYPE}/{pid}" for kind in (NoResponse, DeletionOverdue)
                        for pid in ("p1", "p2"))


class Watch:
    """One instance's deadline action: records each deadline it reports."""

    def __init__(self, name: str, reported: list[tuple[str, str, str]]) -> None:
        self.name = name
        self.reported = reported

    async def __call__(self, state: ProbeState, acted: frozenset[str]) -> list[str]:
        await asyncio.sleep(0)  # the other instance runs while this one holds its claim
        keys = [k for k in map(deadline_key, due(state, NOW, False)) if k not in acted]
        self.reported += [(self.name, state.probe_id, k) for k in keys]
        return keys


class Instances:
    """Two results instances (two pools of one connection each): their trackers, their
    deadline sweeps, and what the sweeps reported since the last ``seed``."""

    def __init__(self, a: PgTracker, b: PgTracker) -> None:
        self.a, self.b = a, b
        self.reported: list[tuple[str, str, str]] = []
        self._watches = Watch("a", self.reported), Watch("b", self.reported)

    async def seed(self, trial: int) -> ProbeState:
        """A new overdue probe, committed by instance a's tracker."""
        probe = overdue_probe(trial)
        await self.a.put(probe)
        await self.a.commit()
        self.reported.clear()
        return probe

    def sweeps(self) -> list[Awaitable[int]]:
        """Both instances' sweeps, to run at once."""
        return [self.a.act_on_due(NOW, self._watches[0]),
                self.b.act_on_due(NOW, self._watches[1])]


@pytest.fixture
async def two(request: pytest.FixtureRequest) -> AsyncIterator[Instances]:
    a = await shared_state(request, "results", max_size=1)
    b = await shared_state(request, "results", max_size=1)
    yield Instances(PgTracker(a.pool), PgTracker(b.pool))
    await a.close()
    await b.close()


async def test_each_due_deadline_is_reported_by_one_instance(two: Instances) -> None:
    for trial in range(TRIALS):
        probe = await two.seed(trial)
        await asyncio.gather(*two.sweeps())
        assert sorted(k for _, p, k in two.reported if p == probe.probe_id) == EVERY_DEADLINE, (
            trial, two.reported)
        assert len({name for name, _, _ in two.reported}) == 1, (trial, two.reported)
    two.reported.clear()
    await asyncio.gather(*two.sweeps())
    assert two.reported == []  # nothing is left to report, by either


async def test_a_batch_rewriting_a_probe_during_the_sweeps_repeats_no_deadline(
        two: Instances) -> None:
    for trial in range(TRIALS):
        probe = await two.seed(trial)
        # Instance a's tracker commits another event of the probe (its deadlines still
        # open) while both sweep, and both sweep again after.
        touched = probe.model_copy(deep=True)
        touched.review_reasons = ["request"]
        await two.a.put(touched)
        await asyncio.gather(*two.sweeps(), two.a.commit())
        await asyncio.gather(*two.sweeps())
        assert sorted(k for _, _, k in two.reported) == EVERY_DEADLINE, (trial, two.reported)
        assert await two.b.get(probe.probe_id) == touched, trial


@pytest.mark.integration
async def test_two_results_services_report_each_missed_deadline_once(
        kafka_bootstrap: str, service_env: dict[str, str], pg_migrated: PgServer,
        tmp_path: Path) -> None:
    await empty_tables(pg_migrated)
    on_postgres = {"FRS_STATE_URL": pg_migrated.url("results"), "FRS_STATE_PASSWORD_FILE":
                   pg_migrated.settings("results")["FRS_STATE_PASSWORD_FILE"]}
    hosts = [ServiceProcess("results", {**service_env, **on_postgres,
                                        "FRS_STATE_DIR": str(tmp_path / host / "state")},
                            tmp_path / f"results-{host}.log") for host in ("a", "b")]
    for proc in hosts:
        proc.start(FRS_RESULTS_TICK_S="0.2", FRS_RESULTS_TIMER_ARM_MAX_WAIT_S="15")
    try:
        for proc in hosts:  # the tracker in the group, and the sweep running
            proc.wait_log("consumer started", timeout=120)
            proc.wait_log("deadline timer armed", timeout=60)
        provider, probes = uid("pdl"), [uid("prb-dl") for _ in range(6)]
        await publish(kafka_bootstrap, [
            provider_record(provider), *(cleared(p, provider) for p in probes),
            *(dispatched(p, provider, response_s=1, deletion_s=2) for p in probes)])
        for probe in probes:
            await wait_results(kafka_bootstrap, probe, lambda es: count(es, ProbeSettled) >= 1
                               and count(es, DeletionOverdue) >= 1, within_s=60)
        await asyncio.sleep(2.0)  # ten more ticks of each sweep
        for probe in probes:
            events = await results_for(kafka_bootstrap, probe)
            assert [count(events, kind) for kind in (NoResponse, DeletionOverdue,
                                                     ProbeSettled)] == [1, 1, 1], probe
        for host in ("a", "b"):  # the tracker's state is in the database only
            assert not (tmp_path / host / "state" / "results" / "tracker.sqlite3").exists()
    finally:
        for proc in hosts:
            assert proc.stop() == 0

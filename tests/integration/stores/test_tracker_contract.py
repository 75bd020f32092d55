"""The Tracker port (services/results/store.py), one contract for both implementations:
TrackerStore (SQLite) and PgTracker (PostgreSQL): a batch is seen at once and kept only
once committed, and the deadline sweep offers each due probe with the deadlines already
acted on, which it never offers again."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.events import DeletionOverdue, NoResponse
from services.results.pg_store import PgRequestRefs, PgTracker
from services.results.store import RequestRefs, Tracker, TrackerStore
from services.results.tracking import ProbeState, ProviderTrack, deadline_key, due
from tests.integration.stores.conftest import shared_state

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)
HOUR = timedelta(hours=1)
NO_RESPONSE = f"{NoResponse.TYPE}/a"
OVERDUE = f"{DeletionOverdue.TYPE}/a"

Open = Callable[[], Tracker]


@pytest.fixture
async def open_tracker(backend: str, request: pytest.FixtureRequest,
                       tmp_path: Path) -> AsyncIterator[Open]:
    """Opens the tracker of one instance on the backend's store (again: a restart)."""
    opened: list[Tracker] = []
    state = None if backend == "sqlite" else await shared_state(request, "results")

    def open_one() -> Tracker:
        tracker: Tracker = (TrackerStore(tmp_path / "results" / "tracker.sqlite3")
                            if state is None else PgTracker(state.pool))
        opened.append(tracker)
        return tracker

    yield open_one
    for tracker in opened:
        tracker.close()
    if state is not None:
        await state.close()


def sent(probe_id: str, response_in: timedelta, deletion_in: timedelta,
         ref: str | None = None) -> ProbeState:
    """A probe sent to provider ``a``: an answer and a deletion receipt are owed."""
    return ProbeState(probe_id=probe_id, cleared=["a"], providers={"a": ProviderTrack(
        request_ref=ref, response_due_at=T0 + response_in, deletion_due_at=T0 + deletion_in,
        deletion="pending")})


class Sweep:
    """A deadline sweep's action, as DeadlineWatch's: reports the due deadlines not yet
    acted on (and records them here), or fails on one probe like a bus that is down."""

    def __init__(self, now: datetime, fail_on: str | None = None) -> None:
        self.now = now
        self.fail_on = fail_on
        self.offered = 0
        self.reported: list[tuple[str, str]] = []

    async def __call__(self, state: ProbeState, acted: frozenset[str]) -> list[str]:
        self.offered += 1
        if state.probe_id == self.fail_on:
            raise ConnectionError("the bus is down")
        keys = [k for k in map(deadline_key, due(state, self.now, False)) if k not in acted]
        self.reported += [(state.probe_id, k) for k in keys]
        return keys


async def sweep(tracker: Tracker, now: datetime) -> list[tuple[str, str]]:
    """What one sweep at ``now`` reported."""
    action = Sweep(now)
    assert await tracker.act_on_due(now, action) == action.offered
    return sorted(action.reported)


async def test_an_unknown_probe_has_a_fresh_state(open_tracker: Open) -> None:
    assert await open_tracker().get("prb-none") == ProbeState(probe_id="prb-none")


async def test_a_batch_is_seen_at_once_and_kept_once_committed(open_tracker: Open) -> None:
    tracker = open_tracker()
    first = sent("prb-1", HOUR, 2 * HOUR, ref="ref-1")
    await tracker.put(first)
    assert await tracker.get("prb-1") == first  # the batch's next event sees it
    await tracker.commit()
    answered = first.model_copy(deep=True)
    answered.providers["a"].status = "answered"
    await tracker.put(answered)
    # Crashed before the batch committed: a restart finds the state before it (the batch
    # is replayed from Kafka, never half-kept).
    again = open_tracker()
    stored = await again.get("prb-1")
    assert stored == first
    assert stored.providers["a"].response_due_at == T0 + HOUR  # to the microsecond, in UTC
    await again.commit()  # nothing pending: nothing changes
    assert await again.get("prb-1") == first


async def test_committed_refs_are_looked_up_by_the_channels(
        open_tracker: Open, tmp_path: Path) -> None:
    tracker = open_tracker()
    await tracker.put(sent("prb-1", HOUR, HOUR, ref="ref-1"))
    await tracker.commit()
    if isinstance(tracker, PgTracker):
        found = await PgRequestRefs(tracker.pool).lookup("ref-1")
    else:
        reader = RequestRefs(tmp_path / "results" / "tracker.sqlite3")
        found = await reader.lookup("ref-1")
        reader.close()
    assert found == ("prb-1", "a")


async def test_each_deadline_is_reported_once_as_it_passes(open_tracker: Open) -> None:
    tracker = open_tracker()
    for state in (sent("prb-early", HOUR, 3 * HOUR), sent("prb-late", 2 * HOUR, 4 * HOUR),
                  ProbeState(probe_id="prb-none", cleared=[])):
        await tracker.put(state)
    await tracker.commit()
    assert await sweep(tracker, T0) == []
    assert await sweep(tracker, T0 + HOUR) == [("prb-early", NO_RESPONSE)]
    # Its NoResponse is out but the tracker has not consumed it yet: not reported again.
    assert await sweep(tracker, T0 + 2 * HOUR) == [("prb-late", NO_RESPONSE)]
    assert await sweep(tracker, T0 + 2 * HOUR + HOUR / 2) == []
    assert await sweep(tracker, T0 + 3 * HOUR) == [("prb-early", OVERDUE)]
    assert await sweep(tracker, T0 + 4 * HOUR) == [("prb-late", OVERDUE)]
    assert await sweep(tracker, T0 + 9 * HOUR) == []


async def test_a_deadline_the_tracker_consumed_is_due_no_more(open_tracker: Open) -> None:
    tracker = open_tracker()
    state = sent("prb-1", HOUR, 2 * HOUR)
    await tracker.put(state)
    await tracker.commit()
    assert await sweep(tracker, T0 + HOUR) == [("prb-1", NO_RESPONSE)]
    # The tracker consumes the NoResponse, then the provider's receipt comes in.
    consumed = state.model_copy(deep=True)
    consumed.providers["a"].status = "no_response"
    consumed.providers["a"].deletion = "confirmed"
    await tracker.put(consumed)
    await tracker.commit()
    assert await sweep(tracker, T0 + 5 * HOUR) == []


async def test_a_rewrite_before_the_reports_are_consumed_repeats_none(
        open_tracker: Open) -> None:
    tracker = open_tracker()
    await tracker.put(sent("prb-1", HOUR, 2 * HOUR))
    await tracker.commit()
    assert await sweep(tracker, T0 + 3 * HOUR) == [("prb-1", OVERDUE), ("prb-1", NO_RESPONSE)]
    # Another event of the probe rewrites its state before either report is consumed.
    touched = sent("prb-1", HOUR, 2 * HOUR)
    touched.review_reasons = ["request"]
    await tracker.put(touched)
    await tracker.commit()
    assert await sweep(tracker, T0 + 4 * HOUR) == []


async def test_a_failed_report_leaves_its_deadline_due_and_keeps_the_others(
        open_tracker: Open) -> None:
    tracker = open_tracker()
    for probe_id in ("prb-1", "prb-2", "prb-3"):
        await tracker.put(sent(probe_id, HOUR, 5 * HOUR))
    await tracker.commit()
    now = T0 + 2 * HOUR
    failing = Sweep(now, fail_on="prb-2")
    with pytest.raises(ConnectionError):
        await tracker.act_on_due(now, failing)
    # What was reported before the failure stays reported; the rest comes next time.
    again = await sweep(tracker, now)
    assert sorted(failing.reported + again) == [
        (p, NO_RESPONSE) for p in ("prb-1", "prb-2", "prb-3")]
    assert ("prb-2", NO_RESPONSE) in again


async def test_open_counts_follow_the_committed_state(open_tracker: Open) -> None:
    tracker = open_tracker()
    assert await tracker.open_counts() == (0, 0)
    await tracker.put(ProbeState(probe_id="p1", review="requested", providers={
        "a": ProviderTrack(deletion="overdue"), "b": ProviderTrack(deletion="overdue")}))
    await tracker.put(ProbeState(probe_id="p2", review="completed",
                                 providers={"a": ProviderTrack(deletion="overdue")}))
    await tracker.commit()
    assert await tracker.open_counts() == (1, 3)
    await tracker.put(ProbeState(probe_id="p1", review="completed", providers={
        "a": ProviderTrack(deletion="confirmed"), "b": ProviderTrack(deletion="pending")}))
    await tracker.commit()
    assert await tracker.open_counts() == (0, 1)

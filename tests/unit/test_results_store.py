"""The tracker store's counts behind the pending-review and overdue-receipt gauges."""

from __future__ import annotations

from pathlib import Path

from services.results.store import TrackerStore
from services.results.tracking import ProbeState, ProviderTrack


async def test_open_counts_follow_state(tmp_path: Path) -> None:
    store = TrackerStore(tmp_path / "t.sqlite")
    assert await store.open_counts() == (0, 0)
    await store.put(ProbeState(probe_id="p1", review="requested", providers={
        "a": ProviderTrack(deletion="overdue"), "b": ProviderTrack(deletion="pending")}))
    await store.put(ProbeState(probe_id="p2", review="completed",
                               providers={"a": ProviderTrack(deletion="overdue")}))
    assert await store.open_counts() == (1, 2)
    # A late receipt and a completed review take them off again.
    await store.put(ProbeState(probe_id="p1", review="completed", providers={
        "a": ProviderTrack(deletion="confirmed"), "b": ProviderTrack(deletion="pending")}))
    assert await store.open_counts() == (0, 1)
    store.close()

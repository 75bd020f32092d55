"""The tracker store's counts behind the pending-review and overdue-receipt gauges."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

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


async def test_a_file_of_the_older_layout_is_filled_in_and_counted_by_index(
        tmp_path: Path) -> None:
    """Before, the counts were JSON scans of every probe; a file written then gets the
    columns, filled from each state, and the counts read only the partial indexes."""
    path = tmp_path / "t.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE probes (probe_id TEXT PRIMARY KEY, state TEXT NOT NULL, next_due TEXT);
        CREATE TABLE request_refs (request_ref TEXT PRIMARY KEY, probe_id TEXT NOT NULL,
                                   provider_id TEXT NOT NULL);
    """)
    states = [ProbeState(probe_id="p1", review="requested", providers={
                  "a": ProviderTrack(deletion="overdue"), "b": ProviderTrack(deletion="overdue")}),
              ProbeState(probe_id="p2", providers={"a": ProviderTrack(deletion="pending")})]
    old.executemany("INSERT INTO probes VALUES (?, ?, NULL)",
                    [(s.probe_id, s.model_dump_json()) for s in states])
    old.commit()
    old.close()
    store = TrackerStore(path)
    assert await store.open_counts() == (1, 2)
    plans = [" ".join(str(c) for c in row) for q in (
        "SELECT count(*) FROM probes WHERE review_pending",
        "SELECT coalesce(sum(deletions_overdue), 0) FROM probes WHERE deletions_overdue > 0")
        for row in store._db.execute(f"EXPLAIN QUERY PLAN {q}")]
    assert all("USING" in p and "INDEX" in p for p in plans), plans
    store.close()
    assert await TrackerStore(path).open_counts() == (1, 2)  # opened again: nothing redone


def test_the_fill_in_is_one_transaction(tmp_path: Path) -> None:
    """A failure midway (here: the fill-in's UPDATE meets a state that is not JSON) leaves
    the old layout whole, so the next start does it all again."""
    path = tmp_path / "t.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE probes (probe_id TEXT PRIMARY KEY, state TEXT NOT NULL, next_due TEXT);
        INSERT INTO probes VALUES ('p1', 'not json', NULL);
    """)
    old.close()
    with pytest.raises(sqlite3.OperationalError):
        TrackerStore(path)
    check = sqlite3.connect(path)
    columns = {row[1] for row in check.execute("PRAGMA table_info(probes)")}
    check.close()
    assert "review_pending" not in columns and "deletions_overdue" not in columns

"""`frs oversight report` and `replay` as functions: windows, counts, the comparison."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.envelope import Envelope
from services.cli.common import Misuse
from services.cli.oversight import compare, parse_window, replayed_alerts, usage_report
from services.oversight.settings import OversightSettings
from tests.oversight_scenarios import HITS, LIMIT_ENV, LIMITS, T0, clean


def envelopes(events: list[tuple[str, object]]) -> list[Envelope]:
    return [Envelope(id=i, source="/t", type=e.TYPE, subject=None, time=T0,  # type: ignore[attr-defined]
                     causation_id=None, traceparent=None, event=e)  # type: ignore[arg-type]
            for i, e in events]


def test_windows_are_lengths_with_a_unit() -> None:
    assert parse_window("24h") == timedelta(hours=24)
    assert parse_window("7d") == timedelta(days=7)
    assert parse_window("30m") == timedelta(minutes=30)
    for bad in ("0h", "24", "h", "-1d", "1w"):
        with pytest.raises(Misuse):
            parse_window(bad)


def test_the_settings_carry_the_scripts_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in LIMIT_ENV.items():
        monkeypatch.setenv(name, value)
    assert OversightSettings().limits() == LIMITS


def test_report_counts_use_and_alerts_in_the_window() -> None:
    events = envelopes([*HITS[next(iter(HITS))]().events, *clean(probes=20, agents=10).events])
    alerts = replayed_alerts(events, LIMITS, T0 + timedelta(days=30))
    report = usage_report(events, alerts, T0 - timedelta(hours=1), T0 + timedelta(days=3))
    assert report["searches_by_agent"]["agent-sph"] == 4
    assert sum(report["searches_by_agent"].values()) == 24
    assert sum(report["sends_by_provider"].values()) == 20
    assert report["alerts_by_rule"] == {"searches_per_hour": 1}
    empty = usage_report(events, alerts, T0 + timedelta(days=5), T0 + timedelta(days=6))
    assert empty["searches_by_agent"] == {} and empty["alerts"] == []


def test_replay_comparison_names_what_differs() -> None:
    events = envelopes([e for rule in HITS for e in HITS[rule]().events])
    now = datetime.now(UTC)
    replayed = replayed_alerts(events, LIMITS, now)
    assert len(replayed) == len(HITS)
    assert compare(dict(replayed), replayed).equal
    live = dict(replayed)
    gone = live.popitem()[0]
    result = compare(live, replayed)
    assert not result.equal and result.missing_live == [gone] and result.extra_live == []

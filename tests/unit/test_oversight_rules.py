"""The oversight rules as plain functions: each scripted hit gives exactly one alert of its
rule, a clean run none, and redelivery or another order changes nothing."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from schemas.catalog import topic_for
from schemas.events import Event, UsageAlert, UsageRule
from services.oversight.handlers import (
    MemoryTables,
    Observation,
    RuleFailed,
    hopping,
    judge,
    tumbling,
)
from tests.oversight_scenarios import HITS, LIMITS, T0, Script, clean

LATER = T0 + timedelta(days=30)  # every review deadline of the scripts has passed


def run(events: Sequence[tuple[str, Event]]) -> list[UsageAlert]:
    tables = MemoryTables(LIMITS)
    alerts = [a for event_id, event in events
              for a in tables.feed(event_id, event)]
    return alerts + tables.due(LATER)


@pytest.mark.parametrize("rule", list(HITS))
def test_each_scripted_hit_gives_exactly_one_alert_of_its_rule(rule: UsageRule) -> None:
    alerts = run(HITS[rule]().events)
    assert [a.rule for a in alerts] == [rule], alerts


def test_a_clean_run_of_a_thousand_probes_gives_none() -> None:
    assert run(clean().events) == []


def test_redelivery_changes_nothing() -> None:
    events = [e for rule in HITS for e in HITS[rule]().events]
    twice = [e for e in events for _ in range(2)]
    assert run(twice) == run(events)


def test_the_same_hits_in_another_interleaving_of_subjects() -> None:
    scripts = [HITS[rule]().events for rule in HITS]
    mixed: list[tuple[str, Event]] = []
    rng = random.Random(7)
    queues = [list(s) for s in scripts]
    while any(queues):  # each script keeps its order (one probe's events do)
        queue = rng.choice([q for q in queues if q])
        mixed.append(queue.pop(0))
    one = {a.alert_id for a in run([e for s in scripts for e in s])}
    assert {a.alert_id for a in run(mixed)} == one and len(one) == len(HITS)


@pytest.mark.parametrize("seed", range(5))
def test_the_same_hits_whatever_order_the_topics_are_read_in(seed: int) -> None:
    # Each topic keeps its order; across topics nothing is promised.
    events = [e for rule in HITS for e in HITS[rule]().events]
    by_topic: dict[str, list[tuple[str, Event]]] = {}
    for item in events:
        by_topic.setdefault(topic_for(item[1]).name, []).append(item)
    rng = random.Random(seed)
    mixed: list[tuple[str, Event]] = []
    while any(by_topic.values()):
        mixed.append(rng.choice([q for q in by_topic.values() if q]).pop(0))
    assert sorted(a.alert_id for a in run(mixed)) == sorted(a.alert_id for a in run(events))


def test_alerts_carry_ids_and_digests_only() -> None:
    (alert,) = run(HITS[UsageRule.PURPOSE_SHOPPING]().events)
    assert alert.subject_kind == "image_digest" and len(alert.subject) == 64
    assert alert.evidence_ids == ["ev-ps-1", "ev-ps-2"]  # the denial, the resubmission
    assert alert.probe_ids == ["prb-ps-0", "prb-ps-1"]
    assert alert.window_end - alert.window_start == timedelta(seconds=LIMITS.shopping_window_s)


def test_resubmission_under_the_same_purpose_case_and_nexus_is_no_hit() -> None:
    s = Script("same")
    first = s.submit(0, T0, agent="agent-x", image="photo-x")
    s.deny(first, T0 + timedelta(minutes=1))
    s.submit(1, T0 + timedelta(minutes=5), agent="agent-x", image="photo-x")
    assert run(s.events) == []


def test_a_denial_consumed_before_its_submission_still_counts() -> None:
    events = HITS[UsageRule.PURPOSE_SHOPPING]().events
    swapped = [events[1], events[0], events[2]]  # PolicyDenied before ProbeSubmitted
    assert [a.rule for a in run(swapped)] == [UsageRule.PURPOSE_SHOPPING]


def test_review_rule_waits_for_the_deadline() -> None:
    tables = MemoryTables(LIMITS)
    for event_id, event in HITS[UsageRule.REVIEW_MISSING]().events:
        tables.feed(event_id, event)
    assert tables.due(T0 + timedelta(minutes=30)) == []
    assert [a.subject for a in tables.due(LATER)] == ["prb-rv-0"]
    assert tables.due(LATER) == []  # once


def test_windows() -> None:
    at = datetime(2026, 11, 30, 9, 5, tzinfo=UTC)
    assert tumbling(at, timedelta(hours=1)) == [(at.replace(minute=0),
                                                  at.replace(minute=0, hour=10))]
    windows = hopping(at, timedelta(days=1), timedelta(hours=1))
    assert len(windows) == 24 and all(s <= at < e for s, e in windows)
    assert windows == sorted(windows) and windows[-1][0] == at.replace(minute=0)


def test_a_rule_that_raises_names_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.oversight import handlers

    def broken(*_: object) -> list[object]:
        raise ZeroDivisionError

    rules: dict[object, object] = handlers.RULES  # type: ignore[assignment]
    monkeypatch.setitem(rules, ("agent", "exigent"), (broken,))
    names: dict[object, object] = handlers.RULE_NAMES  # type: ignore[assignment]
    monkeypatch.setitem(names, broken, UsageRule.EXIGENT_PER_WEEK)
    obs = Observation(kind="exigent", subject_kind="agent", subject="a", event_id="e",
                      probe_id="p", at=T0)
    with pytest.raises(RuleFailed, match="exigent_per_week failed: ZeroDivisionError"):
        judge(obs, None, LIMITS)

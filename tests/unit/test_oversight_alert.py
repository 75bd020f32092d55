"""The UsageAlert contract: a deterministic id, a topic of its own, audited, no images."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from schemas.catalog import (
    AUDITED_TOPICS,
    OVERSIGHT_ALERTS,
    OVERSIGHT_APP_ID,
    OVERSIGHT_INTERNAL,
    TOPIC_BY_NAME,
    topic_for,
)
from schemas.envelope import decode, encode
from schemas.events import UsageAlert, UsageReason, UsageRule, usage_alert_id

START = datetime(2026, 12, 1, 10, tzinfo=UTC)
END = START + timedelta(hours=1)


def alert(**change: object) -> UsageAlert:
    fields: dict[str, object] = {
        "alert_id": usage_alert_id(UsageRule.SEARCHES_PER_HOUR, "agent-7", START, END),
        "rule": UsageRule.SEARCHES_PER_HOUR, "reason": UsageReason.COUNT_OVER_LIMIT,
        "subject_kind": "agent", "subject": "agent-7", "window_start": START,
        "window_end": END, "count": 4, "threshold": 3, "evidence_ids": ["e1", "e2"],
        "probe_ids": ["prb-1"], "observed_at": START + timedelta(minutes=5)}
    return UsageAlert.model_validate({**fields, **change})


def test_the_id_is_a_function_of_rule_subject_and_window() -> None:
    one = usage_alert_id(UsageRule.SEARCHES_PER_HOUR, "agent-7", START, END)
    assert one == usage_alert_id(UsageRule.SEARCHES_PER_HOUR, "agent-7", START, END)
    assert one != usage_alert_id(UsageRule.SEARCHES_PER_DAY, "agent-7", START, END)
    assert one != usage_alert_id(UsageRule.SEARCHES_PER_HOUR, "agent-8", START, END)
    assert one != usage_alert_id(UsageRule.SEARCHES_PER_HOUR, "agent-7", END, END + (END - START))
    assert alert().alert_id == one


def test_an_alert_with_another_id_is_refused() -> None:
    with pytest.raises(ValidationError):
        alert(alert_id=usage_alert_id(UsageRule.SEARCHES_PER_DAY, "agent-7", START, END))


def test_alerts_travel_on_their_own_audited_topic_keyed_by_subject() -> None:
    assert topic_for(alert()) is OVERSIGHT_ALERTS
    assert OVERSIGHT_ALERTS in AUDITED_TOPICS
    assert "frs.dlq.oversight" in TOPIC_BY_NAME
    record = encode(alert(), "/frs/oversight")
    assert record.key == b"agent-7"
    assert decode(record.headers, record.key, record.value).event == alert()


def test_the_app_topics_are_named_by_its_id_and_not_audited() -> None:
    for topic in OVERSIGHT_INTERNAL:
        assert topic.name.startswith(f"{OVERSIGHT_APP_ID}-")
        assert topic not in AUDITED_TOPICS and topic.name not in TOPIC_BY_NAME
        assert topic.partitions == 3


def test_evidence_is_ids_only_and_bounded() -> None:
    with pytest.raises(ValidationError):
        alert(evidence_ids=["e"] * 101)
    with pytest.raises(ValidationError):
        alert(image="aGVsbG8=")  # no field for bytes: extra fields are refused


def test_oversight_reads_the_pipeline_and_writes_only_its_alerts_dlq_and_own_topics() -> None:
    from schemas.catalog import TOPICS
    from services.kit.acls import allows, load

    doc = load()
    written = {t.name for t in (*TOPICS, *OVERSIGHT_INTERNAL)
               if allows(doc, "oversight", "WRITE", t.name)}
    assert written == {OVERSIGHT_ALERTS.name, "frs.dlq.oversight",
                       *(t.name for t in OVERSIGHT_INTERNAL)}
    assert {p for p in doc.principals if allows(doc, p, "WRITE", OVERSIGHT_ALERTS.name)} == {
        "oversight"}
    for name in ("frs.probe.events", "frs.policy.decisions", "frs.dispatch.events",
                 "frs.results.events"):
        assert allows(doc, "oversight", "READ", name)
    assert not allows(doc, "oversight", "READ", "frs.probe.requests")  # sealed images
    assert allows(doc, "audit", "READ", OVERSIGHT_ALERTS.name)

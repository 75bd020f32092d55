"""The oversight worker on the real broker: scripted hits through the pipeline's topics,
one alert each and none for ordinary use; SIGKILL mid-stream and restart; two workers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer

from schemas.catalog import OVERSIGHT_ALERTS, PROBE_EVENTS, dlq_topic
from schemas.envelope import Envelope
from schemas.events import Event, UsageAlert, UsageRule
from services.cli.oversight import (
    INPUT_TOPICS,
    compare,
    envelopes,
    live_alerts,
    replayed_alerts,
    usage_report,
)
from services.kit.reader import read_topic
from services.oversight.handlers import MemoryTables
from tests.conftest import ServiceProcess
from tests.helpers import log_text, wait_for
from tests.integration.oversight.support import alert_records, publish
from tests.oversight_scenarios import HITS, LIMITS, clean

Worker = Callable[[str], ServiceProcess]
RULE_OF: dict[str, str] = {}  # alert id -> rule and subject, for failure messages
REASSIGNED = "Executing _on_partitions_assigned"  # faust's log line of a new assignment


def expected(events: Sequence[tuple[str, Event]]) -> set[str]:
    """The alert ids the rules make of these events, without faust."""
    tables = MemoryTables(LIMITS)
    alerts = [a for event_id, event in events for a in tables.feed(event_id, event)]
    alerts += tables.due(datetime.now(UTC))
    RULE_OF.update({a.alert_id: f"{a.rule.value} {a.subject}" for a in alerts})
    return {a.alert_id for a in alerts}


def ours(alerts: list[UsageAlert], ns: str) -> list[UsageAlert]:
    return [a for a in alerts if any(p.startswith(f"prb-{ns}") for p in a.probe_ids)]


def wait_alerts(bootstrap: str, ns: str, want: set[str], timeout: float = 180.0
                ) -> list[UsageAlert]:
    found: list[UsageAlert] = []

    def complete() -> bool:
        found[:] = ours(asyncio.run(alert_records(bootstrap)), ns)
        return {a.alert_id for a in found} >= want

    wait_for(complete, timeout=timeout, interval=1.0,
             what=lambda: "alerts " + ", ".join(
                 RULE_OF.get(i, i) for i in sorted(want - {a.alert_id for a in found})))
    return found


def hits(ns: str) -> list[tuple[str, Event]]:
    return [e for rule in HITS for e in HITS[rule](ns).events]


def test_one_alert_per_scripted_hit_and_none_for_ordinary_use(
        kafka_bootstrap: str, oversight: Worker) -> None:
    ns = f"h{uuid.uuid4().hex[:6]}-"
    events = hits(ns) + clean(ns=ns).events
    want = expected(events)
    assert len(want) == len(HITS)
    asyncio.run(publish(kafka_bootstrap, events))
    worker = oversight("one").start()
    found = wait_alerts(kafka_bootstrap, ns, want)
    worker.wait_log("usage alert", count=len(HITS))
    # A moment more: nothing else comes, and nothing twice.
    asyncio.run(asyncio.sleep(3))
    found = ours(asyncio.run(alert_records(kafka_bootstrap)), ns)
    alerts = {a.alert_id: a for a in found}  # a record again is the same alert, by id
    assert all(alerts[a.alert_id] == a for a in found)
    assert Counter(a.rule for a in alerts.values()) == Counter(list(HITS))
    assert set(alerts) == want
    print(f"alert records {len(found)} for {len(want)} alerts")
    # `frs oversight replay`'s check: the same alerts from the topics alone.
    inputs = envelopes(asyncio.run(read_topic(kafka_bootstrap, INPUT_TOPICS)))
    replayed = replayed_alerts(inputs, LIMITS, datetime.now(UTC))
    mine = {k: v for k, v in replayed.items() if v in ours(list(replayed.values()), ns)}
    assert compare(alerts, mine).equal


def test_sigkill_mid_stream_then_restart_loses_and_repeats_nothing(
        kafka_bootstrap: str, oversight: Worker) -> None:
    ns = f"k{uuid.uuid4().hex[:6]}-"
    first, second = [], []
    for rule in HITS:  # each scenario half before the kill, half after
        events = HITS[rule](ns).events
        first += events[: len(events) // 2 + 1]
        second += events[len(events) // 2 + 1:]
    filler = clean(probes=600, agents=300, ns=ns).events
    want = expected(first + filler + second)
    asyncio.run(publish(kafka_bootstrap, first + filler))
    worker = oversight("killed").start()
    worker.wait_log("usage alert", timeout=90)  # mid-stream: some alerts out, not all
    worker.kill()
    asyncio.run(publish(kafka_bootstrap, second))
    restarted = oversight("restarted").start()
    restarted.wait_log("Restore complete", timeout=60)  # its tables, from the changelogs
    wait_alerts(kafka_bootstrap, ns, want)
    asyncio.run(asyncio.sleep(3))
    found = ours(asyncio.run(alert_records(kafka_bootstrap)), ns)
    assert {a.alert_id for a in found} == want  # none lost, none made up
    # None twice: a kill between an alert's send and its state's changelog write can
    # publish it again, but as the same record (CloudEvent id = alert id, same body, same
    # headers), so what every consumer keys by id sees each alert exactly once.
    records: dict[str, set[tuple[bytes | None, bytes | None, tuple[Any, ...]]]] = {}
    mine = []
    for raw, env in asyncio.run(read_topic(kafka_bootstrap, [OVERSIGHT_ALERTS.name])):
        assert isinstance(env, Envelope) and isinstance(env.event, UsageAlert)
        if env.id in want:
            assert env.id == env.event.alert_id
            records.setdefault(env.id, set()).add((raw.key, raw.value, tuple(raw.headers)))
            mine.append(env)
    assert set(records) == want and all(len(r) == 1 for r in records.values())
    # `frs oversight report` and `replay` count by alert id: each one once.
    now = datetime.now(UTC)
    seen = usage_report([], live_alerts(mine), now - timedelta(days=3650), now)["alerts"]
    assert sorted(a["alert_id"] for a in seen) == sorted(want)
    print(f"alert records {len(found)} for {len(want)} alerts")


def test_two_workers_split_the_partitions_and_alert_as_one(
        kafka_bootstrap: str, oversight: Worker) -> None:
    ns = f"w{uuid.uuid4().hex[:6]}-"
    a, b = oversight("a").start(), oversight("b").start()
    a.wait_log("Ready", timeout=60)
    b.wait_log("Ready", timeout=60)
    events = hits(ns) + clean(probes=400, agents=200, ns=ns).events
    want = expected(events)
    asyncio.run(publish(kafka_bootstrap, events))
    wait_alerts(kafka_bootstrap, ns, want)
    asyncio.run(asyncio.sleep(3))
    found = ours(asyncio.run(alert_records(kafka_bootstrap)), ns)
    assert sorted(x.alert_id for x in found) == sorted(want)
    assert a.proc is not None and a.proc.poll() is None
    assert b.proc is not None and b.proc.poll() is None
    # A dead worker's partitions move in seconds (session 6 s), not faust's minute; then
    # its tables come from the standby copy or the changelogs (as long as they take).
    assigned = log_text(a.log_path).count(REASSIGNED)
    b.kill()
    started = time.monotonic()
    # Seconds, not faust's minute: 6 s of session plus a rebalance, with room for a
    # machine loaded by the suite's other brokers.
    a.wait_log(REASSIGNED, count=assigned + 1, timeout=45)
    print(f"partitions moved {time.monotonic() - started:.1f} s after the worker's death")
    later = f"{ns}later-"
    events = HITS[UsageRule.SEARCHES_PER_HOUR](later).events
    asyncio.run(publish(kafka_bootstrap, events))
    wait_alerts(kafka_bootstrap, later, expected(events), timeout=180)


def test_a_record_it_cannot_read_goes_to_the_dlq_with_the_reason(
        kafka_bootstrap: str, oversight: Worker) -> None:
    key = f"prb-dlq-{uuid.uuid4().hex[:8]}".encode()

    async def send_garbage() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(PROBE_EVENTS.name, b"not an event", key=key)
        finally:
            await producer.stop()

    asyncio.run(send_garbage())
    oversight("dlq").start()

    def dead_lettered() -> bool:
        records = asyncio.run(read_topic(kafka_bootstrap, [dlq_topic("oversight").name]))
        return any(raw.key == key and dict(raw.headers).get("frs_error_code")
                   == b"not_cloudevent" for raw, _ in records)

    wait_for(dead_lettered, timeout=60, interval=1.0, what="the record on frs.dlq.oversight")

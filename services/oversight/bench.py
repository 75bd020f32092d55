"""`frs bench oversight`: events/s through the oversight rules, against a bare faust agent
that only counts the same records, in the same run on the same broker.

Both read one scratch topic of ordinary pipeline events (a submission, a clearance and a
send per probe, spread over many agents and providers), from its first record to its last:
the baseline until it has counted every record, the oversight app until every observation
the events make has been judged (both through its repartition topic and its tables'
changelogs). Start-up and rebalance are outside both figures. The scratch topics are
deleted at the end."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient

from schemas.catalog import HOUR_MS, Topic, oversight_topics
from schemas.envelope import encode
from schemas.events import (
    ClaimCheck,
    ClearedProvider,
    Event,
    PolicyCleared,
    ProbeSubmitted,
    ProviderDispatched,
    RegistryVersions,
)
from schemas.types import MINIMAL_FIELDS, ImageSource, Purpose, Transport
from services.kit.kafka import KafkaSettings, client_options
from services.kit.publisher import Publisher
from services.kit.topics import ensure_topics
from services.oversight.handlers import ProbeFacts, observe
from services.oversight.settings import OversightSettings

T0 = datetime(2026, 3, 2, 8, tzinfo=UTC)
TARGET_RATIO = 0.5


def ordinary(probes: int, run: str) -> list[tuple[str, Event]]:
    """Ordinary use: 1,000 agents, a search each every few hours, one provider each."""
    out: list[tuple[str, Event]] = []
    for i in range(probes):
        probe, agent, at = f"prb-b{run}-{i}", f"agent-{i % 1000}", T0 + timedelta(seconds=7 * i)
        image = f"{i:064x}"[-64:]
        out.append((f"ev-{run}-{i}-s", ProbeSubmitted(
            probe_id=probe, request_id=f"req-{probe}", case_id=f"CASE-{i % 1000}",
            agent_id=agent, purpose=Purpose.FINANCIAL_FRAUD, roi_refs=["ROI-1"],
            image_source=ImageSource.SURVEILLANCE, nexus=[], exigent=False,
            unedited_attestation=True, vault_ref=f"v/{probe}", image_format="jpeg",
            received_sha256=image, sanitized_sha256=image, expires_at=at + timedelta(days=30),
            submitted_at=at)))
        out.append((f"ev-{run}-{i}-c", PolicyCleared(
            probe_id=probe, case_id=f"CASE-{i % 1000}",
            cleared=[ClearedProvider(provider_id=f"prov-{i % 5}", transport=Transport.HTTPS,
                                     fields=list(MINIMAL_FIELDS))],
            policy_digest="a" * 64, registry_versions=RegistryVersions(), decided_at=at,
            claim=ClaimCheck(vault_ref=f"v/{probe}", agent_id=agent, sanitized_sha256=image,
                             expires_at=at + timedelta(days=30)))))
        out.append((f"ev-{run}-{i}-d", ProviderDispatched(
            probe_id=probe, provider_id=f"prov-{i % 5}", dispatch_id=f"d-{probe}",
            transport=Transport.HTTPS, fields_sent=list(MINIMAL_FIELDS),
            request_ref=f"ref-{probe}", sent_at=at, response_due_at=at + timedelta(hours=1),
            deletion_due_at=at + timedelta(days=1))))
    return out


def observations_of(events: list[tuple[str, Event]]) -> int:
    facts: dict[str, ProbeFacts] = {}
    total = 0
    for event_id, event in events:
        probe = getattr(event, "probe_id")  # noqa: B009 - every bench event has one
        known, said = observe(event_id, event, facts.get(probe))
        if known is not None:
            facts[probe] = known
        total += len(said)
    return total


async def _timed(app: Any, progress: Callable[[], int], goal: int, max_s: float
                 ) -> float:
    """Seconds from the first record's progress to ``goal``."""
    app.finalize()
    await app.start()
    try:
        deadline = time.monotonic() + max_s
        first: float | None = None
        while time.monotonic() < deadline:
            done = progress()
            if done and first is None:
                first = time.monotonic()
            if done >= goal and first is not None:
                return max(time.monotonic() - first, 1e-6)
            await asyncio.sleep(0.005)
        raise TimeoutError(f"{progress()} of {goal} in {max_s:.0f} s")
    finally:
        await app.stop()


def _judged() -> int:
    from services.oversight.app import OBSERVATIONS_OUT

    return int(sum(s.value for m in OBSERVATIONS_OUT.collect() for s in m.samples
                   if s.name.endswith("_total")))


async def run(settings: OversightSettings, probes: int = 5000, max_s: float = 600.0,
              kafka: KafkaSettings | None = None) -> dict[str, Any]:
    from services.oversight.app import build, build_counter

    tag = uuid.uuid4().hex[:8]
    scratch = Topic(f"frs-bench-oversight-{tag}", "probe_id", 3, HOUR_MS, "delete", (),
                    "bench input")
    app_id, counter_id = f"frs-oversight-bench-{tag}", f"frs-oversight-bench-{tag}-count"
    topics = (scratch, *oversight_topics(app_id))
    bootstrap = settings.kafka_bootstrap
    await ensure_topics(bootstrap, topics=topics, kafka=kafka)
    events = ordinary(probes, tag)
    try:
        async with Publisher(bootstrap, "/frs/bench", kafka=kafka or settings) as publisher:
            futures = []
            for event_id, event in events:
                record = encode(event, "/frs/bench", event_id=event_id)
                futures.append(await publisher.send_raw(scratch.name, record.key,
                                                        record.value, record.headers))
            await asyncio.gather(*futures)
        counter, counted = build_counter(settings, scratch.name, counter_id)
        baseline_s = await _timed(counter, counted, len(events), max_s)
        goal = observations_of(events)
        before = _judged()
        rules = build(settings.model_copy(update={"app_id": app_id}), inputs=[scratch.name])
        rules_s = await _timed(rules, lambda: _judged() - before, goal, max_s)
    finally:
        admin = AIOKafkaAdminClient(**client_options(kafka, bootstrap))
        await admin.start()
        try:
            await admin.delete_topics([t.name for t in topics])
        finally:
            await admin.close()
    baseline = len(events) / baseline_s
    through_rules = len(events) / rules_s
    return {
        "bench": "oversight", "events": len(events), "observations": goal,
        "baseline": {"what": "bare faust agent counting records", "seconds": baseline_s,
                     "events_per_s": baseline},
        "rules": {"what": "oversight app: observe, repartition, judge, tables",
                  "seconds": rules_s, "events_per_s": through_rules},
        "ratio": through_rules / baseline, "target_ratio": TARGET_RATIO,
    }

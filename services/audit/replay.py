"""Replay: read the topics straight from Kafka (not from the audit store) and cross-check
them with the store: every record present exactly once, with the same bytes digest."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.catalog import REGISTRY_TOPICS
from schemas.envelope import DecodeError, Envelope
from schemas.events import ComplianceViolation, ProbeRequested
from schemas.types import probe_id_for, utcnow
from services.audit.handlers import AuditPorts, on_record
from services.audit.invariants import Invariants, InvariantSettings
from services.audit.store import AuditStore, PgLocation, open_store, value_digest
from services.kit.routing import RawRecord

Coord = tuple[str, int, int]


@dataclass
class ReplayReport:
    topic_records: int = 0
    store_leaves: int = 0
    missing: list[Coord] = field(default_factory=list)       # in Kafka, not in the store
    digest_mismatch: list[Coord] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)   # one event id, two contents
    # The same event (topic, id and bytes) published again at another offset (a producer
    # retried after a crash): one event, kept once or at each offset, not a duplicate.
    redelivered: int = 0
    unknown_to_topics: list[Coord] = field(default_factory=list)  # should still be in Kafka
    aged_out: int = 0                                         # older than the topic's retention
    violations_found: int = 0                                 # invariants run again on the topics
    unreported_violations: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.digest_mismatch or self.duplicate_ids
                    or self.unknown_to_topics or self.unreported_violations)

    def to_json(self) -> dict[str, Any]:
        def coords(items: list[Coord]) -> list[str]:
            return [f"{t}[{p}]@{o}" for t, p, o in items[:100]]
        return {"ok": self.ok, "topic_records": self.topic_records,
                "store_leaves": self.store_leaves, "missing": coords(self.missing),
                "missing_count": len(self.missing),
                "digest_mismatch": coords(self.digest_mismatch),
                "duplicate_ids": self.duplicate_ids[:100], "redelivered": self.redelivered,
                "unknown_to_topics": coords(self.unknown_to_topics),
                "aged_out": self.aged_out, "violations_found": self.violations_found,
                "unreported_violations": [{"offending_event_id": e, "invariant": i}
                                          for e, i in self.unreported_violations[:100]]}


def store_index(directory: Path | PgLocation
                ) -> tuple[dict[Coord, str], list[tuple[Coord, str | None]]]:
    """(coordinate -> value digest, [(coordinate, event id)] in log order) from the leaves."""
    store = open_store(directory, readonly=True)
    try:
        digests: dict[Coord, str] = {}
        order: list[tuple[Coord, str | None]] = []
        for _, leaf in store.iter_leaves():
            body = json.loads(leaf)
            coord = (str(body["topic"]), int(body["partition"]), int(body["offset"]))
            digests[coord] = str(body["value_sha256"])
            order.append((coord, body.get("id")))
        return digests, order
    finally:
        store.close()


def subjects_for(records: list[tuple[RawRecord, Envelope | DecodeError]],
                 probe: str | None = None, case: str | None = None) -> set[str] | None:
    """The CloudEvent subjects (probe ids, and request ids for requests) to replay, or None
    for everything."""
    if probe is None and case is None:
        return None
    subjects: set[str] = set()
    if probe is not None:
        subjects.add(probe)
    for _, decoded in records:
        if not isinstance(decoded, Envelope):
            continue
        data = decoded.event
        if isinstance(data, ProbeRequested) and probe_id_for(data.request_id) == probe:
            subjects.add(data.request_id)
        if case is not None and getattr(data, "case_id", None) == case:
            if isinstance(data, ProbeRequested):
                subjects |= {data.request_id, probe_id_for(data.request_id)}
            elif decoded.subject:
                subjects.add(decoded.subject)
    return subjects


def selected(records: list[tuple[RawRecord, Envelope | DecodeError]], subjects: set[str] | None,
             since: datetime | None) -> list[tuple[RawRecord, Envelope | DecodeError]]:
    out = []
    for raw, decoded in records:
        if subjects is not None and (not isinstance(decoded, Envelope)
                                     or decoded.subject not in subjects):
            continue
        if since is not None and (not isinstance(decoded, Envelope) or decoded.time < since):
            continue
        out.append((raw, decoded))
    return out


def for_invariants(records: list[tuple[RawRecord, Envelope | DecodeError]],
                   subjects: set[str] | None) -> list[tuple[RawRecord, Envelope | DecodeError]]:
    """What the invariants need to judge ``subjects``: their records from the beginning,
    and every registry record whoever it is about (the trusted keys that verify decisions,
    the providers' entries)."""
    if subjects is None:
        return records
    registries = {t.name for t in REGISTRY_TOPICS}
    return [r for r in records if r[0].topic in registries] + selected(records, subjects, None)


def timeline(records: list[tuple[RawRecord, Envelope | DecodeError]],
             directory: Path | PgLocation) -> list[dict[str, Any]]:
    """A probe's or case's events in time order, straight from the topics, each marked
    with whether the audit log holds it."""
    digests, _ = store_index(directory)
    rows = []
    for raw, decoded in records:
        if not isinstance(decoded, Envelope):
            continue
        coord = (raw.topic, raw.partition, raw.offset)
        rows.append({"time": decoded.time.isoformat(), "type": decoded.type,
                     "subject": decoded.subject, "id": decoded.id,
                     "causationid": decoded.causation_id, "source": decoded.source,
                     "at": f"{raw.topic}[{raw.partition}]@{raw.offset}",
                     "in_audit_log": digests.get(coord) == value_digest(raw.value)})
        if decoded.time_source != "event":
            rows[-1]["time_source"] = decoded.time_source  # the record's, not the event's
    return sorted(rows, key=lambda r: str(r["time"]))


def cross_check(records: list[tuple[RawRecord, Envelope | DecodeError]],
                directory: Path | PgLocation,
                subjects: set[str] | None = None, since: datetime | None = None) -> ReplayReport:
    """Every record of ``records`` (all of them, or the selected subjects since a time)
    must be in the store once with the same bytes; with no selection, every leaf that
    the topics still retain must be in the topics too."""
    report = ReplayReport()
    digests, order = store_index(directory)
    report.store_leaves = len(order)
    # (topic, event id) -> the digests recorded under it (a DLQ keeps its record's id).
    contents: dict[tuple[str, str], set[str]] = {}
    for coord, eid in order:
        if eid is not None:
            contents.setdefault((coord[0], eid), set()).add(digests[coord])
    earliest: dict[tuple[str, int], int] = {}
    latest: dict[tuple[str, int], int] = {}
    in_topics: set[Coord] = set()
    full = subjects is None and since is None
    for raw, decoded in selected(records, subjects, since) if not full else records:
        coord = (raw.topic, raw.partition, raw.offset)
        in_topics.add(coord)
        key = (raw.topic, raw.partition)
        earliest[key] = min(earliest.get(key, raw.offset), raw.offset)
        latest[key] = max(latest.get(key, raw.offset), raw.offset)
        report.topic_records += 1
        digest = digests.get(coord)
        if digest is None and isinstance(decoded, Envelope) and value_digest(raw.value) in \
                contents.get((raw.topic, decoded.id), ()):
            report.redelivered += 1  # recorded once, at its first offset
        elif digest is None:
            report.missing.append(coord)
        elif digest != value_digest(raw.value):
            report.digest_mismatch.append(coord)
    ids = Counter(eid for (topic, _, _), eid in order
                  if eid is not None and not topic.startswith("frs.dlq."))
    id_contents: dict[str, set[str]] = {}
    for (topic, eid), found in contents.items():
        if not topic.startswith("frs.dlq."):
            id_contents.setdefault(eid, set()).update(found)
    # One id at two places is a duplicate when the contents differ (a reused id); the
    # same bytes again are a redelivery (the SQLite store keeps both offsets).
    for eid, n in ids.items():
        if n > 1 and len(id_contents[eid]) > 1:
            report.duplicate_ids.append(eid)
        elif n > 1:
            report.redelivered += n - 1
    report.duplicate_ids.sort()
    if full:
        for coord, _ in order:
            if coord in in_topics:
                continue
            start = earliest.get((coord[0], coord[1]))
            end = latest.get((coord[0], coord[1]), -1)
            if start is not None and start <= coord[2] <= end:
                report.unknown_to_topics.append(coord)  # Kafka has the range, not this one
            elif start is None or coord[2] < start:
                report.aged_out += 1
            # else: newer than the snapshot of the topics; the next replay sees it
    return report



class _ReplayClock:
    """Event time while records are fed (a dispatch is 'seen' when it was sent), the
    wall clock for the deadline rules at the end."""

    def __init__(self) -> None:
        self.now: datetime = utcnow()

    def __call__(self) -> datetime:
        return self.now


async def replay_violations(records: list[tuple[RawRecord, Envelope | DecodeError]],
                            settings: InvariantSettings) -> set[tuple[str, str]]:
    """Run the invariants again over the topics' records, independently of the audit
    service: (offending event id, invariant) for every violation found."""
    clock = _ReplayClock()
    ordered = sorted(records, key=lambda r: r[1].time if isinstance(r[1], Envelope)
                     else datetime.min.replace(tzinfo=UTC))
    found: set[tuple[str, str]] = set()
    with tempfile.TemporaryDirectory(prefix="frs-replay-") as tmp:
        store = AuditStore(Path(tmp))
        try:
            invariants = Invariants(store, settings, clock)
            ports = AuditPorts(store, invariants)
            for raw, decoded in ordered:
                if isinstance(decoded, Envelope):
                    clock.now = decoded.time
                out = await on_record(raw.topic, raw.partition, raw.offset, raw.value,
                                      decoded, ports, raw.headers)
                found |= {(v.offending_event_id, v.invariant.value) for v in out
                          if isinstance(v, ComplianceViolation)}
            clock.now = utcnow()
            found |= {(v.offending_event_id, v.invariant.value) for v in invariants.tick()}
        finally:
            store.close()
    return found


def reported_violations(records: list[tuple[RawRecord, Envelope | DecodeError]]
                        ) -> set[tuple[str, str]]:
    return {(d.event.offending_event_id, d.event.invariant.value) for _, d in records
            if isinstance(d, Envelope) and isinstance(d.event, ComplianceViolation)}

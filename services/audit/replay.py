"""Replay: read the topics straight from Kafka (not from the audit store) and cross-check
them with the store: every record present exactly once, with the same bytes digest."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.envelope import Envelope
from services.audit.store import AuditStore, value_digest
from services.kit.bus import RawRecord

Coord = tuple[str, int, int]


@dataclass
class ReplayReport:
    topic_records: int = 0
    store_leaves: int = 0
    missing: list[Coord] = field(default_factory=list)       # in Kafka, not in the store
    digest_mismatch: list[Coord] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)   # one event id at two places
    unknown_to_topics: list[Coord] = field(default_factory=list)  # should still be in Kafka
    aged_out: int = 0                                         # older than the topic's retention

    @property
    def ok(self) -> bool:
        return not (self.missing or self.digest_mismatch or self.duplicate_ids
                    or self.unknown_to_topics)

    def to_json(self) -> dict[str, Any]:
        def coords(items: list[Coord]) -> list[str]:
            return [f"{t}[{p}]@{o}" for t, p, o in items[:100]]
        return {"ok": self.ok, "topic_records": self.topic_records,
                "store_leaves": self.store_leaves, "missing": coords(self.missing),
                "missing_count": len(self.missing),
                "digest_mismatch": coords(self.digest_mismatch),
                "duplicate_ids": self.duplicate_ids[:100],
                "unknown_to_topics": coords(self.unknown_to_topics),
                "aged_out": self.aged_out}


def store_index(directory: Path) -> tuple[dict[Coord, str], list[tuple[Coord, str | None]]]:
    """(coordinate -> value digest, [(coordinate, event id)] in log order) from the leaves."""
    store = AuditStore(directory, readonly=True)
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


def cross_check(records: list[tuple[RawRecord, Envelope | Exception]], directory: Path,
                probe: str | None = None) -> ReplayReport:
    report = ReplayReport()
    digests, order = store_index(directory)
    report.store_leaves = len(order)
    earliest: dict[tuple[str, int], int] = {}
    latest: dict[tuple[str, int], int] = {}
    in_topics: set[Coord] = set()
    for raw, decoded in records:
        if probe is not None and (not isinstance(decoded, Envelope) or decoded.subject != probe):
            continue
        coord = (raw.topic, raw.partition, raw.offset)
        in_topics.add(coord)
        key = (raw.topic, raw.partition)
        earliest[key] = min(earliest.get(key, raw.offset), raw.offset)
        latest[key] = max(latest.get(key, raw.offset), raw.offset)
        report.topic_records += 1
        digest = digests.get(coord)
        if digest is None:
            report.missing.append(coord)
        elif digest != value_digest(raw.value):
            report.digest_mismatch.append(coord)
    ids = Counter(eid for (topic, _, _), eid in order
                  if eid is not None and not topic.startswith("frs.dlq."))
    report.duplicate_ids = sorted(eid for eid, n in ids.items() if n > 1)
    if probe is None:
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

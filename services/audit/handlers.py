"""Audit handlers: every record on every frs.* topic becomes one leaf in the store, the
compliance invariants see every new record, and the log's head is signed as checkpoints."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from schemas.catalog import TOPIC_FOR_EVENT
from schemas.envelope import LOG_APPEND_TIME, DecodeError, Envelope, Headers, decode
from schemas.events import (
    CandidatesReceived,
    CheckpointPublished,
    ComplianceViolation,
    Event,
    ProbeRequested,
    ProviderDispatched,
)
from services.audit.checkpoint import Signer, sign_checkpoint
from services.audit.invariants import Invariants
from services.audit.store import AuditLog, LeafMeta, canonical, value_digest

CHECKPOINT_TOPIC = TOPIC_FOR_EVENT[CheckpointPublished].name


@dataclass(frozen=True)
class AuditPorts:
    store: AuditLog
    invariants: Invariants | None = None


@dataclass(frozen=True)
class CheckpointPolicy:
    signer: Signer
    origin: str
    every_n: int
    interval_s: float
    clock: Callable[[], datetime]


def _header(headers: Headers | None, name: str) -> str | None:
    for key, raw in headers or ():
        if key == name:
            return raw.decode("utf-8", "replace")[:256]
    return None


def leaf_for(topic: str, partition: int, offset: int, value: bytes | None,
             decoded: Envelope | DecodeError,
             headers: Headers | None = None) -> tuple[LeafMeta, dict[str, Any]]:
    body: dict[str, Any] = {"topic": topic, "partition": partition, "offset": offset,
                            "value_sha256": value_digest(value)}
    if isinstance(decoded, DecodeError):
        # Unknown bytes might hold anything: keep the digest and the error, not the bytes;
        # the CloudEvent attributes it claims (headers, never the image) stay searchable.
        body["error"] = decoded.code
        claimed = {a: _header(headers, f"ce_{a}") for a in ("id", "type", "source", "subject",
                                                            "time")}
        body.update({a: v for a, v in claimed.items() if v is not None})
        meta = LeafMeta(topic, partition, offset, claimed["id"], claimed["type"],
                        claimed["subject"], claimed["time"])
        return meta, body
    data = decoded.event.model_dump(mode="json")
    if isinstance(decoded.event, ProbeRequested):
        # The encrypted image never enters the audit log: its digest stands in for it.
        data["image"] = {"ciphertext_sha256": hashlib.sha256(
            decoded.event.image.ciphertext.encode()).hexdigest()}
    time = decoded.time.isoformat()
    body.update({
        "id": decoded.id, "source": decoded.source, "type": decoded.type,
        "subject": decoded.subject, "time": time,
        "causationid": decoded.causation_id, "traceparent": decoded.traceparent, "data": data,
    })
    if decoded.time_source != "event":
        # The event had no time of its own: say whose clock "time" is. Only then, so a
        # leaf of an event with its own time is byte for byte what it always was.
        body["time_source"] = decoded.time_source
    meta = LeafMeta(topic, partition, offset, decoded.id, decoded.type, decoded.subject, time)
    return meta, body


async def on_record(topic: str, partition: int, offset: int, value: bytes | None,
                    decoded: Envelope | DecodeError, ports: AuditPorts,
                    headers: Headers | None = None) -> list[Event]:
    meta, body = leaf_for(topic, partition, offset, value, decoded, headers)
    invariants = ports.invariants
    if invariants is None or not invariants.concerns(topic, decoded):
        ports.store.append(meta, body)  # nothing can fail after it: no savepoint needed
        return []
    with ports.store.savepoint():
        if ports.store.append(meta, body) is None:
            return []  # redelivered: already in the log, its invariants already checked
        out: list[ComplianceViolation] = invariants.observe(topic, headers, value, decoded)
    return list(out)


# Stands for the index in a queued leaf's JSON until the sequencer knows it; random per
# process, so no record's data can hold it.
_SLOT = f"frs-index-slot-{secrets.token_hex(16)}"
_SLOT_JSON = canonical(_SLOT)
# Undecodable records whose raw bytes the invariants read: types that never carry an image.
_RAW_TYPES = frozenset({CandidatesReceived.TYPE, ProviderDispatched.TYPE})


def queued_leaf(body: dict[str, Any]) -> tuple[bytes, int]:
    """The leaf's canonical JSON without its index, and the byte the index goes in at:
    the sequencer makes the very bytes ``canonical({**body, "index": i})`` would be."""
    text = canonical({**body, "index": _SLOT})
    at = text.find(_SLOT_JSON)
    assert at > 0 and text.count(_SLOT_JSON) == 1
    return text[:at] + text[at + len(_SLOT_JSON):], at


def invariant_input(headers: Headers | None, key: bytes | None, value: bytes | None,
                    decoded: Envelope | DecodeError) -> bytes:
    """What the sequencer needs to run the invariants on a record again: the record as
    consumed (decoded again there) and its time as decoded here. An undecodable record's
    bytes only when the rules read them (never a type that carries an image)."""
    def b64(raw: bytes | None) -> str | None:
        return None if raw is None else base64.b64encode(raw).decode()

    doc: dict[str, Any] = {"headers": [[k, b64(v)] for k, v in headers or ()], "key": b64(key)}
    if isinstance(decoded, DecodeError):
        doc["error"] = [decoded.code, decoded.message]
        if _header(headers, "ce_type") in _RAW_TYPES:
            doc["value"] = b64(value)
    else:
        doc |= {"value": b64(value), "time": decoded.time.isoformat(),
                "time_source": decoded.time_source}
    return canonical(doc)


def observe_queued(topic: str, record: bytes,
                   invariants: Invariants) -> list[ComplianceViolation]:
    """The invariants on a sequenced record, from what ``invariant_input`` kept."""
    doc = json.loads(record)

    def raw(text: str | None) -> bytes | None:
        return None if text is None else base64.b64decode(text)

    headers: Headers = [(k, raw(v) or b"") for k, v in doc["headers"]]
    value = raw(doc.get("value"))
    decoded: Envelope | DecodeError
    if "error" in doc:
        decoded = DecodeError(*doc["error"])
    else:
        source = doc["time_source"]
        at = datetime.fromisoformat(doc["time"])
        decoded = decode(headers, raw(doc["key"]), value,
                         timestamp_ms=None if source == "event" else round(
                             at.timestamp() * 1000),
                         timestamp_type=LOG_APPEND_TIME
                         if source == "kafka_log_append_time" else 0)
    return invariants.observe(topic, headers, value, decoded)


def checkpoint_due(store: AuditLog, policy: CheckpointPolicy, last_at: float,
                   now: float) -> bool:
    last = store.last_checkpoint()
    last_size = last.tree_size if last else 0
    if store.size == 0 or (last is not None and store.size == last_size):
        return False  # nothing (new) to sign
    if store.size - last_size >= policy.every_n:
        return True
    if now - last_at < policy.interval_s:
        return False
    # Our own checkpoints come back as leaves: those alone do not call for another one,
    # or an idle log would sign a new head every interval forever.
    return last is None or store.count_since(last_size, CHECKPOINT_TOPIC) > 0


def make_checkpoint(store: AuditLog, policy: CheckpointPolicy) -> CheckpointPublished:
    """Sign the committed head, keep it in the store, return the event to publish."""
    root = store.frontier.root()
    size = store.frontier.size
    note = sign_checkpoint(policy.signer, policy.origin, size, root)
    now = policy.clock()
    store.add_checkpoint(size, root, note, now.isoformat())
    return CheckpointPublished(origin=policy.origin, tree_size=size,
                               root_hash=base64.b64encode(root).decode(), note=note,
                               published_at=now)

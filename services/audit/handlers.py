"""Audit handler: every record on every frs.* topic becomes one leaf in the store."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from schemas.envelope import DecodeError, Envelope
from schemas.events import Event, ProbeRequested
from services.audit.store import AuditStore, LeafMeta, canonical, value_digest


@dataclass(frozen=True)
class AuditPorts:
    store: AuditStore


def leaf_for(topic: str, partition: int, offset: int, value: bytes | None,
             decoded: Envelope | DecodeError) -> tuple[LeafMeta, bytes]:
    body: dict[str, Any] = {"topic": topic, "partition": partition, "offset": offset,
                            "value_sha256": value_digest(value)}
    if isinstance(decoded, DecodeError):
        # Unknown bytes might hold anything: keep the digest and the error, not the bytes.
        body["error"] = decoded.code
        meta = LeafMeta(topic, partition, offset, None, None, None, None)
        return meta, canonical(body)
    data = decoded.event.model_dump(mode="json")
    if isinstance(decoded.event, ProbeRequested):
        # The encrypted image never enters the audit log: its digest stands in for it.
        data["image"] = {"ciphertext_sha256": hashlib.sha256(
            decoded.event.image.ciphertext.encode()).hexdigest()}
    body.update({
        "id": decoded.id, "source": decoded.source, "type": decoded.type,
        "subject": decoded.subject, "time": decoded.time.isoformat(),
        "causationid": decoded.causation_id, "traceparent": decoded.traceparent, "data": data,
    })
    meta = LeafMeta(topic, partition, offset, decoded.id, decoded.type, decoded.subject,
                    decoded.time.isoformat())
    return meta, canonical(body)


async def on_record(topic: str, partition: int, offset: int, value: bytes | None,
                    decoded: Envelope | DecodeError, ports: AuditPorts) -> list[Event]:
    meta, leaf = leaf_for(topic, partition, offset, value, decoded)
    ports.store.append(meta, leaf)
    return []

"""CloudEvents 1.0 in Kafka binary mode: ``ce_*`` headers, JSON data, key = partition key.

``encode`` turns a model into a Kafka record; ``decode`` turns a record back into the
model and its envelope, raising ``DecodeError`` with a machine-readable code for anything
that is not a well-formed event of a known type.
"""

from __future__ import annotations

import os
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.exceptions import BaseCloudEventException
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from pydantic import ValidationError

from schemas.events import EVENTS_BY_TYPE, Event

_FORMAT = JSONFormat()
CONTENT_TYPE = "application/json"
CAUSATION_EXT = "causationid"
TRACEPARENT_EXT = "traceparent"
Headers = list[tuple[str, bytes]]
_REQUIRED_HEADERS = ("ce_id", "ce_source", "ce_specversion", "ce_time")


@dataclass(frozen=True)
class Record:
    key: bytes
    value: bytes
    headers: Headers


@dataclass(frozen=True)
class Envelope:
    id: str
    source: str
    type: str
    subject: str | None
    time: datetime
    causation_id: str | None
    traceparent: str | None
    event: Event


class DecodeError(Exception):
    """A record that is not a valid event; ``code`` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child_traceparent(parent: str | None) -> str:
    """Same trace, new span: one probe is followed through every service."""
    if parent and len(parent) == 55 and parent.count("-") == 3:
        version, trace_id, _span, flags = parent.split("-")
        return f"{version}-{trace_id}-{os.urandom(8).hex()}-{flags}"
    return new_traceparent()


def encode(
    event: Event,
    source: str,
    *,
    causation_id: str | None = None,
    traceparent: str | None = None,
    event_id: str | None = None,
    time: datetime | None = None,
) -> Record:
    key = event.partition_key()
    attributes: dict[str, object] = {
        "id": event_id or str(uuid.uuid4()),
        "source": source,
        "type": event.TYPE,
        "subject": key,
        "time": time or datetime.now(UTC),
        "datacontenttype": CONTENT_TYPE,
        "partitionkey": key,
        TRACEPARENT_EXT: traceparent or new_traceparent(),
    }
    if causation_id:
        attributes[CAUSATION_EXT] = causation_id
    message = ce_kafka.to_binary(
        CloudEvent(attributes, event.model_dump_json().encode()), _FORMAT
    )
    headers = [(k, v) for k, v in message.headers.items() if k != "ce_partitionkey"]
    return Record(key=key.encode(), value=message.value, headers=headers)


def decode(headers: Headers, key: bytes | None, value: bytes | None) -> Envelope:
    header_map = {k: v for k, v in headers}
    if "ce_type" not in header_map:
        raise DecodeError("not_cloudevent", "no ce_type header: not a binary-mode CloudEvent")
    # The SDK would invent a missing id or time; an event without them is not ours.
    absent = [h for h in _REQUIRED_HEADERS if h not in header_map]
    if absent:
        raise DecodeError("bad_envelope", f"missing header(s): {', '.join(absent)}")
    try:
        ce = ce_kafka.from_binary(
            ce_kafka.KafkaMessage(headers=header_map, key=key, value=value or b""),
            _FORMAT,
            CloudEvent,
        )
    except (BaseCloudEventException, ValueError, UnicodeDecodeError) as exc:
        raise DecodeError("bad_envelope", type(exc).__name__) from None
    model = EVENTS_BY_TYPE.get(ce.get_type())
    if model is None:
        raise DecodeError("unknown_type", f"unknown event type {ce.get_type()!r}")
    data = ce.get_data()
    if not isinstance(data, dict):
        raise DecodeError("not_json", "data is not a JSON object")
    try:
        event = model.model_validate(data)
    except ValidationError as exc:
        # Field locations and error types only: input values may be sensitive.
        summary = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['type']}" for e in exc.errors()[:10]
        )
        raise DecodeError("invalid_event", summary) from None
    time = ce.get_time() or datetime.now(UTC)
    return Envelope(
        id=ce.get_id(),
        source=ce.get_source(),
        type=ce.get_type(),
        subject=ce.get_subject(),
        time=time,
        causation_id=ce.get_extension(CAUSATION_EXT),
        traceparent=ce.get_extension(TRACEPARENT_EXT),
        event=event,
    )

"""CloudEvents 1.0 in Kafka binary mode: ``ce_*`` headers, JSON data, key = partition key.

``encode`` turns a model into a Kafka record; ``decode`` turns a record back into the
model and its envelope, raising ``DecodeError`` with a machine-readable code for anything
that is not a well-formed event of a known type.

``time`` is optional in CloudEvents 1.0. When a producer leaves it out, the Kafka record's
timestamp stands in for it and ``Envelope.time_source`` says so: ``kafka_create_time``
(the producing client's clock, CreateTime topics) or ``kafka_log_append_time`` (the
broker's clock, LogAppendTime topics); ``event`` when the event carried its own time.
"""

from __future__ import annotations

import os
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.exceptions import BaseCloudEventException, CloudEventValidationError
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from pydantic import ValidationError

from schemas.events import EVENTS_BY_TYPE, Event

_FORMAT = JSONFormat()
CONTENT_TYPE = "application/json"
CAUSATION_EXT = "causationid"
TRACEPARENT_EXT = "traceparent"
SPECVERSION = "1.0"
Headers = list[tuple[str, bytes]]
# CloudEvents 1.0's required attributes (ce_type is checked first: without it a record is
# not a CloudEvent at all). The SDK would invent a missing id: an event without one is
# not ours. ``time`` is optional: the record's timestamp stands in for it.
_REQUIRED_HEADERS = ("ce_id", "ce_source", "ce_specversion")
TimeSource = Literal["event", "kafka_create_time", "kafka_log_append_time"]
LOG_APPEND_TIME = 1  # ConsumerRecord.timestamp_type when the broker set the timestamp
# RFC 3339 date-time (section 5.6); "T" and "Z" may be lower case (section 5.6, note).
# What the SDK parses as JSON data (its JSONFormat's pattern): anything else is not ours.
_JSON_CONTENT = JSONFormat.JSON_CONTENT_TYPE_PATTERN
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


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
    time_source: TimeSource = "event"


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


def _event_time(raw: bytes) -> datetime:
    text = raw.decode("utf-8", "replace")
    if not _RFC3339.fullmatch(text):
        raise DecodeError("bad_time", f"ce_time {text[:64]!r} is not an RFC 3339 date-time")
    try:
        return datetime.fromisoformat(text.upper())  # the offset as sent, like before
    except ValueError:  # matches the grammar but names no instant (2026-02-30, :60 seconds)
        raise DecodeError("bad_time", f"ce_time {text[:64]!r} is not a valid date-time") from None


def _record_time(timestamp_ms: int | None, timestamp_type: int | None
                 ) -> tuple[datetime, TimeSource]:
    if timestamp_ms is None or timestamp_ms < 0:
        raise DecodeError("bad_envelope", "missing header(s): ce_time, and the record has no "
                                          "timestamp to stand in for it")
    source: TimeSource = ("kafka_log_append_time" if timestamp_type == LOG_APPEND_TIME
                          else "kafka_create_time")
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC), source


def decode(headers: Headers, key: bytes | None, value: bytes | None, *,
           timestamp_ms: int | None = None, timestamp_type: int | None = None) -> Envelope:
    """``timestamp_ms``/``timestamp_type``: the Kafka record's (aiokafka ConsumerRecord
    ``timestamp``, ``timestamp_type``), used only when the event has no ``ce_time``."""
    header_map = {k: v for k, v in headers}
    if "ce_type" not in header_map:
        raise DecodeError("not_cloudevent", "no ce_type header: not a binary-mode CloudEvent")
    absent = [h for h in _REQUIRED_HEADERS if h not in header_map]
    if absent:
        raise DecodeError("bad_envelope", f"missing header(s): {', '.join(absent)}")
    specversion = header_map["ce_specversion"].decode("utf-8", "replace")
    if specversion != SPECVERSION:
        raise DecodeError("unsupported_specversion",
                          f"specversion {specversion[:32]!r}; only {SPECVERSION} is accepted")
    # The time is ours to read (the SDK's parser is laxer than RFC 3339, and it would
    # invent "now" for an event without one).
    raw_time = header_map.pop("ce_time", None)
    time_source: TimeSource = "event"
    if raw_time is not None:
        time = _event_time(raw_time)
    else:
        time, time_source = _record_time(timestamp_ms, timestamp_type)
    try:
        # The SDK checks the attributes only: the data is parsed once, below, straight
        # from the bytes into the model (its JSON parse was a third of a decode).
        ce = ce_kafka.from_binary(
            ce_kafka.KafkaMessage(headers=header_map, key=key, value=b""),
            _FORMAT,
            CloudEvent,
        )
    except CloudEventValidationError as exc:
        names = ", ".join(sorted(exc.errors))[:200]  # header names only, never values
        raise DecodeError("bad_envelope", f"invalid attribute(s): {names}") from None
    except (BaseCloudEventException, ValueError, UnicodeDecodeError) as exc:
        raise DecodeError("bad_envelope", type(exc).__name__) from None
    model = EVENTS_BY_TYPE.get(ce.get_type())
    if model is None:
        raise DecodeError("unknown_type", f"unknown event type {ce.get_type()!r}")
    return Envelope(
        id=ce.get_id(),
        source=ce.get_source(),
        type=ce.get_type(),
        subject=ce.get_subject(),
        time=time,
        causation_id=ce.get_extension(CAUSATION_EXT),
        traceparent=ce.get_extension(TRACEPARENT_EXT),
        event=_event(model, value, ce.get_datacontenttype()),
        time_source=time_source,
    )


def _event(model: type[Event], value: bytes | None, content_type: str | None) -> Event:
    """The data as ``model``: ``not_json`` unless it is a JSON object, ``invalid_event``
    if the object is not a valid ``model``."""
    if not value or not _JSON_CONTENT.match(content_type or CONTENT_TYPE):
        raise DecodeError("not_json", "data is not a JSON object")
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        errors = exc.errors()
        if any(e["type"] == "json_invalid" or (not e["loc"] and e["type"] == "model_type")
               for e in errors):
            raise DecodeError("not_json", "data is not a JSON object") from None
        # Field locations and error types only: input values may be sensitive.
        summary = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['type']}" for e in errors[:10]
        )
        raise DecodeError("invalid_event", summary) from None

"""CloudEvents from any client: ``time`` is optional (the Kafka record's timestamp stands in
and the envelope and the audit leaf say so), a ``time`` that is sent must be RFC 3339, and
only specversion 1.0 is accepted, with a code of its own."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from schemas.envelope import DecodeError, Headers, decode, encode
from schemas.events import DispatchFailed, DispatchFailure
from services.audit.handlers import leaf_for
from services.audit.store import canonical

SENT = datetime(2026, 11, 26, 12, 0, 0, 250000, tzinfo=UTC)
RECORD_MS = 1_790_000_000_123  # a Kafka record timestamp, ms since the epoch
RECORD_TIME = datetime.fromtimestamp(RECORD_MS / 1000, UTC)
CREATE_TIME, LOG_APPEND_TIME = 0, 1  # aiokafka ConsumerRecord.timestamp_type
EVENT = DispatchFailed(probe_id="prb-1", provider_id="p1", reason=DispatchFailure.SUSPENDED,
                       detail="", failed_at=SENT)


def hand_built(drop: tuple[str, ...] = (), **extra: str) -> tuple[Headers, bytes, bytes]:
    """Headers as a foreign client writes them: the four required attributes only, unless
    ``extra`` adds some (``ce_time="..."``); ``drop`` removes any."""
    headers = {"ce_id": "ev-1", "ce_source": "/kcat/upstream", "ce_specversion": "1.0",
               "ce_type": EVENT.TYPE, **extra}
    return ([(k, v.encode()) for k, v in headers.items() if k not in drop], b"prb-1",
            EVENT.model_dump_json().encode())


def without_time() -> tuple[Headers, bytes, bytes]:
    record = encode(EVENT, "/frs/dispatch", time=SENT)
    return [h for h in record.headers if h[0] != "ce_time"], record.key, record.value


def test_an_event_with_its_own_time_keeps_it_whatever_the_record_says() -> None:
    record = encode(EVENT, "/frs/dispatch", time=SENT)
    for ts_type in (None, CREATE_TIME, LOG_APPEND_TIME):
        env = decode(record.headers, record.key, record.value, timestamp_ms=RECORD_MS,
                     timestamp_type=ts_type)
        assert (env.time, env.time_source) == (SENT, "event")
    assert decode(record.headers, record.key, record.value).time_source == "event"


@pytest.mark.parametrize(("ts_type", "source"), [(CREATE_TIME, "kafka_create_time"),
                                                  (LOG_APPEND_TIME, "kafka_log_append_time")])
def test_without_time_the_record_timestamp_stands_in_and_says_whose(
        ts_type: int, source: str) -> None:
    headers, key, value = without_time()
    env = decode(headers, key, value, timestamp_ms=RECORD_MS, timestamp_type=ts_type)
    assert env.time == RECORD_TIME and env.time.tzinfo is not None
    assert env.time_source == source
    assert env.event == EVENT and env.subject == "prb-1"


@pytest.mark.parametrize("timestamp_ms", [None, -1])
def test_without_time_or_record_timestamp_the_record_is_refused(timestamp_ms: int | None) -> None:
    headers, key, value = without_time()
    with pytest.raises(DecodeError) as err:
        decode(headers, key, value, timestamp_ms=timestamp_ms, timestamp_type=CREATE_TIME)
    assert err.value.code == "bad_envelope" and "ce_time" in err.value.message


def test_only_the_required_attributes_hand_built_decode() -> None:
    # No time, subject, content-type, dataschema, traceparent or causation: all optional.
    env = decode(*hand_built(), timestamp_ms=RECORD_MS, timestamp_type=CREATE_TIME)
    assert (env.id, env.source, env.type) == ("ev-1", "/kcat/upstream", EVENT.TYPE)
    assert env.subject is None and env.traceparent is None and env.causation_id is None
    assert env.event == EVENT and env.time_source == "kafka_create_time"


def test_the_optional_attributes_are_accepted_when_present() -> None:
    optional = {"content-type": "application/json", "ce_dataschema": "https://example.org/s.json",
                "ce_subject": "prb-1", "ce_time": "2026-11-26T12:00:00.25Z"}
    headers, key, value = hand_built((), **optional)
    env = decode(headers, key, value)
    assert (env.subject, env.time, env.time_source) == ("prb-1", SENT, "event")


@pytest.mark.parametrize("missing", ["ce_id", "ce_source", "ce_specversion"])
def test_each_required_attribute_is_required(missing: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode(*hand_built(drop=(missing,)), timestamp_ms=RECORD_MS, timestamp_type=0)
    assert err.value.code == "bad_envelope" and missing in err.value.message


def test_an_empty_attribute_is_named() -> None:
    with pytest.raises(DecodeError) as err:
        decode(*hand_built(ce_source="", ce_time="2026-11-26T12:00:00Z"))
    assert (err.value.code, err.value.message) == ("bad_envelope", "invalid attribute(s): source")


@pytest.mark.parametrize("version", ["0.3", "1.1", "1", ""])
def test_a_specversion_other_than_1_0_has_its_own_code(version: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode(*hand_built(ce_specversion=version, ce_time="2026-11-26T12:00:00Z"))
    assert err.value.code == "unsupported_specversion"
    assert repr(version) in err.value.message and "1.0" in err.value.message


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-26T12:00:00Z", datetime(2026, 11, 26, 12, tzinfo=UTC)),
    ("2026-11-26t12:00:00z", datetime(2026, 11, 26, 12, tzinfo=UTC)),
    ("2026-11-26T12:00:00.123456789Z", datetime(2026, 11, 26, 12, 0, 0, 123456, tzinfo=UTC)),
    ("2026-11-26T07:00:00-05:00", datetime(2026, 11, 26, 7, tzinfo=timezone(-timedelta(hours=5)))),
    ("2026-11-26T17:30:00+05:30", datetime(2026, 11, 26, 12, tzinfo=UTC)),
])
def test_rfc3339_times_are_read(text: str, expected: datetime) -> None:
    env = decode(*hand_built(ce_time=text))
    assert env.time == expected and env.time_source == "event"


@pytest.mark.parametrize("text", [
    "2026-11-26",  # a date is not a date-time
    "2026-11-26T12:00:00",  # no offset: local time of nowhere
    "2026-11-26 12:00:00Z",  # ISO 8601 allows the space, RFC 3339's grammar does not
    "20261126T120000Z",  # ISO 8601 basic format
    "2026-11-26T12:00Z",  # no seconds
    "2026-02-30T12:00:00Z",  # the grammar, but no such day
    "2026-11-26T12:00:00+0500",
    "yesterday",
    "",
])
def test_a_time_that_is_not_rfc3339_is_refused(text: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode(*hand_built(ce_time=text), timestamp_ms=RECORD_MS, timestamp_type=0)
    assert err.value.code == "bad_time" and "ce_time" in err.value.message


def test_the_audit_leaf_says_when_the_time_is_the_records() -> None:
    headers, key, value = without_time()
    env = decode(headers, key, value, timestamp_ms=RECORD_MS, timestamp_type=LOG_APPEND_TIME)
    meta, body = leaf_for("frs.dispatch.events", 0, 5, value, env)
    assert body["time"] == meta.time == RECORD_TIME.isoformat()
    assert body["time_source"] == "kafka_log_append_time"
    assert json.loads(canonical(body))["time_source"] == "kafka_log_append_time"


def test_the_leaf_of_an_event_with_its_own_time_is_unchanged() -> None:
    # Existing logs hold leaves without time_source: an event with a time still gets
    # exactly that leaf, so logs written before and after this change read alike.
    record = encode(EVENT, "/frs/dispatch", time=SENT)
    env = decode(record.headers, record.key, record.value, timestamp_ms=RECORD_MS,
                 timestamp_type=CREATE_TIME)
    _meta, body = leaf_for("frs.dispatch.events", 0, 5, record.value, env)
    assert set(body) == {"topic", "partition", "offset", "value_sha256", "id", "source",
                         "type", "subject", "time", "causationid", "traceparent", "data"}
    assert body["time"] == SENT.isoformat()

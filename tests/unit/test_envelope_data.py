"""The envelope's data is parsed once, from the bytes into the model: anything but a JSON
object is ``not_json``, a JSON object that is not the model ``invalid_event``, as when the
SDK parsed the data first."""

from __future__ import annotations

import json

import pytest

from schemas.envelope import DecodeError, decode, encode
from tests.unit.test_contract import candidates


@pytest.mark.parametrize("value", [b"", b"[]", b'"text"', b"1" * 5000, b"null",
                                   b"\xff\xfe{", b'{"probe_id": '])
def test_data_that_is_not_a_json_object(value: bytes) -> None:
    record = encode(candidates(1), "/x")
    with pytest.raises(DecodeError) as err:
        decode(record.headers, record.key, value)
    assert err.value.code == "not_json"


def test_data_of_another_content_type_is_not_ours() -> None:
    record = encode(candidates(1), "/x")
    headers = [(k, b"text/plain" if k == "content-type" else v) for k, v in record.headers]
    with pytest.raises(DecodeError) as err:
        decode(headers, record.key, record.value)
    assert err.value.code == "not_json"


def test_an_invalid_object_names_fields_and_error_types_never_values() -> None:
    record = encode(candidates(2), "/x")
    data = json.loads(record.value)
    data["candidates"] = list(reversed(data["candidates"]))  # the model's own check
    data["probe_id"] = 12345
    with pytest.raises(DecodeError) as err:
        decode(record.headers, record.key, json.dumps(data).encode())
    assert err.value.code == "invalid_event"
    assert "probe_id" in err.value.message and "12345" not in err.value.message


def test_a_valid_record_round_trips() -> None:
    event = candidates(3)
    record = encode(event, "/x", causation_id="c-1")
    decoded = decode(record.headers, record.key, record.value)
    assert decoded.event == event and decoded.causation_id == "c-1"

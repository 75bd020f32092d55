"""Log lines carry where an exception was raised, never what it said."""

from __future__ import annotations

import json
import logging
import sys

from services.kit.logs import JsonFormatter


def _raise_with_secret() -> None:
    secret = "probe-bytes-ffd8ffe0"
    raise ValueError(f"cannot parse {secret}")


def test_exception_line_has_type_and_location_but_no_message() -> None:
    try:
        _raise_with_secret()
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "handler failed", None,
                                   sys.exc_info())
    line = json.loads(JsonFormatter("unit").format(record))
    assert line["exc_type"] == "ValueError"
    innermost, caller = line["exc_at"].split(" < ")
    assert innermost.startswith("test_kit_logs.py:") and caller.startswith("test_kit_logs.py:")
    assert int(innermost.split(":")[1]) < int(caller.split(":")[1])
    assert "probe-bytes" not in json.dumps(line) and "cannot parse" not in json.dumps(line)

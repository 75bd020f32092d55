"""JSON log lines on stderr. Callers pass ids and codes as ``extra``; never event data."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_FRAMES = 6
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value if isinstance(value, (int, float, bool)) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: exception messages can quote the input that caused them.
            line["exc_type"] = record.exc_info[0].__name__
            # Where it was raised, as file:line of the innermost frames: a crash can be
            # traced without a message or a local value ever reaching the log.
            line["exc_at"] = " < ".join(
                f"{Path(frame.filename).name}:{frame.lineno}"
                for frame in reversed(traceback.extract_tb(record.exc_info[2])[-_FRAMES:]))
        return json.dumps(line, separators=(",", ":"))


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Never below WARNING, whatever the level: at DEBUG botocore logs request and response
    # bodies (a Rekognition image, a KMS data key) and urllib3 logs URLs.
    # Pillow logs EXIF values (GPS among them) at DEBUG.
    for noisy in ("aiokafka", "kafka", "botocore", "boto3", "s3transfer", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

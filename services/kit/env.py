"""How a setting shared by every service is declared: one environment variable name,
the same everywhere (FRS_KAFKA_BOOTSTRAP, FRS_STATE_DIR, ...). Imports no client."""

from __future__ import annotations

import os
import socket
from typing import Any

from pydantic import AliasChoices, Field


def shared(name: str, default: Any, description: str) -> Any:
    """A setting with the same environment variable name in every service."""
    return Field(default, validation_alias=AliasChoices(name), description=description)


def default_instance_id() -> str:
    """Host and process: unique among the instances on one host, as `frs status` shows."""
    return f"{socket.gethostname()}-{os.getpid()}"

"""How a setting shared by every service is declared: one environment variable name,
the same everywhere (FRS_KAFKA_BOOTSTRAP, FRS_STATE_DIR, ...). Imports no client."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, Field


def shared(name: str, default: Any, description: str) -> Any:
    """A setting with the same environment variable name in every service."""
    return Field(default, validation_alias=AliasChoices(name), description=description)

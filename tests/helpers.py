"""Small helpers for integration tests: wait for events on real topics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from schemas.envelope import DecodeError, Envelope
from services.kit.bus import RawRecord, read_topic

Found = list[tuple[RawRecord, Envelope | DecodeError]]


async def wait_for(
    bootstrap: str,
    topics: Sequence[str],
    predicate: Callable[[RawRecord, Envelope | DecodeError], bool],
    count: int = 1,
    timeout: float = 30.0,  # noqa: ASYNC109 - a polling deadline, not a cancel scope
) -> Found:
    """Read the topics until at least ``count`` records match, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    found: Found = []
    while time.monotonic() < deadline:
        found = [(r, d) for r, d in await read_topic(bootstrap, topics) if predicate(r, d)]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.3)
    raise AssertionError(f"wanted {count} matching records on {topics}, saw {len(found)}")


def subject_is(subject: str) -> Callable[[RawRecord, Envelope | DecodeError], bool]:
    return lambda _r, d: isinstance(d, Envelope) and d.subject == subject


def events_of(found: Found) -> list[Envelope]:
    return [d for _r, d in found if isinstance(d, Envelope)]

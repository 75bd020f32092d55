"""A minimal service built on the kit alone, for crash and DLQ tests of the kit itself.

It reads RELAY_TOPIC and answers each DispatchFailed with a ProbeRejected for the same
probe, through the same Processor every real service uses. A DispatchFailed whose detail
is "needs-file:<path>" waits (kit ``NotYet``) until that file exists."""

from __future__ import annotations

import asyncio
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from schemas.envelope import Envelope
from schemas.events import DispatchFailed, Event, ProbeRejected, RejectReason
from services.kit.bus import NotYet, Route
from services.kit.logs import setup_logging
from services.kit.runtime import run_service
from services.kit.service import processor, start_publisher
from services.kit.settings import ServiceSettings

RELAY_TOPIC = "frs.test.relay"
RELAY_DLQ = "frs.test.relay.dlq"


class RelaySettings(ServiceSettings):
    service: str = "relay"


async def relay(event: Any, envelope: Envelope) -> list[Event]:
    assert isinstance(event, DispatchFailed)
    needs, _, path = event.detail.partition(":")
    if needs == "needs-file" and not Path(path).exists():
        raise NotYet(event.probe_id)
    return [ProbeRejected(probe_id=event.probe_id, request_id=envelope.id,
                          reason=RejectReason.INVALID_FIELDS, detail="relayed")]


async def main() -> None:
    settings = RelaySettings(
        fault_kill_before_commit=os.environ.get("RELAY_KILL_BEFORE_COMMIT") == "1"
    )
    setup_logging("relay")
    stack = AsyncExitStack()
    publisher = await start_publisher(settings, stack)
    route = Route("relay", "frs-test-relay", (RELAY_TOPIC,), {DispatchFailed: relay}, RELAY_DLQ)
    await run_service(settings, [processor(settings, route, publisher)], stack)


if __name__ == "__main__":
    asyncio.run(main())

"""A minimal service built on the kit alone, for crash and DLQ tests of the kit itself.

It reads RELAY_TOPIC and answers each DispatchFailed with a ProbeRejected for the same
probe, through the same Processor every real service uses. A DispatchFailed whose detail
is "needs-file:<path>" waits (kit ``NotYet``) until that file exists."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from schemas.envelope import Envelope
from schemas.events import DispatchFailed, Event, ProbeRejected, RejectReason
from services.kit.app import ServiceApp, Wiring
from services.kit.routing import Route
from services.kit.runtime import main
from services.kit.settings import ServiceSettings
from services.kit.signals import NotYet

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


def build(settings: RelaySettings) -> ServiceApp:
    route = Route("relay", "frs-test-relay", (RELAY_TOPIC,), {DispatchFailed: relay}, RELAY_DLQ)
    return ServiceApp(settings, lambda _ctx: Wiring(routes=[route]),
                      follows_registries=False)


if __name__ == "__main__":
    main(build(RelaySettings(
        fault_kill_before_commit=os.environ.get("RELAY_KILL_BEFORE_COMMIT") == "1")))

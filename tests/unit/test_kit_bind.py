"""kit.bind: a Route entry that hands the typed event and the ports to a plain handler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from schemas.events import Event, ImagePurged, ProbeSubmitted, PurgeReason
from schemas.types import utcnow
from services.kit.routing import bind
from tests.factories import submitted


@dataclass(frozen=True)
class Ports:
    seen: list[Any]


async def on_purged(event: ImagePurged, ports: Ports) -> Sequence[Event]:
    ports.seen.append(event.probe_id)
    return [event]


async def test_bind_passes_event_and_ports() -> None:
    ports = Ports([])
    event_type, handler = bind(ImagePurged, on_purged, ports)
    purged = ImagePurged(probe_id="prb-1", vault_ref="vault:probe/prb-1",
                         reason=PurgeReason.EXPIRED, expires_at=utcnow(), purged_at=utcnow())
    assert event_type is ImagePurged
    assert await handler(purged, None) == [purged]  # type: ignore[arg-type]
    assert ports.seen == ["prb-1"]


async def test_bind_refuses_another_event_type() -> None:
    _type, handler = bind(ImagePurged, on_purged, Ports([]))
    other: ProbeSubmitted = submitted("prb-2")
    with pytest.raises(TypeError, match="on_purged got ProbeSubmitted"):
        await handler(other, None)  # type: ignore[arg-type]

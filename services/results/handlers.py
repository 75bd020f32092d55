"""Results handlers: a provider's raw answer becomes a provider-neutral candidate list,
always marked as an investigative lead (REQ-LEADS-ONLY), or a ProviderResponseRejected
with a reason code. Malformed answers never crash the processor."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from schemas.events import Event, ProviderAnswered, ProviderResponseRejected
from services.kit.registry import Registries
from services.results.normalize import DEFAULT_MAX_CANDIDATES, normalize

__all__ = ["DEFAULT_MAX_CANDIDATES", "ResultsPorts", "on_provider_answered"]

log = logging.getLogger("frs.results")


@dataclass(frozen=True)
class ResultsPorts:
    registries: Registries
    clock: Callable[[], datetime]


async def on_provider_answered(event: ProviderAnswered, ports: ResultsPorts) -> list[Event]:
    out = normalize(
        probe_id=event.probe_id, provider=ports.registries.providers.get(event.provider_id),
        provider_id=event.provider_id, channel=event.channel, payload=event.payload,
        received_at=event.received_at, now=ports.clock(),
    )
    if isinstance(out, ProviderResponseRejected):
        log.warning("provider answer rejected", extra={"provider": event.provider_id,
                                                       "reason": out.reason})
    return [out]

"""Results handlers: a provider's raw answer becomes a provider-neutral candidate list,
always marked as an investigative lead (REQ-LEADS-ONLY), or a ProviderResponseRejected
with a reason code. Malformed answers never crash the processor."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from schemas.events import CandidatesReceived, Event, ProviderAnswered, ProviderResponseRejected
from services.kit.registry import Registries
from services.kit.signals import store_unavailable
from services.results.normalize import DEFAULT_MAX_CANDIDATES, normalize

__all__ = ["DEFAULT_MAX_CANDIDATES", "ResultsPorts", "on_provider_answered",
           "on_provider_answered_tracked"]

# Applies candidates to their probe's tracking; returns what that emits (a settlement).
Track = Callable[[CandidatesReceived], Awaitable[list[Event]]]

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


async def on_provider_answered_tracked(event: ProviderAnswered, ports: ResultsPorts,
                                       track: Track) -> list[Event]:
    """The answer normalized, and its candidates applied to the probe's tracking at once,
    so what they settle leaves with them. If applying them fails for another reason than
    the store being away (which waits), the lead still goes out: the tracker meets the
    candidates again when it reads them back, where a lasting failure goes to the DLQ
    with the candidates in it, as before the normalizer was folded in."""
    out = await on_provider_answered(event, ports)
    followups: list[Event] = []
    for made in out:
        if isinstance(made, CandidatesReceived):
            try:
                followups += await track(made)
            except Exception as exc:
                if store_unavailable(exc):
                    raise
                log.error("candidates not tracked on arrival; left to their read-back",
                          extra={"provider": event.provider_id, "error": type(exc).__name__})
    return [*out, *followups]

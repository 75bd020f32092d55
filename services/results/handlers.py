"""Results handlers: a provider's raw answer becomes a provider-neutral candidate list,
always marked as an investigative lead (REQ-LEADS-ONLY)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from schemas.events import (
    Candidate,
    CandidatesReceived,
    Event,
    ProviderAnswered,
    ProviderResponseRejected,
)
from services.kit.registry import Registries

DEFAULT_MAX_CANDIDATES = 20


@dataclass(frozen=True)
class ResultsPorts:
    registries: Registries
    clock: Callable[[], datetime]


async def on_provider_answered(event: ProviderAnswered, ports: ResultsPorts) -> list[Event]:
    provider = ports.registries.providers.get(event.provider_id)
    cap = provider.max_candidates if provider else DEFAULT_MAX_CANDIDATES
    payload = event.payload
    try:
        raw = payload.get("candidates", [])
        if not isinstance(raw, list):
            raise TypeError("candidates is not a list")
        candidates = sorted((Candidate.model_validate(c) for c in raw), key=lambda c: c.rank)
        kept = candidates[:cap]
        return [CandidatesReceived(
            probe_id=event.probe_id, provider_id=event.provider_id, channel=event.channel,
            candidates=kept, threshold=float(payload.get("threshold", 0.0)),
            list_size=len(kept), algorithm=str(payload.get("algorithm", "unknown")),
            algorithm_version=str(payload.get("algorithm_version", "unknown")),
            truncated_from=len(candidates) if len(candidates) > cap else None,
            received_at=event.received_at,
        )]
    except (ValidationError, TypeError, ValueError) as exc:
        return [ProviderResponseRejected(
            probe_id=event.probe_id, provider_id=event.provider_id, reason="malformed",
            detail=type(exc).__name__, rejected_at=ports.clock(),
        )]

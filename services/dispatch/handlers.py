"""Dispatch handlers. Foundation pass-through: every cleared, active provider is 'sent'
through a loopback transport that answers at once with an empty candidate list. The
dispatch issue replaces it with real transports and a ledger."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.events import (
    DispatchFailed,
    DispatchFailure,
    Event,
    PolicyCleared,
    ProviderAnswered,
    ProviderDispatched,
)
from services.kit.registry import Registries


@dataclass(frozen=True)
class DispatchPorts:
    registries: Registries
    clock: Callable[[], datetime]


async def on_policy_cleared(event: PolicyCleared, ports: DispatchPorts) -> list[Event]:
    out: list[Event] = []
    now = ports.clock()
    for cleared in event.cleared:
        provider = ports.registries.providers.get(cleared.provider_id)
        if provider is None or provider.status != "active":
            reason = DispatchFailure.UNKNOWN_PROVIDER if provider is None \
                else DispatchFailure.SUSPENDED
            out.append(DispatchFailed(probe_id=event.probe_id, provider_id=cleared.provider_id,
                                      reason=reason, detail=f"provider is {reason.value}",
                                      failed_at=now))
            continue
        out.append(ProviderDispatched(
            probe_id=event.probe_id, provider_id=provider.provider_id,
            dispatch_id=f"{event.probe_id}:{provider.provider_id}",
            transport=provider.transport, fields_sent=cleared.fields,
            request_ref=f"{event.probe_id}:{provider.provider_id}", sent_at=now,
            response_due_at=now + timedelta(seconds=provider.response_deadline_s),
            deletion_due_at=now + timedelta(seconds=provider.deletion_deadline_s),
        ))
        out.append(ProviderAnswered(
            probe_id=event.probe_id, provider_id=provider.provider_id, channel="rekognition",
            payload={"candidates": [], "threshold": 0.0, "algorithm": "loopback",
                     "algorithm_version": "0"},
            received_at=now,
        ))
    return out

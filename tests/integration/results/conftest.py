"""Fixtures for the results service's integration tests: publish input events straight to
their topics (no dependency on dispatch), read the results topic, run the service."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from schemas.catalog import REGISTRY_SUSPENSIONS, RESULTS_EVENTS
from schemas.envelope import Envelope
from schemas.events import (
    ClaimCheck,
    ClearedProvider,
    Event,
    PolicyCleared,
    ProviderDispatched,
    ProviderRecord,
    ProviderSuspensionRequested,
    RegistryVersions,
)
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from tests.factories import inputs_for, signed
from tests.helpers import wait_for_async

pytestmark = pytest.mark.integration


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def now() -> datetime:
    return datetime.now(UTC)


async def publish(bootstrap: str, events: Sequence[Event]) -> None:
    async with Publisher(bootstrap, source="/frs/test") as pub:
        await pub.publish(events)


def provider_record(pid: str, **fields: object) -> ProviderRecord:
    base: dict[str, object] = {
        "provider_id": pid, "name": f"Provider {pid}", "kind": "commercial",
        "transport": "https", "endpoint": "https://127.0.0.1/none",
        "attestation_valid_until": now() + timedelta(days=365), "updated_at": now(),
    }
    base.update(fields)
    return ProviderRecord.model_validate(base)


def cleared(probe_id: str, *pids: str, review: bool = False) -> PolicyCleared:
    """Signed with the session's policy key, so a dispatch in the test acts on it."""
    return signed(PolicyCleared(
        probe_id=probe_id, case_id="CASE-1",
        cleared=[ClearedProvider(provider_id=p, transport="https",
                                 fields=["photo", "agent_id", "request_ref"]) for p in pids],
        review_required=review, policy_digest="0" * 64,
        registry_versions=RegistryVersions(), decided_at=now(), inputs=inputs_for(*pids),
        claim=ClaimCheck(vault_ref=f"vault:{probe_id}", agent_id="agent-7",
                         sanitized_sha256="0" * 64, expires_at=now() + timedelta(hours=1))))


def dispatched(probe_id: str, pid: str, *, response_s: float = 3600,
               deletion_s: float = 86400) -> ProviderDispatched:
    t = now()
    return ProviderDispatched(
        probe_id=probe_id, provider_id=pid, dispatch_id=f"{probe_id}:{pid}",
        transport="https", fields_sent=["photo", "agent_id", "request_ref"],
        request_ref=f"ref-{uuid.uuid4().hex}", sent_at=t,
        response_due_at=t + timedelta(seconds=response_s),
        deletion_due_at=t + timedelta(seconds=deletion_s))


async def results_for(bootstrap: str, probe_id: str, topic: str = RESULTS_EVENTS.name
                      ) -> list[Event]:
    records = await read_topic(bootstrap, [topic])
    return [d.event for _, d in records
            if isinstance(d, Envelope) and d.subject == probe_id]


async def wait_results(bootstrap: str, probe_id: str, done: Callable[[list[Event]], bool],
                       within_s: float = 45.0, topic: str = RESULTS_EVENTS.name) -> list[Event]:
    """The probe's events on ``topic`` once ``done`` says they are enough."""
    events: list[Event] = []

    async def enough() -> bool:
        nonlocal events
        events = await results_for(bootstrap, probe_id, topic)
        return done(events)

    await wait_for_async(enough, timeout=within_s, interval=0.5,
                         what=lambda: f"{probe_id} on {topic}; saw "
                         f"{[type(e).__name__ for e in events]}")
    return events


def count(events: Sequence[Event], kind: type[Event]) -> int:
    return sum(isinstance(e, kind) for e in events)


async def suspensions(bootstrap: str, pid: str) -> list[ProviderSuspensionRequested]:
    """What results asked of the registry for ``pid``: suspensions, on their own topic."""
    records = await read_topic(bootstrap, [REGISTRY_SUSPENSIONS.name])
    return [d.event for _, d in records if isinstance(d, Envelope)
            and isinstance(d.event, ProviderSuspensionRequested) and d.event.provider_id == pid]

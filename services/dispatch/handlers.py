"""Dispatch handlers: plain functions of typed events and a ports dataclass, returning the
events to emit (ProviderDispatched, DispatchFailed, and ProviderAnswered for synchronous
transports). Everything a send needs is in the PolicyCleared: its claim check names the
vault object and the agent; the vault itself says whether the image is still there.

A clearance is acted on only when it is the policy gate's: its signature verifies against
an active policy-decisions key of the trusted-keys registry (else DispatchFailed
``unverified_decision`` for every provider it lists), and each provider's registry entry
allows the probe's purpose (else ``purpose_not_allowed`` for that one). Both are judged
before the ledger is touched, so a forged clearance cannot use up a probe's claims."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from schemas.decisions import allowed_purposes, purpose_faults, unverified
from schemas.events import (
    ClearedProvider,
    DispatchFailed,
    DispatchFailure,
    Event,
    PolicyCleared,
    ProviderAnswered,
    ProviderDispatched,
)
from schemas.types import OutboundField, Transport
from services.dispatch.breaker import ProviderGuards
from services.dispatch.delivery import ClaimLost, Delivered, DeliveryHooks, RetryPolicy, deliver
from services.dispatch.images import ImageGone, ImageSource
from services.dispatch.ledger import Claim, Ledger
from services.dispatch.payloads import PhotoNotCleared, build_payload, payload_digest
from services.dispatch.transports.base import ProviderTransport, SendRequest
from services.kit.registry import Registries
from services.kit.signals import NotYet

log = logging.getLogger("frs.dispatch")


class ClaimBusy(NotYet):
    """Stopping while another live instance holds the claim: its outcome is awaited by
    whoever handles the clearance next."""


def _never_stopping() -> bool:
    return False


@dataclass(frozen=True)
class DispatchPorts:
    registries: Registries
    ledger: Ledger
    images: ImageSource
    transports: Mapping[Transport, ProviderTransport]
    guards: ProviderGuards
    clock: Callable[[], datetime]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    hooks: DeliveryHooks = field(default_factory=DeliveryHooks)
    # True once the service is stopping: a wait for another instance's claim ends there.
    stopping: Callable[[], bool] = _never_stopping
    # Email cannot prove a crashed send did not go out: resend with the same Message-ID,
    # or give up with outcome_unknown. HTTPS and Rekognition always resend safely.
    unknown_outcome_email: Literal["resend", "fail"] = "resend"
    # Another live instance's claim (rebalance): wait this long since its last heartbeat
    # for its outcome before treating the claim as abandoned.
    claim_lease_s: float = 5.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


async def on_policy_cleared(event: PolicyCleared, ports: DispatchPorts) -> list[Event]:
    """Send the cleared probe to each cleared provider, from the clearance's claim check."""
    # One send per provider, however often a clearance names it.
    cleared = list({c.provider_id: c for c in reversed(event.cleared)}.values())[::-1]
    forged = unverified(event, ports.registries.trusted_keys)
    if forged is not None:
        log.warning("clearance refused: not the policy gate's",
                    extra={"probe_id": event.probe_id, "reason": forged})
        now = ports.clock()
        return [_failed(event, c.provider_id, DispatchFailure.UNVERIFIED_DECISION, forged, now)
                for c in cleared]
    faults = purpose_faults(event, allowed_purposes(ports.registries.providers))
    refused: list[Event] = []
    for pid, why in faults.items():
        log.warning("provider refused: purpose not allowed",
                    extra={"probe_id": event.probe_id, "provider": pid})
        refused.append(_failed(event, pid, DispatchFailure.PURPOSE_NOT_ALLOWED, why,
                               ports.clock()))
    cleared = [c for c in cleared if c.provider_id not in faults]
    # Every provider's send runs to its end before a failure is raised: a retry of this
    # clearance must find the others done, never still in flight (it would send again).
    results = await asyncio.gather(*(_dispatch_one(event, c, ports) for c in cleared),
                                   return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return refused + [e for events in results if not isinstance(events, BaseException)
                      for e in events]


def _failed(event: PolicyCleared, provider_id: str, reason: DispatchFailure, detail: str,
            now: datetime, attempts: int = 0) -> DispatchFailed:
    return DispatchFailed(probe_id=event.probe_id, provider_id=provider_id, reason=reason,
                          detail=detail[:2000], failed_at=now, attempts=attempts)


async def _dispatch_one(event: PolicyCleared, cleared: ClearedProvider,
                        ports: DispatchPorts) -> list[Event]:
    provider_id = cleared.provider_id
    ledger = ports.ledger
    claim = await ledger.claim(event.probe_id, provider_id)
    if claim.state == "unknown" and claim.owner != ledger.owner:
        claim = await _await_other_owner(event.probe_id, provider_id, claim, ports)
    if claim.state == "done":
        return claim.outcome  # already sent or failed: re-emit, never resend
    try:
        events = await _decide_and_send(event, cleared, claim, ports)
        recorded = await ledger.complete(event.probe_id, provider_id, events)
    except ClaimLost:
        ledger.release(event.probe_id, provider_id)
        recorded = False
    except BaseException:
        ledger.release(event.probe_id, provider_id)
        raise
    if not recorded:
        # Another instance took the claim over (our heartbeat had stopped): its outcome is
        # the one on record, and it emits it; ours is dropped so there is only one.
        log.warning("claim taken over while sending",
                    extra={"probe_id": event.probe_id, "provider": provider_id})
        now = await ledger.claim(event.probe_id, provider_id)
        return now.outcome if now.state == "done" else []
    for e in events:
        if isinstance(e, ProviderDispatched):
            ports.hooks.outcome(provider_id, "dispatched")
        elif isinstance(e, DispatchFailed):
            ports.hooks.outcome(provider_id, e.reason.value)
            log.warning("dispatch failed", extra={"probe_id": e.probe_id, "provider": provider_id,
                                                  "reason": e.reason.value,
                                                  "attempts": e.attempts})
    return events


async def _await_other_owner(probe_id: str, provider_id: str, claim: Claim,
                             ports: DispatchPorts) -> Claim:
    """After a rebalance the previous owner may still be sending: wait for its outcome
    while its heartbeat is fresh, then take the claim over."""
    log.info("waiting for another instance's claim",
             extra={"probe_id": probe_id, "provider": provider_id, "owner": claim.owner})
    # Staleness is judged on this instance's own time: the owner's heartbeat has not moved
    # for a whole lease while we watched. Comparing wall clocks across hosts (or across a
    # clock step) could take a live claim.
    seen, still_for = (claim.owner, claim.heartbeat_at), 0.0
    while claim.state == "unknown" and claim.owner != ports.ledger.owner:
        if ports.stopping():
            raise ClaimBusy(probe_id)  # left for the next run, not concluded now
        if still_for >= ports.claim_lease_s:
            if await ports.ledger.take_over(probe_id, provider_id, claim):
                log.warning("took over an abandoned claim",
                            extra={"probe_id": probe_id, "provider": provider_id})
                return await ports.ledger.claim(probe_id, provider_id)
            still_for = 0.0  # it moved (or another instance won): watch again
        await ports.sleep(0.2)
        claim = await ports.ledger.claim(probe_id, provider_id)
        if (claim.owner, claim.heartbeat_at) == seen:
            still_for += 0.2
        else:
            seen, still_for = (claim.owner, claim.heartbeat_at), 0.0
    return claim


async def _decide_and_send(event: PolicyCleared, cleared: ClearedProvider, claim: Claim,
                           ports: DispatchPorts) -> list[Event]:
    provider_id = cleared.provider_id
    now = ports.clock()
    check = event.claim
    if check is None:
        return [_failed(event, provider_id, DispatchFailure.PERMANENT_ERROR,
                        "clearance carries no claim check (made by an older policy gate): "
                        "resubmit the request", now)]
    provider = ports.registries.providers.get(provider_id)
    if provider is None:
        return [_failed(event, provider_id, DispatchFailure.UNKNOWN_PROVIDER,
                        "provider not in the registry", now)]
    if provider.status != "active":
        return [_failed(event, provider_id, DispatchFailure.SUSPENDED,
                        "provider suspended after clearance", now)]
    if provider.transport is not cleared.transport:
        return [_failed(event, provider_id, DispatchFailure.PERMANENT_ERROR,
                        "provider transport changed after clearance", now)]
    transport = ports.transports.get(provider.transport)
    if transport is None:
        return [_failed(event, provider_id, DispatchFailure.PERMANENT_ERROR,
                        f"transport {provider.transport.value} not configured", now)]
    unknown = claim.state == "unknown" and claim.attempts > 0
    if unknown and not transport.idempotent_resend and ports.unknown_outcome_email == "fail":
        return [_failed(event, provider_id, DispatchFailure.OUTCOME_UNKNOWN,
                        "a previous send may have gone out; not resending", now)]
    if check.expires_at <= now:
        return [_failed(event, provider_id, DispatchFailure.IMAGE_PURGED,
                        "image expired before dispatch", now)]
    try:
        # The vault is the one truth on purges: a purged object is gone, key and bytes.
        photo = await ports.images.get(check.vault_ref)
    except ImageGone:
        return [_failed(event, provider_id, DispatchFailure.IMAGE_PURGED,
                        "image no longer in the vault", now)]
    try:
        payload = build_payload(provider.transport, cleared.fields, photo=photo,
                                agent_id=check.agent_id, request_ref=claim.request_ref)
    except PhotoNotCleared:
        return [_failed(event, provider_id, DispatchFailure.PERMANENT_ERROR,
                        "photo not cleared by policy", now)]
    del photo
    request = SendRequest(provider=provider, payload=payload, dispatch_id=claim.dispatch_id,
                          request_ref=claim.request_ref)

    def still_active() -> bool:
        current = ports.registries.providers.get(provider_id)
        return current is not None and current.status == "active"

    async def confirm_attempt() -> None:
        # Asked before the last bytes of a request that left late: a claim taken over
        # meanwhile is not sent (a lost lease raises Fenced).
        if not await ports.ledger.renew(event.probe_id, provider_id):
            raise ClaimLost(provider_id)

    outcome = await deliver(
        request, transport, ports.guards, ports.retry,
        record_attempt=lambda: ports.ledger.record_attempt(event.probe_id, provider_id),
        still_active=still_active,
        send_window=lambda: ports.images.send_window(check.vault_ref),
        confirm_attempt=confirm_attempt,
        hooks=ports.hooks, sleep=ports.sleep,
    )
    done = ports.clock()
    if not isinstance(outcome, Delivered):
        return [_failed(event, provider_id, outcome.reason, outcome.detail, done,
                        outcome.attempts)]
    order = list(OutboundField)
    out: list[Event] = [ProviderDispatched(
        probe_id=event.probe_id, provider_id=provider_id, dispatch_id=claim.dispatch_id,
        transport=provider.transport,
        fields_sent=sorted(payload.fields_sent(), key=order.index),
        # When the image left: the start of the attempt that succeeded.
        request_ref=claim.request_ref, sent_at=done - timedelta(seconds=outcome.seconds),
        response_due_at=done + timedelta(seconds=provider.response_deadline_s),
        deletion_due_at=done + timedelta(seconds=provider.deletion_deadline_s),
        payload_sha256=payload_digest(payload), attempts=outcome.attempts,
        claimed_at=claim.claimed_at,
    )]
    if outcome.result.answer is not None:
        out.append(ProviderAnswered(
            probe_id=event.probe_id, provider_id=provider_id, channel="rekognition",
            payload=outcome.result.answer, received_at=done,
        ))
    return out

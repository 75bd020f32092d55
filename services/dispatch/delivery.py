"""One send with timeouts, retries (exponential backoff, full jitter), the provider's
circuit breaker and concurrency limit, and a suspension check before every attempt.
Each attempt carries a guard from its record to its last bytes (transports/base.py
``SendGuard``): one that did not leave soon after its record asks the ledger again."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from schemas.events import DispatchFailure
from services.dispatch.breaker import CircuitOpen, ProviderGuards
from services.dispatch.transports.base import (
    AmbiguousError,
    PermanentError,
    ProviderTransport,
    SendGuard,
    SendRequest,
    SendResult,
    TransientError,
)

log = logging.getLogger("frs.dispatch")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 10.0
    attempt_timeout_s: float = 30.0
    # False: a send that may have arrived unconfirmed (AmbiguousError, or a timeout) on a
    # transport that cannot resend safely ends as outcome_unknown instead of a resend.
    resend_ambiguous: bool = True
    # An attempt whose request is not on the wire this long after its record (on the
    # loop's clock: a frozen process, a slow connect) asks the ledger again before its last
    # bytes go. Well inside the claim lease, after which another instance may take over.
    confirm_after_s: float = 2.5

    def delay(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**retry)]."""
        return float(rng() * min(self.max_delay_s, self.base_delay_s * 2.0**retry))


class ClaimLost(Exception):
    """The claim was taken over by another instance before this attempt: do not send."""


@dataclass(frozen=True)
class Delivered:
    result: SendResult
    attempts: int
    seconds: float


@dataclass(frozen=True)
class Failed:
    reason: DispatchFailure
    detail: str
    attempts: int


class DeliveryHooks:
    """Side channels of a delivery (metrics); the defaults do nothing."""

    def attempt(self, provider_id: str, outcome: str, seconds: float) -> None:
        return None

    def in_flight(self, provider_id: str, delta: int) -> None:
        return None

    def outcome(self, provider_id: str, outcome: str) -> None:
        return None


async def deliver(
    request: SendRequest,
    transport: ProviderTransport,
    guards: ProviderGuards,
    policy: RetryPolicy,
    *,
    record_attempt: Callable[[], Awaitable[int]],
    still_active: Callable[[], bool],
    send_window: Callable[[], Awaitable[float]] | None = None,
    confirm_attempt: Callable[[], Awaitable[None]] | None = None,
    hooks: DeliveryHooks | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: Callable[[], float] = random.random,
) -> Delivered | Failed:
    hooks = hooks or DeliveryHooks()
    provider_id = request.provider.provider_id
    breaker = guards.breaker(provider_id)
    attempts = 0
    last = "none"
    for retry in range(policy.max_attempts):
        if retry:
            await sleep(policy.delay(retry - 1, rng))
        if not still_active():
            return Failed(DispatchFailure.SUSPENDED, "provider suspended before send", attempts)
        try:
            breaker.acquire()
        except CircuitOpen as exc:
            last = "circuit_open"
            # Waiting out the open period costs a try, so an open circuit ends the send.
            await sleep(min(max(exc.retry_after_s, 0.0), policy.max_delay_s) * (0.5 + rng()))
            continue
        settled = False  # the breaker was told how the attempt went
        try:
            async with guards.limit(provider_id):
                # Checked with the slot held, right before the send: a wait for a slot
                # behind a hanging vendor outlasted an image's expiry (chaos, 1,000 probes).
                # The attempt must also end inside the window: cancelled before the image
                # expires, a send still queued (a thread pool, a slow connect) never leaves.
                window = policy.attempt_timeout_s
                if send_window is not None:
                    window = min(window, await send_window())
                    if window <= 0:
                        return Failed(DispatchFailure.IMAGE_PURGED,
                                      "image purged or expired before send", attempts)
                recorded_at = asyncio.get_running_loop().time()  # not after the lease check
                count = await record_attempt()  # durable before anything leaves
                if count == 0:
                    raise ClaimLost(provider_id)
                attempts = count
                # What leaves must leave soon after that record, or be confirmed again:
                # a process frozen here wakes after its partition (and the send) moved.
                guard = None if confirm_attempt is None else SendGuard(
                    recorded_at, policy.confirm_after_s, confirm_attempt)
                attempt = replace(request, guard=guard)
                hooks.in_flight(provider_id, 1)
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(window):
                        result = await _send(transport, attempt)
                except (TransientError, TimeoutError) as exc:
                    breaker.failure()
                    settled = True
                    last = exc.code if isinstance(exc, TransientError) else "timeout"
                    hooks.attempt(provider_id, "transient", time.perf_counter() - started)
                    ambiguous = not isinstance(exc, TransientError) or \
                        isinstance(exc, AmbiguousError)
                    if ambiguous and not (transport.idempotent_resend
                                          or policy.resend_ambiguous):
                        return Failed(DispatchFailure.OUTCOME_UNKNOWN,
                                      f"{last}: it may have arrived; not resending", attempts)
                    continue
                except PermanentError as exc:
                    hooks.attempt(provider_id, "permanent", time.perf_counter() - started)
                    return Failed(DispatchFailure.PERMANENT_ERROR, exc.code, attempts)
                finally:
                    hooks.in_flight(provider_id, -1)
                breaker.success()
                settled = True
                seconds = time.perf_counter() - started
                hooks.attempt(provider_id, "sent", seconds)
                return Delivered(result, attempts, seconds)
        finally:
            # Any other way out (no send, a permanent answer, an unexpected error) gives a
            # half-open circuit's trial back, or the provider stayed open for good.
            if not settled:
                breaker.release()
    if last == "circuit_open":
        return Failed(DispatchFailure.CIRCUIT_OPEN, "circuit open for the whole retry budget",
                      attempts)
    return Failed(DispatchFailure.RETRIES_EXHAUSTED, f"last error: {last}", attempts)


async def _send(transport: ProviderTransport, request: SendRequest) -> SendResult:
    """The transport's send; refused by the attempt's guard, it ends with the guard's own
    exception (``Fenced``, ``ClaimLost``), whatever the transport made of it: nothing
    was sent, and no retry of this attempt may follow."""
    try:
        return await transport.send(request)
    except Exception as exc:
        refused = request.guard.refused if request.guard is not None else None
        if refused is not None:
            # A process that was frozen (or stalled) after the record: said, as it is a
            # zombie's sign. Nothing of the request is complete on the wire.
            log.warning("late attempt refused before its request left",
                        extra={"provider": request.provider.provider_id,
                               "dispatch_id": request.dispatch_id,
                               "reason": type(refused).__name__})
            if refused is not exc:
                raise refused from exc
        raise

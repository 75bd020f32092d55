"""Per-provider circuit breaker and concurrency limit.

closed --(``failure_threshold`` transient failures in a row)--> open
open --(``open_s`` elapsed)--> half-open: one trial call at a time
half-open --success--> closed;  half-open --failure--> open again

Only transient failures count: a permanent error is about one request, not the provider.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CIRCUIT_GAUGE = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}


class CircuitOpen(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__("circuit open")
        self.retry_after_s = retry_after_s


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 5, open_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[CircuitState], None] | None = None) -> None:
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._clock = clock
        self._on_change = on_change
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self.open_s:
            self._set(CircuitState.HALF_OPEN)
        return self._state

    def _set(self, state: CircuitState) -> None:
        if state is not self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)

    def acquire(self) -> None:
        """Admit a call or raise ``CircuitOpen``; pair with ``success``/``failure``/``release``."""
        state = self.state
        if state is CircuitState.OPEN:
            raise CircuitOpen(self.open_s - (self._clock() - self._opened_at))
        if state is CircuitState.HALF_OPEN:
            if self._trial_in_flight:
                raise CircuitOpen(min(1.0, self.open_s))
            self._trial_in_flight = True

    def success(self) -> None:
        self._trial_in_flight = False
        self._failures = 0
        self._set(CircuitState.CLOSED)

    def failure(self) -> None:
        self._trial_in_flight = False
        self._failures += 1
        if self._state is CircuitState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self._set(CircuitState.OPEN)
            # Reported even when already open, so a re-open restarts the timer visibly.

    def release(self) -> None:
        """The call ended without saying anything about the provider (permanent error)."""
        self._trial_in_flight = False


class ProviderGuards:
    """A breaker and a concurrency limit per provider, created on first use."""

    def __init__(self, *, concurrency: int, failure_threshold: int, open_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, CircuitState], None] | None = None) -> None:
        self.concurrency = concurrency
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._clock = clock
        self._on_change = on_change
        self._breakers: dict[str, CircuitBreaker] = {}
        self._limits: dict[str, asyncio.Semaphore] = {}

    def breaker(self, provider_id: str) -> CircuitBreaker:
        if provider_id not in self._breakers:
            hook = self._on_change

            def changed(state: CircuitState) -> None:
                if hook is not None:
                    hook(provider_id, state)
            self._breakers[provider_id] = CircuitBreaker(
                self.failure_threshold, self.open_s, self._clock, changed)
            changed(CircuitState.CLOSED)
        return self._breakers[provider_id]

    def limit(self, provider_id: str) -> asyncio.Semaphore:
        if provider_id not in self._limits:
            self._limits[provider_id] = asyncio.Semaphore(self.concurrency)
        return self._limits[provider_id]

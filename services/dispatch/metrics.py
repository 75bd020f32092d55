"""Dispatch metrics: outcomes, attempt latency and in-flight sends per provider, circuit
state. Labels are provider ids from the registry and fixed codes, never probe ids."""

from __future__ import annotations

from functools import cache

from prometheus_client import Counter, Gauge, Histogram

from services.dispatch.breaker import CIRCUIT_GAUGE, CircuitState
from services.dispatch.delivery import DeliveryHooks
from services.kit.metrics import LATENCY_BUCKETS


class DispatchMetrics(DeliveryHooks):
    def __init__(self) -> None:
        self.outcomes = Counter("frs_dispatch_outcomes_total",
                                "Dispatch decisions per provider: dispatched or a failure reason.",
                                ["provider", "outcome"])
        self.attempts = Counter("frs_dispatch_attempts_total",
                                "Transport attempts per provider: sent, transient, permanent.",
                                ["provider", "result"])
        self.seconds = Histogram("frs_dispatch_send_seconds",
                                 "Latency of one transport attempt, per provider.", ["provider"],
                                 buckets=LATENCY_BUCKETS)
        self.in_flight_sends = Gauge("frs_dispatch_in_flight_sends",
                                     "Sends currently in flight, per provider.", ["provider"])
        self.circuit = Gauge("frs_dispatch_circuit_state",
                             "Circuit breaker: 0 closed, 1 half-open, 2 open.", ["provider"])
        self.circuit_changes = Counter("frs_dispatch_circuit_transitions_total",
                                       "Circuit state changes, by new state.",
                                       ["provider", "state"])

    def attempt(self, provider_id: str, outcome: str, seconds: float) -> None:
        self.attempts.labels(provider_id, outcome).inc()
        self.seconds.labels(provider_id).observe(seconds)

    def in_flight(self, provider_id: str, delta: int) -> None:
        self.in_flight_sends.labels(provider_id).inc(delta)

    def outcome(self, provider_id: str, outcome: str) -> None:
        self.outcomes.labels(provider_id, outcome).inc()

    def circuit_changed(self, provider_id: str, state: CircuitState) -> None:
        self.circuit.labels(provider_id).set(CIRCUIT_GAUGE[state])
        self.circuit_changes.labels(provider_id, state.value).inc()


@cache
def dispatch_metrics() -> DispatchMetrics:
    return DispatchMetrics()

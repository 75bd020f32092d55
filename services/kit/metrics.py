"""Prometheus metrics named ``frs_<service>_...``, created once per process and service.

Labels are bounded sets (event type, reason code, provider id from the registry): never
probe, case or agent ids."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class ProcessorMetrics:
    events_in: Counter
    events_out: Counter
    handler_failures: Counter
    waits: Counter
    dlq: Counter
    handler_seconds: Histogram
    consumer_lag: Gauge


@cache
def processor_metrics(service: str) -> ProcessorMetrics:
    p = f"frs_{service}"
    return ProcessorMetrics(
        events_in=Counter(f"{p}_events_in_total", "Events consumed, by type.", ["type"]),
        events_out=Counter(f"{p}_events_out_total", "Events published, by type.", ["type"]),
        handler_failures=Counter(
            f"{p}_handler_failures_total", "Handler attempts that raised, by type.", ["type"]
        ),
        waits=Counter(
            f"{p}_prerequisite_waits_total",
            "Handler attempts put off because a prerequisite had not arrived, by type.",
            ["type"],
        ),
        dlq=Counter(f"{p}_dlq_total", "Records sent to the dead-letter topic.", ["reason"]),
        handler_seconds=Histogram(
            f"{p}_handler_seconds", "Handler latency, by type.", ["type"],
            buckets=LATENCY_BUCKETS,
        ),
        consumer_lag=Gauge(
            f"{p}_consumer_lag_messages", "Records behind the log end, by topic.", ["topic"]
        ),
    )


def serve_metrics(host: str, port: int) -> int:
    """Start the /metrics endpoint; returns the bound port (port 0 picks a free one)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)

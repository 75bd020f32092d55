"""Prometheus metrics named ``frs_<service>_...``, created once per process and service.

Labels are bounded sets (event type, reason code, provider id from the registry): never
probe, case or agent ids. The fleet-wide families (``frs_instance_info``,
``frs_partitions_owned``, ``frs_topic_partitions``, ``frs_audit_leader``) carry the
service and the instance id themselves: many instances of one service run at once, and
the scrape keeps these labels (``honor_labels`` in deploy/prometheus)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from schemas.catalog import TOPIC_BY_NAME
from services.kit.env import default_instance_id

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


@dataclass(frozen=True)
class FleetMetrics:
    info: Gauge
    owned: Gauge
    partitions: Gauge
    audit_leader: Gauge


@cache
def fleet_metrics() -> FleetMetrics:
    return FleetMetrics(
        info=Gauge("frs_instance_info", "Always 1: which service and instance this process "
                   "is (join other series on the scrape target with it).",
                   ["service", "instance"]),
        owned=Gauge("frs_partitions_owned", "Partitions of the topic this instance owns in "
                    "its service's consumer group, set at every assignment and revocation.",
                    ["service", "instance", "topic"]),
        partitions=Gauge("frs_topic_partitions", "Partitions of a topic the service consumes "
                         "(the catalog's count): what the instances' owned must add up to.",
                         ["service", "instance", "topic"]),
        # Exported by the audit sequencer once it exists (issue 18, item 5).
        audit_leader=Gauge("frs_audit_leader", "1 while this audit instance holds the "
                           "sequencer lease, else 0; summed over instances it must be 1.",
                           ["service", "instance"]),
    )


# Who this process is, for the fleet families: set once at start by identify().
_identity = {"service": "frs", "instance": default_instance_id()}


def identify(service: str, instance: str) -> None:
    """Name this process in ``frs_instance_info`` and in the fleet families after it."""
    fleet_metrics().info.clear()  # one identity per process
    _identity.update(service=service, instance=instance)
    fleet_metrics().info.labels(service, instance).set(1)


def owned_partitions(topic: str, count: int) -> None:
    """How many partitions of ``topic`` this instance owns now: call it after every
    assignment and revocation (0 when all are revoked). Within one service a topic is read
    by one consumer group, so (service, topic) names the group."""
    labels = (_identity["service"], _identity["instance"], topic)
    fleet_metrics().owned.labels(*labels).set(count)
    known = TOPIC_BY_NAME.get(topic)
    if known is not None:
        fleet_metrics().partitions.labels(*labels).set(known.partitions)


def audit_leader(leading: bool) -> None:
    """For the audit sequencer: whether this instance holds the lease now."""
    fleet_metrics().audit_leader.labels(_identity["service"], _identity["instance"]).set(
        1 if leading else 0)

"""The topic catalog: the single source of truth for names, keys, partitions, retention,
cleanup policy and the event types each topic carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from schemas import events as ev

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# Below this retention a topic's segments roll on time (Topic.config).
_SHORT_MS = 30 * DAY_MS
_MIN_SEGMENT_MS = 60_000


@dataclass(frozen=True)
class Topic:
    name: str
    key: str
    partitions: int
    retention_ms: int  # -1: keep forever
    cleanup: Literal["delete", "compact"]
    events: tuple[type[ev.Event], ...]
    description: str
    extra_config: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, str]:
        config = {"cleanup.policy": self.cleanup, "retention.ms": str(self.retention_ms)}
        if self.cleanup == "delete" and 0 < self.retention_ms < _SHORT_MS:
            # Retention deletes whole closed segments only, and a segment closes weekly by
            # default: without this, an hour's retention keeps records about a week.
            # Records now go within retention + segment.ms + the broker's check interval.
            config["segment.ms"] = str(max(_MIN_SEGMENT_MS, self.retention_ms // 10))
        return {**config, **self.extra_config}


# Event topics keep a year of history so auditors can replay; the request topic holds
# encrypted images and lives one hour; DLQs live a week, long enough for an operator.
_EVENT_RETENTION = 365 * DAY_MS

MAX_REQUEST_BYTES = 16 * 1024 * 1024
MAX_DLQ_BYTES = MAX_REQUEST_BYTES + 64 * 1024

PROBE_REQUESTS = Topic(
    "frs.probe.requests", "request_id", 3, HOUR_MS, "delete", (ev.ProbeRequested,),
    "Upstream submissions; the image is encrypted to the intake's key.",
    # A 10 MB image is ~13.4 MB once encrypted and base64-encoded: above the broker's 1 MB.
    {"max.message.bytes": str(MAX_REQUEST_BYTES)},
)
PROBE_EVENTS = Topic(
    "frs.probe.events", "probe_id", 3, _EVENT_RETENTION, "delete",
    (ev.ProbeSubmitted, ev.ProbeRejected, ev.ImagePurged),
    "Intake outcomes and image purges.",
)
POLICY_DECISIONS = Topic(
    "frs.policy.decisions", "probe_id", 3, _EVENT_RETENTION, "delete",
    (ev.PolicyCleared, ev.PolicyDenied, ev.ExigentReviewOverdue),
    "Signed policy decisions per probe and provider, and overdue exigent reviews; written "
    "only by the policy gate.",
)
EXIGENT_REVIEWS = Topic(
    "frs.exigent.reviews", "probe_id", 3, _EVENT_RETENTION, "delete",
    (ev.SupervisorReviewRecorded,),
    "Supervisor reviews of exigent clearances; written only by supervisors.",
)
DISPATCH_EVENTS = Topic(
    "frs.dispatch.events", "probe_id", 3, _EVENT_RETENTION, "delete",
    (ev.ProviderDispatched, ev.DispatchFailed),
    "Sends to providers and failed sends.",
)
PROVIDER_RESPONSES = Topic(
    "frs.provider.responses", "probe_id", 3, 7 * DAY_MS, "delete", (ev.ProviderAnswered,),
    "Raw provider answers from every inbound channel, before normalization.",
)
RESULTS_EVENTS = Topic(
    "frs.results.events", "probe_id", 3, _EVENT_RETENTION, "delete",
    (
        ev.CandidatesReceived, ev.ProviderResponseRejected, ev.NoResponse, ev.ProbeSettled,
        ev.ReviewRequested, ev.ReviewCompleted, ev.DeletionConfirmed, ev.DeletionOverdue,
    ),
    "Provider answers, settlement, examiner review and deletion receipts.",
)
AUDIT_CHECKPOINTS = Topic(
    "frs.audit.checkpoints", "origin", 1, -1, "delete", (ev.CheckpointPublished,),
    "Signed tree heads of the audit log (C2SP tlog-checkpoint).",
)
AUDIT_VIOLATIONS = Topic(
    "frs.audit.violations", "probe_id", 1, -1, "delete", (ev.ComplianceViolation,),
    "Compliance invariant violations found by the audit service.",
)
OVERSIGHT_ALERTS = Topic(
    "frs.oversight.alerts", "subject", 3, _EVENT_RETENTION, "delete", (ev.UsageAlert,),
    "Usage patterns over a threshold, found by the oversight service (ids and digests).",
)
_COMPACT = {"min.compaction.lag.ms": "0", "segment.ms": str(HOUR_MS)}
REGISTRY_CASES = Topic(
    "frs.registry.cases", "case_id", 1, -1, "compact", (ev.CaseRecord,),
    "Case management view: status and ROI references.", _COMPACT,
)
REGISTRY_AGENTS = Topic(
    "frs.registry.agents", "agent_id", 1, -1, "compact", (ev.AgentRecord,),
    "Agents, roles and training currency.", _COMPACT,
)
REGISTRY_PROVIDERS = Topic(
    "frs.registry.providers", "provider_id", 1, -1, "compact", (ev.ProviderRecord,),
    "Approved providers, jurisdictions, transports and status.", _COMPACT,
)
REGISTRY_SUSPENSIONS = Topic(
    "frs.registry.suspensions", "provider_id", 1, -1, "compact",
    (ev.ProviderSuspensionRequested,),
    "Provider suspensions requested by the results service (a missed deletion receipt); "
    "applied over the provider's entry until the operator writes a newer one.", _COMPACT,
)
REGISTRY_TRUSTED_KEYS = Topic(
    "frs.registry.trusted_keys", "key_id", 1, -1, "compact", (ev.TrustedKey,),
    "Public keys the operator trusts, by purpose (policy-decisions: the policy gate's).",
    _COMPACT,
)
# What every service's registry view follows (services/kit/follower.py).
REGISTRY_TOPICS: tuple[Topic, ...] = (REGISTRY_CASES, REGISTRY_AGENTS, REGISTRY_PROVIDERS,
                                      REGISTRY_SUSPENSIONS, REGISTRY_TRUSTED_KEYS)
# Not an event topic: each record is a clock probe (the writing service's name, nothing
# else). LogAppendTime makes the broker stamp it with its own time and return that time in
# the produce response: the trusted time the intake's purger judges expiry by.
BROKER_CLOCK = Topic(
    "frs.clock", "service", 1, HOUR_MS, "delete", (),
    "Broker clock samples (LogAppendTime); raw records holding the writer's service name.",
    {"message.timestamp.type": "LogAppendTime"},
)

SERVICES = ("intake", "policy", "dispatch", "results", "audit", "oversight")


def dlq_topic(service: str) -> Topic:
    return Topic(
        f"frs.dlq.{service}", "original key", 1, 7 * DAY_MS, "delete", (),
        f"Messages the {service} consumer could not process, with error headers.",
        # A dead-lettered probe request is as large as the request, plus error headers.
        {"max.message.bytes": str(MAX_DLQ_BYTES)},
    )


DLQ_TOPICS: tuple[Topic, ...] = tuple(dlq_topic(s) for s in SERVICES)

TOPICS: tuple[Topic, ...] = (
    PROBE_REQUESTS,
    PROBE_EVENTS,
    POLICY_DECISIONS,
    EXIGENT_REVIEWS,
    DISPATCH_EVENTS,
    PROVIDER_RESPONSES,
    RESULTS_EVENTS,
    AUDIT_CHECKPOINTS,
    AUDIT_VIOLATIONS,
    OVERSIGHT_ALERTS,
    REGISTRY_CASES,
    REGISTRY_AGENTS,
    REGISTRY_PROVIDERS,
    REGISTRY_SUSPENSIONS,
    REGISTRY_TRUSTED_KEYS,
    BROKER_CLOCK,
    *DLQ_TOPICS,
)

# The oversight app's own faust topics (its id is the prefix): the repartition topic of
# its observations and its tables' changelogs. Not events: nobody but the app reads them,
# so they are outside TOPICS (and the audit log); `frs topics create` makes them too,
# because the app does not declare topics (the broker does not auto-create).
OVERSIGHT_APP_ID = "frs-oversight"
_OVERSIGHT_PARTITIONS = 3  # as its inputs: a table's changelog has its source's partitions


_EXPIRING = {**_COMPACT, "cleanup.policy": "compact,delete"}


def oversight_topics(app_id: str = OVERSIGHT_APP_ID) -> tuple[Topic, ...]:
    """The topics of an oversight app with this id (tests run apps of their own)."""
    return (
        Topic(f"{app_id}-observations", "subject", _OVERSIGHT_PARTITIONS, 8 * DAY_MS,
              "delete", (), "Oversight observations, repartitioned by subject (agent, "
              "digest, provider, probe)."),
        # Compacted, and what nobody wrote for ten days goes: a probe or subject that
        # quiet is outside every window and deadline, and recovery stays short.
        Topic(f"{app_id}-probes-changelog", "probe_id", _OVERSIGHT_PARTITIONS, 10 * DAY_MS,
              "compact", (), "Changelog of the oversight probes table.", _EXPIRING),
        Topic(f"{app_id}-subjects-changelog", "subject", _OVERSIGHT_PARTITIONS, 10 * DAY_MS,
              "compact", (), "Changelog of the oversight subjects table.", _EXPIRING),
    )


OVERSIGHT_INTERNAL = oversight_topics()

# What the audit log records: every topic but the clock samples (no event, no person).
AUDITED_TOPICS: tuple[Topic, ...] = tuple(t for t in TOPICS if t is not BROKER_CLOCK)
TOPIC_BY_NAME: dict[str, Topic] = {t.name: t for t in TOPICS}
TOPIC_FOR_EVENT: dict[type[ev.Event], Topic] = {e: t for t in TOPICS for e in t.events}


def topic_for(event: ev.Event) -> Topic:
    return TOPIC_FOR_EVENT[type(event)]

"""The oversight app on faust-streaming: the one module (with ``__main__``) that knows faust.

Two agents and two changelog-backed tables (in-memory store, recovered from their
changelog topics at start):
- ``observe`` reads the pipeline's probe-keyed topics, keeps each probe's facts in the
  ``probes`` table and sends what each event says about a subject to the app's
  observations topic, keyed by subject (the repartition step);
- ``judge`` reads the observations, keeps each subject's windows in the ``subjects`` table
  and publishes the alerts the rules return to ``frs.oversight.alerts``.
A timer sends review deadlines that passed as observations too. The rules are the plain
functions of ``handlers.py``; a record a rule (or the decoder) fails on goes to
``frs.dlq.oversight`` with the reason, and the stream moves on.

At least once, no duplicate effects: an alert is acknowledged by the broker before its
subject's state is written and the offset committed; an observation already in a subject's
state changes nothing; the alert's CloudEvent id is its deterministic ``alert_id`` and the
rest of its record (body, time, trace) follows from the alert, so a republished alert is the
same record again, recorded once by whoever keys by CloudEvent id.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, cast

import faust
from aiokafka.partitioner import DefaultPartitioner
from faust.serializers.codecs import Codec
from faust.types.codecs import CodecT
from prometheus_client import Counter, Histogram
from pydantic import BaseModel, ValidationError

from schemas.catalog import (
    DISPATCH_EVENTS,
    OVERSIGHT_ALERTS,
    POLICY_DECISIONS,
    PROBE_EVENTS,
    RESULTS_EVENTS,
    dlq_topic,
    oversight_topics,
)
from schemas.envelope import DecodeError, decode, encode
from schemas.events import UsageAlert
from services.kit.kafka import SASL_MECHANISM, KafkaSettings, ssl_context
from services.kit.metrics import LATENCY_BUCKETS
from services.oversight.handlers import (
    Observation,
    ProbeFacts,
    RuleFailed,
    SubjectState,
    judge,
    observe,
    review_due,
)
from services.oversight.settings import OversightSettings

log = logging.getLogger("frs.oversight")
M = TypeVar("M", bound=BaseModel)
SOURCE = "/frs/oversight"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
INPUTS = (PROBE_EVENTS, POLICY_DECISIONS, DISPATCH_EVENTS, RESULTS_EVENTS)

ALERTS = Counter("frs_oversight_alerts_total", "Usage alerts published, by rule.", ["rule"])
EVENTS_IN = Counter("frs_oversight_events_in_total", "Events observed, by type.", ["type"])
OBSERVATIONS_OUT = Counter("frs_oversight_observations_total",
                           "Observations judged, by subject kind and kind.",
                           ["subject_kind", "kind"])
RULE_FAILURES = Counter("frs_oversight_rule_failures_total",
                        "Records a rule raised on (sent to the DLQ), by rule.", ["rule"])
DLQ = Counter("frs_oversight_dlq_total", "Records sent to the dead-letter topic.", ["reason"])
JUDGE_SECONDS = Histogram("frs_oversight_judge_seconds", "Time to judge one observation.",
                          buckets=LATENCY_BUCKETS)


def credentials(kafka: KafkaSettings) -> faust.types.auth.CredentialsT | None:
    """The service's own principal, on the TLS context the kit builds for every client."""
    if kafka.kafka_security_protocol == "PLAINTEXT":
        return None
    context = ssl_context(kafka)
    if kafka.kafka_security_protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(username=kafka.kafka_sasl_username,
                                 password=kafka.sasl_password().get_secret_value(),
                                 ssl_context=context, mechanism=SASL_MECHANISM)


class ModelCodec(Codec):
    """A table's values as pydantic models: JSON on the changelog, models in memory, so a
    read is a dict lookup and only a write pays for the encoding (a recovered value is
    JSON until its first read, ``_as``)."""

    def __init__(self, model: type[BaseModel], children: tuple[CodecT, ...] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(children, model=model, **kwargs)
        self.model = model

    def _dumps(self, obj: Any) -> bytes:
        return cast(BaseModel, obj).model_dump_json().encode()

    def _loads(self, s: bytes) -> Any:
        return self.model.model_validate_json(s)


def _as(model: type[M], value: Any) -> M | None:
    # Recovery from the changelog gives the JSON (dicts); what this process wrote, models.
    return value if value is None or isinstance(value, model) else model.model_validate(value)


def _partition_of(key: str, partitions: int) -> int:
    # The kit's producers partition by aiokafka's default (murmur2, as Java's clients do).
    ids = list(range(partitions))
    return int(DefaultPartitioner()(key.encode(), ids, ids))


def alert_traceparent(alert: UsageAlert) -> str:
    """A trace of the alert's own, named by its id: an alert published again after a crash
    is then the same record, headers and all (its CloudEvent id is the alert id)."""
    digest = hashlib.sha256(alert.alert_id.encode()).hexdigest()
    return f"00-{digest[:32]}-{digest[32:48]}-01"


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    items: Iterable[Any] = raw.items() if isinstance(raw, dict) else (raw or ())
    return [(str(k), bytes(v)) for k, v in items]


def _app(s: OversightSettings, app_id: str) -> faust.App:
    # faust makes an (empty, with in-memory tables) data directory: not in the working
    # directory nor the state dir; removed at exit.
    scratch = tempfile.TemporaryDirectory(prefix=f"{app_id}-")
    app = faust.App(
        app_id,
        datadir=scratch.name,
        broker=[f"kafka://{b.strip()}" for b in s.kafka_bootstrap.split(",")],
        broker_credentials=credentials(s),
        store="memory://",
        # The broker does not auto-create and the principal may not create: every topic,
        # the app's own included, comes from `frs topics create`.
        topic_allow_declare=False,
        topic_disable_leader=True,
        # A hot copy of another worker's tables: a dead worker's partitions are taken
        # over without replaying their changelogs (the timer acts on active ones only).
        table_standby_replicas=1,
        topic_partitions=oversight_topics(app_id)[0].partitions,
        consumer_auto_offset_reset="earliest",
        # A dead worker's partitions move in seconds, not after faust's minute.
        broker_session_timeout=s.session_timeout_s,
        broker_heartbeat_interval=s.heartbeat_interval_s,
        broker_rebalance_timeout=s.rebalance_timeout_s,
        broker_commit_interval=s.commit_interval_s,
        producer_acks=-1,
        web_enabled=False,
    )
    cast(Any, app)._frs_datadir = scratch  # lives as long as the app
    return app


def build_counter(settings: OversightSettings, topic: str, app_id: str
                  ) -> tuple[faust.App, Callable[[], int]]:
    """The bench's baseline: a bare faust agent on ``topic`` that only counts records."""
    app = _app(settings, app_id)
    seen = [0]

    @app.agent(app.topic(topic, key_serializer="raw", value_serializer="raw"))
    async def count(stream: faust.StreamT[bytes]) -> None:
        async for _event in stream.events():
            seen[0] += 1

    return app, lambda: seen[0]


def build(settings: OversightSettings, inputs: Sequence[str] | None = None) -> faust.App:
    """The oversight app; ``inputs`` replaces the pipeline's topics (the bench's scratch
    topic)."""
    s = settings
    limits = s.limits()
    observations_topic = oversight_topics(s.app_id)[0]
    app = _app(s, s.app_id)
    def raw(*names: str) -> faust.TopicT:
        # CloudEvents in binary mode: the kit's codec reads them, not faust's.
        return app.topic(*names, key_serializer="raw", value_serializer="raw")

    sources = raw(*(inputs or [t.name for t in INPUTS]))
    observations = raw(observations_topic.name)
    alerts = raw(OVERSIGHT_ALERTS.name)
    dlq = raw(dlq_topic("oversight").name)
    partitions = observations_topic.partitions
    probes = app.Table("probes", default=None, partitions=partitions)
    subjects = app.Table("subjects", default=None, partitions=partitions)
    # Before first use (the store and the changelog topic are made lazily with it).
    cast(Any, probes).value_serializer = ModelCodec(ProbeFacts)
    cast(Any, subjects).value_serializer = ModelCodec(SubjectState)
    flagged: set[str] = set()  # review deadlines sent by this process (a restart resends)
    # per results partition: the latest event time read, when a record was last read, and
    # the offset after the last one handled
    results_seen: dict[int, tuple[datetime, float]] = {}
    results_next: dict[int, int] = {}
    began = time.monotonic()
    ticking = asyncio.Lock()  # faust starts a tick even while the last one still runs
    reviews: dict[str, datetime] = {}  # probe -> review deadline, not yet met
    indexed: list[frozenset[int]] = [frozenset()]  # results partitions reviews indexes

    async def dead_letter(event: faust.EventT[Any], code: str, message: str) -> None:
        DLQ.labels(code).inc()
        m = event.message
        headers = [*_headers(m.headers),
                   ("frs_value_sha256", hashlib.sha256(m.value or b"").hexdigest().encode()),
                   ("frs_error_code", code.encode()), ("frs_error", message[:1000].encode()),
                   ("frs_error_service", b"oversight"), ("frs_source_topic", m.topic.encode()),
                   ("frs_source_partition", str(m.partition).encode()),
                   ("frs_source_offset", str(m.offset).encode())]
        await (await dlq.send(key=m.key, value=m.value, headers=headers))
        log.error("sent to DLQ", extra={"topic": m.topic, "offset": m.offset, "code": code})

    async def say(obs: Observation) -> None:
        await observations.send(key=obs.key.encode(), value=obs.model_dump_json().encode())

    @app.agent(sources)
    async def observe_events(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            m = event.message
            try:
                env = decode(_headers(m.headers), m.key, m.value,
                             timestamp_ms=int(m.timestamp * 1000),
                             timestamp_type=m.timestamp_type)
            except DecodeError as exc:
                await dead_letter(event, exc.code, exc.message)
                continue
            EVENTS_IN.labels(env.type).inc()
            if m.topic == RESULTS_EVENTS.name:
                results_seen[m.partition] = (max(env.time, results_seen.get(
                    m.partition, (env.time, 0.0))[0]), time.monotonic())
                results_next[m.partition] = m.offset + 1
            probe_id = getattr(env.event, "probe_id", None)
            if probe_id is None:
                continue
            try:
                before = _as(ProbeFacts, probes.get(probe_id))
                facts, said = observe(env.id, env.event, before)
            except Exception as exc:  # a record must not stop the stream: DLQ, move on
                await dead_letter(event, "observe_failed", type(exc).__name__)
                continue
            for obs in said:
                await say(obs)
            if facts is not None and facts is not before:
                probes[probe_id] = facts
                remember_review(probe_id, facts)

    @app.agent(observations)
    async def judge_observations(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                obs = Observation.model_validate_json(event.message.value or b"")
                state = _as(SubjectState, subjects.get(obs.key))
                started = time.perf_counter()
                after, found = judge(obs, state, limits)
                JUDGE_SECONDS.observe(time.perf_counter() - started)
            except RuleFailed as exc:
                RULE_FAILURES.labels(exc.rule.value).inc()
                await dead_letter(event, "rule_failed", str(exc))
                continue
            except ValidationError as exc:
                await dead_letter(event, "invalid_observation", type(exc).__name__)
                continue
            except Exception as exc:
                await dead_letter(event, "judge_failed", type(exc).__name__)
                continue
            OBSERVATIONS_OUT.labels(obs.subject_kind, obs.kind).inc()
            for alert in found:
                await publish(alert, obs.event_id)
            if after is not state:
                subjects[obs.key] = after
            if found:
                # The state that remembers the alert, on the broker now: a crash between
                # the two is the only way an alert is published twice (same id, same body).
                await app.producer.flush()

    async def publish(alert: UsageAlert, cause: str) -> None:
        # The alert is on the broker before the state that remembers it is written.
        record = encode(alert, SOURCE, causation_id=cause, event_id=alert.alert_id,
                        time=alert.observed_at, traceparent=alert_traceparent(alert))
        await (await alerts.send(key=record.key, value=record.value,
                                 headers=list(record.headers)))
        ALERTS.labels(alert.rule.value).inc()
        log.info("usage alert", extra={"rule": alert.rule.value, "alert_id": alert.alert_id,
                                       "subject_kind": alert.subject_kind})

    async def review_deadlines() -> None:
        # A timer that raises crashes the faust app: a failed tick is logged, the next
        # comes on time (as the kit's jobs do).
        if ticking.locked():
            return
        try:
            async with ticking:
                await check_reviews()
        except Exception:
            log.exception("review deadline tick failed")

    async def check_reviews() -> None:
        # Only the probes of the results partitions this worker owns (the timer runs on
        # every worker). A partition's time is the latest event time read from it, and the
        # wall clock only once it is caught up (handled to its end) and has been quiet a
        # while: a review that is on the log but not handled yet (a restart, a backlog, a
        # partition starved by busier ones) must not be taken for a missing one.
        owned_tps = [tp for tp in app.consumer.assignment()
                     if tp.topic == RESULTS_EVENTS.name]
        owned = frozenset(tp.partition for tp in owned_tps)
        if owned != indexed[0]:
            # New partitions bring table entries the stream did not pass through here.
            indexed[0] = owned
            for probe_id, stored in list(probes.items()):
                remember_review(probe_id, _as(ProbeFacts, stored))
        wall = datetime.now(UTC)
        due = [p for p, at in reviews.items() if at <= wall and p not in flagged
               and _partition_of(p, RESULTS_EVENTS.partitions) in owned]
        if not due:
            return
        ends = await app.consumer.highwaters(*owned_tps)
        caught_up = set()
        for tp in owned_tps:
            handled = results_next.get(tp.partition)
            if handled is None:
                try:
                    handled = await app.consumer.position(tp)
                except Exception:  # in the middle of a rebalance: next tick
                    continue
            if handled is not None and ends.get(tp) is not None and handled >= ends[tp]:
                caught_up.add(tp.partition)
        for probe_id in due:
            facts = _as(ProbeFacts, probes.get(probe_id))
            if facts is None:
                reviews.pop(probe_id, None)
                continue
            partition = _partition_of(probe_id, RESULTS_EVENTS.partitions)
            # Not read from since the start: quiet only once it has been for a while.
            latest, read_at = results_seen.get(partition, (_EPOCH, began))
            quiet = (partition in caught_up
                     and time.monotonic() - read_at >= s.review_quiet_s)
            obs = review_due(facts, max(latest, wall) if quiet else latest, limits)
            if obs is not None:
                await say(obs)
                flagged.add(probe_id)
                reviews.pop(probe_id, None)

    def remember_review(probe_id: str, facts: ProbeFacts | None) -> None:
        """Index the reviews that may come due, so a tick does not scan every probe."""
        if facts is None or facts.review_requested_at is None:
            return
        due = facts.review_requested_at + timedelta(seconds=limits.review_deadline_s)
        done = facts.review_completed_at
        if done is not None and done <= due:
            reviews.pop(probe_id, None)
        else:
            reviews[probe_id] = due

    app.timer(s.tick_s)(review_deadlines)
    return app

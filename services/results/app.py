"""Results service: builds ports from Settings and routes topics to handlers.

Two consumer groups run in one process:
- ``frs-results`` normalizes ProviderAnswered (every inbound channel) into
  CandidatesReceived or ProviderResponseRejected;
- ``frs-results-tracker`` tracks each probe (dispatches, failures, answers, reviews,
  deletion receipts) in a SQLite store committed before its offsets, and settles probes.
Also: the deadline timer (a background job: NoResponse, DeletionOverdue, suspensions) and
the inbound channels (HTTPS webhook, SMTP inbox), each started when configured.

Why the kit's Processor and SQLite rather than faust (tried first on the pinned broker):
see services/results/README.md."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from prometheus_client import Counter, Gauge
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from schemas.catalog import (
    DISPATCH_EVENTS,
    POLICY_DECISIONS,
    PROBE_EVENTS,
    PROVIDER_RESPONSES,
    RESULTS_EVENTS,
)
from schemas.envelope import Envelope
from schemas.events import DeletionOverdue, Event, ProviderAnswered, ProviderRecord
from schemas.types import utcnow
from services.kit.bus import Processor, Publisher, Route, all_partitions, bind
from services.kit.kafka import client_options
from services.kit.registry import Registries
from services.kit.service import dlq_for, processor
from services.kit.settings import ServiceSettings
from services.results import handlers, tracking
from services.results.mailbox import start_mailbox
from services.results.store import TrackerStore
from services.results.webhook import start_webhook

log = logging.getLogger("frs.results")

REVIEWS_PENDING = Gauge("frs_results_reviews_pending",
                        "Probes waiting for a trained examiner's review.")
DELETIONS_OVERDUE = Gauge("frs_results_deletion_receipts_overdue",
                          "Provider deletion receipts past their deadline and still missing.")
DEADLINES_MISSED = Counter("frs_results_deadlines_missed_total",
                           "NoResponse and DeletionOverdue events emitted, by type.", ["type"])

Job = Callable[[], Coroutine[Any, Any, None]]


class ResultsSettings(ServiceSettings):
    """Every setting is FRS_RESULTS_<NAME> (e.g. FRS_RESULTS_WEBHOOK_PORT)."""

    model_config = SettingsConfigDict(env_prefix="FRS_RESULTS_", frozen=True, extra="ignore",
                                      populate_by_name=True)
    service: str = "results"
    metrics_port: int = Field(9303, description="Port for /metrics.")
    tracker_db: Path | None = Field(
        None, description="SQLite file of per-probe tracking state; default "
                          "<FRS_STATE_DIR>/results/tracker.sqlite3.")
    tick_s: float = Field(1.0, gt=0, description="How often deadlines are checked, seconds.")
    timer_arm_max_wait_s: float = Field(
        60.0, gt=0, description="At start, deadlines wait until the tracker has consumed the "
                                "backlog, at most this long, seconds.")
    suspend_on_deletion_overdue: bool = Field(
        False, description="Suspend a provider (registry status 'suspended') when it misses "
                           "a deletion deadline.")
    # HTTPS webhook for API vendors (off unless a certificate is configured).
    webhook_host: str = Field("127.0.0.1", description="Webhook bind address.")
    webhook_port: int = Field(8444, ge=0, le=65535, description="Webhook TLS port.")
    webhook_cert_file: Path | None = Field(
        None, description="PEM certificate chain of the webhook; the webhook runs only when "
                          "this is set.")
    webhook_key_file: Path | None = Field(None, description="PEM private key of the webhook.")
    webhook_secrets_file: Path | None = Field(
        None, description='JSON {"provider_id": "shared secret", ...} for HMAC-SHA256.')
    webhook_window_s: int = Field(
        300, ge=1, description="Accepted clock skew of X-FRS-Timestamp, seconds; also how "
                               "long accepted signatures are remembered against replay.")
    webhook_max_body: int = Field(1_048_576, ge=1024, description="Largest body, bytes.")
    webhook_unknown_hold_s: float = Field(
        2.0, ge=0, le=30, description="How long an answer for a request_ref not yet "
        "recorded waits for dispatch's record of the send before a 404.")
    nonce_db: Path | None = Field(
        None, description="SQLite file of accepted webhook signatures; default "
                          "<FRS_STATE_DIR>/results/nonces.sqlite3.")
    # SMTP inbox for S/MIME replies (off unless the broker's S/MIME key is configured).
    smtp_host: str = Field("127.0.0.1", description="SMTP inbox bind address.")
    smtp_port: int = Field(8025, ge=0, le=65535, description="SMTP inbox port.")
    smime_cert_file: Path | None = Field(
        None, description="The broker's S/MIME certificate (PEM); the inbox runs only when "
                          "this and the key are set.")
    smime_key_file: Path | None = Field(
        None, description="The broker's S/MIME RSA private key (PEM).")
    smtp_require_signature: bool = Field(
        True, description="Refuse replies not signed with the provider's registered "
                          "certificate (ProviderRecord.certificate_pem).")
    smtp_max_message: int = Field(4_194_304, ge=1024, description="Largest mail, bytes.")

    @model_validator(mode="after")
    def _secure_outside_local_mode(self) -> ResultsSettings:
        if not self.local_mode and not self.smtp_require_signature:
            raise ValueError("FRS_RESULTS_SMTP_REQUIRE_SIGNATURE=false is for local mode only")
        if self.webhook_key_file is not None and self.webhook_cert_file is None:
            raise ValueError("FRS_RESULTS_WEBHOOK_KEY_FILE without a certificate file")
        return self

    def tracker_path(self) -> Path:
        return self.tracker_db or self.state_dir / "results" / "tracker.sqlite3"

    def nonce_path(self) -> Path:
        return self.nonce_db or self.state_dir / "results" / "nonces.sqlite3"


def build(settings: ResultsSettings, publisher: Publisher, registries: Registries,
          stack: AsyncExitStack | None = None) -> list[Processor]:
    processors, _jobs = build_all(settings, publisher, registries, stack or AsyncExitStack())
    return processors


def build_all(settings: ResultsSettings, publisher: Publisher, registries: Registries,
              stack: AsyncExitStack) -> tuple[list[Processor], list[Job]]:
    ports = handlers.ResultsPorts(registries=registries, clock=utcnow)

    normalizer = Route("results", "frs-results", (PROVIDER_RESPONSES.name,),
                       dict([bind(ProviderAnswered, handlers.on_provider_answered, ports)]),
                       dlq_for("results"))

    store = TrackerStore(settings.tracker_path())
    stack.callback(store.close)

    async def track(event: Any, _env: Envelope) -> list[Event]:
        state = store.get(event.probe_id)
        pid = getattr(event, "provider_id", None)
        provider = registries.providers.get(pid) if pid else None
        new, out = tracking.apply(state, event, provider, utcnow())
        if new != state:
            store.put(new)  # committed in before_commit, after `out` is acknowledged
        return out

    async def durable() -> None:
        store.commit()

    tracker = Route(
        "results", "frs-results-tracker",
        (PROBE_EVENTS.name, POLICY_DECISIONS.name, DISPATCH_EVENTS.name, RESULTS_EVENTS.name),
        dict.fromkeys(tracking.TRACKED_TYPES, track), dlq_for("results"),
        before_commit=durable,
    )
    jobs: list[Job] = [lambda: deadline_timer(settings, store, registries, publisher,
                                              tracker.group_id, tracker.topics)]
    return ([processor(settings, normalizer, publisher), processor(settings, tracker, publisher)],
            jobs)


async def start_channels(settings: ResultsSettings, publisher: Publisher,
                         registries: Registries, stack: AsyncExitStack) -> None:
    """Start the configured inbound channels; a failure to bind fails the service start."""
    if settings.webhook_cert_file is not None:
        await start_webhook(settings, publisher, registries, stack)
    if settings.smime_cert_file is not None:
        await start_mailbox(settings, publisher, registries, stack)


async def backlog_done(bootstrap: str, group: str, topics: Sequence[str],
                       poll_s: float = 0.5) -> None:
    """Wait until ``group`` has committed everything that was in ``topics`` when called.

    Until then the tracker's state is incomplete (a receipt may still be in the backlog),
    and a deadline fired from it could wrongly suspend a provider. (A partition ending in
    a transaction marker never reaches its end offset by commits: the caller bounds the
    wait.)"""
    consumer = AIOKafkaConsumer(**client_options(bootstrap=bootstrap), group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        parts = await all_partitions(consumer, topics)
        end = await consumer.end_offsets(parts)
        pending = [tp for tp in parts if end[tp] > 0]
        while pending:
            pending = [tp for tp in pending if (await consumer.committed(tp) or 0) < end[tp]]
            if pending:
                await asyncio.sleep(poll_s)
    finally:
        await consumer.stop()


async def deadline_timer(settings: ResultsSettings, store: TrackerStore,
                         registries: Registries, publisher: Publisher, group: str,
                         topics: Sequence[str]) -> None:
    """Emit NoResponse / DeletionOverdue for passed deadlines. The tracker consumes them
    back (that is what settles the provider), so the timer itself keeps no durable state:
    after a restart it may repeat an event the tracker had not consumed yet, and the
    tracker ignores the repeat. It starts once the tracker has caught up with the backlog."""
    try:
        await asyncio.wait_for(backlog_done(settings.kafka_bootstrap, group, topics),
                               settings.timer_arm_max_wait_s)
    except TimeoutError:
        log.warning("deadline timer armed before the tracker caught up",
                    extra={"waited_s": settings.timer_arm_max_wait_s})
    log.info("deadline timer armed", extra={"group": group})
    emitted: set[tuple[str, str, str]] = set()
    while True:
        await asyncio.sleep(settings.tick_s)
        try:
            reviews, overdue = store.open_counts()
            REVIEWS_PENDING.set(reviews)
            DELETIONS_OVERDUE.set(overdue)
            now = utcnow()
            current: set[tuple[str, str, str]] = set()
            for state in list(store.due_before(now)):
                for event in tracking.due(state, now, settings.suspend_on_deletion_overdue):
                    key = (event.TYPE, event.probe_id, event.provider_id)
                    current.add(key)
                    if key in emitted:
                        continue
                    out: list[Event] = [event]
                    if isinstance(event, DeletionOverdue) and event.provider_suspended:
                        suspension = _suspension(registries.providers.get(event.provider_id))
                        if suspension is None:
                            out = [event.model_copy(update={"provider_suspended": False})]
                        else:
                            out.append(suspension)
                    await publisher.publish(out)
                    emitted.add(key)
                    DEADLINES_MISSED.labels(event.TYPE).inc()
                    log.info("deadline passed", extra={"type": event.TYPE,
                                                       "provider": event.provider_id})
            # Once the tracker has consumed an event its deadline is no longer due: forget it.
            emitted &= current
        except Exception as exc:  # keep ticking: a failed publish is retried next tick
            log.warning("deadline check failed", extra={"error": type(exc).__name__})


def _suspension(provider: ProviderRecord | None) -> ProviderRecord | None:
    if provider is None:
        return None
    # REQ-DELETION-RECEIPT: dispatch refuses a suspended provider from its registry view.
    return provider.model_copy(update={"status": "suspended", "updated_at": utcnow()})

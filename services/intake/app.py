"""Intake service: ``build(settings)`` declares the intake and policy gates' routes, the
purge and review jobs, and the broker-clock check that must pass before any of them. The
policy gate's routes run as its own principal (``policy``, FRS_POLICY_KAFKA_*): only it
may write frs.policy.decisions, and it signs every decision with its own key."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import timedelta

from schemas.catalog import EXIGENT_REVIEWS, PROBE_EVENTS, PROBE_REQUESTS
from schemas.envelope import DecodeError
from schemas.events import (
    Event,
    ProbeRequested,
    ProbeSubmitted,
    SupervisorReviewRecorded,
)
from schemas.types import utcnow
from services.intake import handlers
from services.intake.crypto import load_or_create_private_key
from services.intake.decoder import DecoderPool, WorkerLimits
from services.intake.outcomes import OutcomeLog, Outcomes, PgOutcomeLog
from services.intake.policy import handlers as policy
from services.intake.policy.engine import PolicyEngine
from services.intake.policy.reviews import PgReviewStore, Reviews, ReviewStore
from services.intake.policy.signing import load_or_create_signing_key
from services.intake.policy.watch import report_overdue
from services.intake.purge import Purger
from services.intake.quality import QualityGate
from services.intake.sanitize import SanitizeLimits
from services.intake.settings import IntakeSettings
from services.kit.app import Context, Job, ServiceApp, Wiring
from services.kit.clock import BrokerClock, ClockUnavailable, kafka_stamp
from services.kit.publisher import Publisher
from services.kit.registry import Registries
from services.kit.routing import RawRecord, Route, bind, dlq_for
from services.kit.state import PostgresState, open_state
from services.vault import SqliteVaultIndex, Vault, open_index
from services.vault import open_vault as open_shared_vault

log = logging.getLogger("frs.intake")

POLICY_IDENTITY = "policy"


def open_vault(settings: IntakeSettings,
               stack: AsyncExitStack) -> tuple[Vault, OutcomeLog | None]:
    """The vault over the index FRS_STATE_URL names. On SQLite the request-outcome log
    shares its file; on PostgreSQL no local file is made (outcomes are in the database)."""
    index = open_index(settings.vault, settings.state(), settings.state_password_file,
                       name="intake-vault")
    stack.callback(index.close)
    local = OutcomeLog(index.conn) if isinstance(index, SqliteVaultIndex) else None
    return open_shared_vault(settings.vault, index), local


def broker_clock(settings: IntakeSettings, publisher: Publisher) -> BrokerClock:
    return BrokerClock(kafka_stamp(publisher, settings.service),
                       resample_s=settings.clock_resample_s, max_age_s=settings.clock_max_age_s)


def build_purger(settings: IntakeSettings, publisher: Publisher, registries: Registries,
                 vault: Vault, trusted: BrokerClock) -> Purger:
    async def publish(events: Sequence[Event]) -> None:
        await publisher.publish(events)

    return Purger(vault, lambda: registries.cases, publish, utcnow,
                  interval_s=settings.purge_interval_s,
                  fault_kill_mid_purge=settings.fault_kill_mid_purge,
                  trusted=trusted, skew_warn_s=settings.clock_skew_warn_s)


def build(settings: IntakeSettings) -> ServiceApp:
    """The intake gate and the policy gate, one process: three routes, the purge sweep,
    the vault gauges and the exigent review watch; the broker's clock must answer first.
    The two policy routes and the review watch act as the ``policy`` identity."""

    def wire(ctx: Context) -> Wiring:
        stack, publisher, registries = ctx.stack, ctx.publisher, ctx.registries
        probe_vault, local_outcomes = open_vault(settings, stack)
        # FRS_STATE_URL: request outcomes and review flags in the shared PostgreSQL
        # database (every instance sees every request id), or SQLite in the state dir.
        shared = open_state(settings.state(), settings.state_password_file, stack,
                            name="intake")
        outcomes: Outcomes
        if isinstance(shared, PostgresState):
            outcomes = PgOutcomeLog(shared.pool)
        else:
            assert local_outcomes is not None  # SQLite state: the vault's file
            outcomes = local_outcomes
        clock = broker_clock(settings, publisher)

        async def trusted_time() -> None:
            # A clock topic that is missing, not LogAppendTime or not writable stops the
            # start here, with the reason, instead of leaving expiries to the local clock.
            try:
                await clock.sample()
            except ClockUnavailable as exc:
                log.error("cannot read the broker's clock", extra={"error": str(exc)[:300]})
                raise SystemExit(1) from None

        # Image work runs in worker processes under CPU and memory limits (decoder.py).
        image_worker = DecoderPool(settings.image_workers, WorkerLimits(
            cpu_seconds=settings.decode_cpu_seconds, memory_mb=settings.decode_memory_mb,
            max_images=settings.decode_max_images))
        stack.callback(image_worker.shutdown, wait=True, cancel_futures=True)
        intake_ports = handlers.IntakePorts(
            private_key=load_or_create_private_key(settings.private_key_file),
            # Submission times and expiries: the broker clock's lower bound (an expiry a
            # little early, never late).
            clock=clock.now, image_ttl=timedelta(hours=settings.image_ttl_hours),
            vault=probe_vault, outcomes=outcomes,
            limits=SanitizeLimits(max_bytes=settings.max_image_bytes,
                                  max_pixels=settings.max_image_pixels,
                                  jpeg_quality=settings.jpeg_quality,
                                  max_jpeg_scans=settings.max_jpeg_scans),
            gate=QualityGate(enabled=settings.quality_gate_enabled,
                             max_faces=settings.quality_max_faces,
                             min_face_px=settings.quality_min_face_px,
                             min_sharpness=settings.quality_min_sharpness,
                             min_exposure=settings.quality_min_exposure,
                             max_exposure=settings.quality_max_exposure),
            image_worker=image_worker,
        )
        # Policy: the Cedar set is loaded and type-checked once; a bad set stops the start.
        policy_settings = settings.policy
        engine = PolicyEngine.load(policy_settings.dir)
        signing_key = load_or_create_signing_key(
            policy_settings.signing_key_path(settings.state_dir))
        store: Reviews
        if isinstance(shared, PostgresState):
            store = PgReviewStore(shared.pool)
        else:
            local_store = ReviewStore(policy_settings.review_db
                                      or settings.state_dir / "policy" / "exigent_reviews.sqlite")
            stack.callback(local_store.close)
            store = local_store
        review_ports = policy.ReviewPorts(
            store=store, registries=registries, clock=utcnow,
            review_window=timedelta(hours=policy_settings.review_window_hours))
        policy_ports = handlers.PolicyPorts(registries=registries, clock=utcnow, engine=engine,
                                            signing_key=signing_key, reviews=review_ports)

        async def invalid_request(raw: RawRecord, err: DecodeError) -> list[Event]:
            return await handlers.on_invalid_request(raw.key, raw.value, err, intake_ports)

        intake = Route("intake", "frs-intake", (PROBE_REQUESTS.name,),
                       dict([bind(ProbeRequested, handlers.on_probe_requested, intake_ports)]),
                       dlq_for("intake"), on_invalid=invalid_request,
                       dlq_value=handlers.request_for_dlq)
        gate = Route("policy", "frs-policy", (PROBE_EVENTS.name,),
                     dict([bind(ProbeSubmitted, handlers.on_probe_submitted, policy_ports)]),
                     dlq_for("policy"), identity=POLICY_IDENTITY)
        # Reviews come only from their own topic, which only supervisors write. The gate
        # flags exigent clearances itself (policy_ports.reviews): no decision is read back.
        reviews = Route("policy", "frs-policy-reviews", (EXIGENT_REVIEWS.name,),
                        dict([bind(SupervisorReviewRecorded, policy.on_supervisor_review,
                                   review_ports)]),
                        dlq_for("policy"), identity=POLICY_IDENTITY)
        purger = build_purger(settings, publisher, registries, probe_vault, clock)
        policy_publisher = ctx.publisher_as(POLICY_IDENTITY)

        async def review_watch() -> None:
            await report_overdue(store, policy_publisher, utcnow)

        return Wiring(
            routes=[intake, gate, reviews],
            jobs=[*purger.jobs(),
                  Job("exigent review watch", policy_settings.review_check_interval_s,
                      review_watch)],
            # The shared state's schema first: a wrong one stops the start in one line.
            preflight=[*([shared.preflight] if isinstance(shared, PostgresState) else []),
                       trusted_time])

    return ServiceApp(settings, wire, identities={
        POLICY_IDENTITY: settings.policy.over(settings, POLICY_IDENTITY)})

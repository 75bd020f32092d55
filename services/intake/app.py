"""Intake service: builds ports from Settings and routes topics to handlers."""

from __future__ import annotations

from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.catalog import POLICY_DECISIONS, PROBE_EVENTS, PROBE_REQUESTS
from schemas.envelope import DecodeError, Envelope
from schemas.events import (
    Event,
    PolicyCleared,
    ProbeRequested,
    ProbeSubmitted,
    SupervisorReviewRecorded,
)
from schemas.types import utcnow
from services.intake import handlers
from services.intake.crypto import load_or_create_private_key
from services.intake.policy import handlers as policy
from services.intake.policy.engine import PolicyEngine
from services.intake.policy.reviews import ReviewStore
from services.intake.policy.settings import PolicySettings
from services.intake.policy.watch import start_overdue_watch
from services.kit.bus import Processor, Publisher, RawRecord, Route
from services.kit.registry import Registries
from services.kit.service import dlq_for, processor
from services.kit.settings import ServiceSettings


class IntakeSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRS_INTAKE_", frozen=True, extra="ignore",
                                      populate_by_name=True)
    service: str = "intake"
    metrics_port: int = Field(9301, description="Port for /metrics.")
    private_key_file: Path = Field(Path(".state/keys/intake.key.pem"),
                                   description="The intake's X25519 private key (PEM).")
    image_ttl_hours: float = Field(72.0, gt=0, description="Image lifetime after submission.")


def build(settings: IntakeSettings, publisher: Publisher, registries: Registries,
          stack: AsyncExitStack) -> list[Processor]:
    intake_ports = handlers.IntakePorts(
        private_key=load_or_create_private_key(settings.private_key_file),
        clock=utcnow, image_ttl=timedelta(hours=settings.image_ttl_hours),
    )
    # Policy: the Cedar set is loaded and type-checked once; a bad set stops the start.
    policy_settings = PolicySettings()
    engine = PolicyEngine.load(policy_settings.dir)
    policy_ports = handlers.PolicyPorts(registries=registries, clock=utcnow, engine=engine)
    store = ReviewStore(policy_settings.review_db
                        or settings.state_dir / "policy" / "exigent_reviews.sqlite")
    stack.callback(store.close)
    review_ports = policy.ReviewPorts(
        store=store, registries=registries, clock=utcnow,
        review_window=timedelta(hours=policy_settings.review_window_hours))
    start_overdue_watch(store, publisher, utcnow, policy_settings.review_check_interval_s,
                        stack)

    async def probe_requested(event: Any, _env: Envelope) -> list[Event]:
        assert isinstance(event, ProbeRequested)
        return await handlers.on_probe_requested(event, intake_ports)

    async def invalid_request(raw: RawRecord, err: DecodeError) -> list[Event]:
        return [handlers.reject_invalid_request(raw.key, err)]

    async def probe_submitted(event: Any, _env: Envelope) -> list[Event]:
        assert isinstance(event, ProbeSubmitted)
        return await handlers.on_probe_submitted(event, policy_ports)

    async def decision_for_review(event: Any, _env: Envelope) -> list[Event]:
        assert isinstance(event, PolicyCleared)
        return await policy.on_decision_for_review(event, review_ports)

    async def supervisor_review(event: Any, _env: Envelope) -> list[Event]:
        assert isinstance(event, SupervisorReviewRecorded)
        return await policy.on_supervisor_review(event, review_ports)

    intake = Route("intake", "frs-intake", (PROBE_REQUESTS.name,),
                   {ProbeRequested: probe_requested}, dlq_for("intake"),
                   on_invalid=invalid_request)
    gate = Route("policy", "frs-policy", (PROBE_EVENTS.name,),
                 {ProbeSubmitted: probe_submitted}, dlq_for("policy"))
    reviews = Route("policy", "frs-policy-reviews", (POLICY_DECISIONS.name,),
                    {PolicyCleared: decision_for_review,
                     SupervisorReviewRecorded: supervisor_review}, dlq_for("policy"))
    return [processor(settings, intake, publisher), processor(settings, gate, publisher),
            processor(settings, reviews, publisher)]

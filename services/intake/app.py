"""Intake service: builds ports from Settings and routes topics to handlers."""

from __future__ import annotations

from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.catalog import PROBE_EVENTS, PROBE_REQUESTS
from schemas.envelope import DecodeError, Envelope
from schemas.events import Event, ProbeRequested, ProbeSubmitted
from schemas.types import utcnow
from services.intake import handlers
from services.intake.crypto import load_or_create_private_key
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
    policy_ports = handlers.PolicyPorts(registries=registries, clock=utcnow)

    async def probe_requested(event: Any, _env: Envelope) -> list[Event]:
        assert isinstance(event, ProbeRequested)
        return await handlers.on_probe_requested(event, intake_ports)

    async def invalid_request(raw: RawRecord, err: DecodeError) -> list[Event]:
        return [handlers.reject_invalid_request(raw.key, err)]

    async def probe_submitted(event: Any, _env: Envelope) -> list[Event]:
        assert isinstance(event, ProbeSubmitted)
        return await handlers.on_probe_submitted(event, policy_ports)

    intake = Route("intake", "frs-intake", (PROBE_REQUESTS.name,),
                   {ProbeRequested: probe_requested}, dlq_for("intake"),
                   on_invalid=invalid_request)
    policy = Route("policy", "frs-policy", (PROBE_EVENTS.name,),
                   {ProbeSubmitted: probe_submitted}, dlq_for("policy"))
    return [processor(settings, intake, publisher), processor(settings, policy, publisher)]

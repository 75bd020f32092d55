"""Dispatch service: builds ports from Settings and routes topics to handlers."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.catalog import POLICY_DECISIONS
from schemas.envelope import Envelope
from schemas.events import Event, PolicyCleared
from schemas.types import utcnow
from services.dispatch import handlers
from services.kit.bus import Processor, Publisher, Route
from services.kit.registry import Registries
from services.kit.service import dlq_for, processor
from services.kit.settings import ServiceSettings


class DispatchSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRS_DISPATCH_", frozen=True, extra="ignore",
                                      populate_by_name=True)
    service: str = "dispatch"
    metrics_port: int = Field(9302, description="Port for /metrics.")


def build(settings: DispatchSettings, publisher: Publisher,
          registries: Registries) -> list[Processor]:
    ports = handlers.DispatchPorts(registries=registries, clock=utcnow)

    async def policy_cleared(event: Any, _env: Envelope) -> list[Event]:
        assert isinstance(event, PolicyCleared)
        return await handlers.on_policy_cleared(event, ports)

    route = Route("dispatch", "frs-dispatch", (POLICY_DECISIONS.name,),
                  {PolicyCleared: policy_cleared}, dlq_for("dispatch"))
    return [processor(settings, route, publisher)]

"""Results service: builds ports from Settings and routes topics to handlers."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.catalog import PROVIDER_RESPONSES
from schemas.envelope import Envelope
from schemas.events import Event, ProviderAnswered
from schemas.types import utcnow
from services.kit.bus import Processor, Publisher, Route
from services.kit.registry import Registries
from services.kit.service import dlq_for, processor
from services.kit.settings import ServiceSettings
from services.results import handlers


class ResultsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRS_RESULTS_", frozen=True, extra="ignore",
                                      populate_by_name=True)
    service: str = "results"
    metrics_port: int = Field(9303, description="Port for /metrics.")


def build(settings: ResultsSettings, publisher: Publisher,
          registries: Registries) -> list[Processor]:
    ports = handlers.ResultsPorts(registries=registries, clock=utcnow)

    async def provider_answered(event: Any, _env: Envelope) -> list[Event]:
        assert isinstance(event, ProviderAnswered)
        return await handlers.on_provider_answered(event, ports)

    route = Route("results", "frs-results", (PROVIDER_RESPONSES.name,),
                  {ProviderAnswered: provider_answered}, dlq_for("results"))
    return [processor(settings, route, publisher)]

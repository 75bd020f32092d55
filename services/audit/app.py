"""Audit service: consumes every catalog topic, DLQs included, into the audit store."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from schemas.catalog import TOPICS
from schemas.envelope import DecodeError, Envelope
from schemas.events import Event
from services.audit import handlers
from services.audit.store import AuditStore
from services.kit.bus import Processor, Publisher, RawRecord, Route
from services.kit.service import dlq_for, processor
from services.kit.settings import ServiceSettings


class AuditSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="FRS_AUDIT_", frozen=True, extra="ignore",
                                      populate_by_name=True)
    service: str = "audit"
    metrics_port: int = Field(9304, description="Port for /metrics.")
    store_dir: Path = Field(Path(".state/audit"), description="Audit segment files and index.")


def build(settings: AuditSettings, publisher: Publisher, stack: AsyncExitStack) -> list[Processor]:
    store = AuditStore(settings.store_dir)
    stack.callback(store.close)
    ports = handlers.AuditPorts(store=store)

    async def record(raw: RawRecord, decoded: Envelope | DecodeError) -> list[Event]:
        return await handlers.on_record(raw.topic, raw.partition, raw.offset, raw.value,
                                        decoded, ports)

    async def durable() -> None:
        store.commit()

    route = Route("audit", "frs-audit", tuple(t.name for t in TOPICS), {}, dlq_for("audit"),
                  on_record=record, before_commit=durable)
    return [processor(settings, route, publisher)]

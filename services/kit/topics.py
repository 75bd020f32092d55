"""Create or check every catalog topic. Idempotent: a second run changes nothing.
``fix=False`` only reports: missing topics and settings that drifted from the catalog."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from schemas.catalog import OVERSIGHT_INTERNAL, TOPICS, Topic
from services.kit.kafka import KafkaSettings, client_options


@dataclass(frozen=True)
class TopicStatus:
    name: str
    action: Literal["created", "ok", "drift", "missing"]
    detail: str = ""


async def ensure_topics(
    bootstrap: str, replication: int = 1,
    topics: tuple[Topic, ...] = (*TOPICS, *OVERSIGHT_INTERNAL), fix: bool = True,
    *, kafka: KafkaSettings | None = None,
) -> list[TopicStatus]:
    admin = AIOKafkaAdminClient(**client_options(kafka, bootstrap))
    await admin.start()
    try:
        existing = {t["topic"]: t for t in await admin.describe_topics()}
        missing = [t for t in topics if t.name not in existing]
        statuses: list[TopicStatus] = []
        if missing and not fix:
            statuses += [TopicStatus(t.name, "missing") for t in missing]
        elif missing:
            await admin.create_topics(
                [NewTopic(t.name, t.partitions, replication, topic_configs=t.config())
                 for t in missing]
            )
            statuses += [TopicStatus(t.name, "created") for t in missing]
        present = [t for t in topics if t.name in existing]
        if present:
            actual = await _configs(admin, [t.name for t in present])
            for t in present:
                drift = [
                    f"{k}={actual[t.name].get(k)!r}, want {v!r}"
                    for k, v in t.config().items() if actual[t.name].get(k) != v
                ]
                partitions = len(existing[t.name]["partitions"])
                if partitions != t.partitions:
                    drift.append(f"partitions={partitions}, want {t.partitions}")
                if drift and fix:
                    await admin.alter_configs([
                        ConfigResource(ConfigResourceType.TOPIC, t.name, t.config())
                    ])
                statuses.append(TopicStatus(t.name, "drift" if drift else "ok", "; ".join(drift)))
        return sorted(statuses, key=lambda s: s.name)
    finally:
        await admin.close()


async def _configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, Any]]:
    responses = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
    )
    out: dict[str, dict[str, Any]] = {}
    for response in responses:
        for resource in response.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            name, entries = resource[3], resource[4]
            out[name] = {entry[0]: entry[1] for entry in entries}
    return out

"""Publishing scripted scenarios to the pipeline's topics and reading the alerts back."""

from __future__ import annotations

from collections.abc import Sequence

from schemas.catalog import OVERSIGHT_ALERTS, topic_for
from schemas.envelope import encode
from schemas.events import Event, UsageAlert
from services.kit.kafka import KafkaSettings
from services.kit.publisher import Publisher
from services.kit.reader import read_topic

SOURCES = {"ProbeSubmitted": "/frs/intake", "PolicyDenied": "/frs/policy",
           "PolicyCleared": "/frs/policy", "ProviderDispatched": "/frs/dispatch"}


async def publish(bootstrap: str, events: Sequence[tuple[str, Event]]) -> None:
    """Each event as its service would publish it, with the scenario's event id."""
    async with Publisher(bootstrap, "/test/oversight",
                         kafka=KafkaSettings(kafka_bootstrap=bootstrap)) as publisher:
        futures = []
        for event_id, event in events:
            record = encode(event, SOURCES.get(type(event).__name__, "/frs/results"),
                            event_id=event_id)
            futures.append(await publisher.send_raw(topic_for(event).name, record.key,
                                                    record.value, record.headers))
        for future in futures:
            await future


async def alert_records(bootstrap: str) -> list[UsageAlert]:
    """Every alert record on the topic (a duplicate record would be here twice)."""
    out = []
    for _raw, env in await read_topic(bootstrap, [OVERSIGHT_ALERTS.name]):
        assert not isinstance(env, Exception), env
        assert isinstance(env.event, UsageAlert) and env.id == env.event.alert_id
        out.append(env.event)
    return out

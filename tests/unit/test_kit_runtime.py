"""The runtime hands each route's consumer the service's fetch settings (no broker: the
consumer is only built, never started)."""

from __future__ import annotations

import pytest

from services.kit.publisher import Publisher
from services.kit.routing import Route
from services.kit.runtime import processor
from services.kit.settings import ServiceSettings


class _Settings(ServiceSettings):
    model_config = {**ServiceSettings.model_config, "env_prefix": "FRS_T_"}


async def test_fetch_settings_reach_the_consumer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRS_T_FETCH_MIN_BYTES", "65536")
    monkeypatch.setenv("FRS_T_FETCH_MAX_WAIT_MS", "20")
    settings = _Settings()
    route = Route("t", "frs-t", ("frs.probe.events",), {}, "frs.dlq.t")
    made = processor(settings, route, Publisher(settings.kafka_bootstrap, "/frs/t"))
    options = made.route.consumer_options
    assert (options["fetch_min_bytes"], options["fetch_max_wait_ms"]) == (65536, 20)
    # A route's own options still win.
    own = Route("t", "frs-t", ("frs.probe.events",), {}, "frs.dlq.t",
                consumer_options={"fetch_max_wait_ms": 100})
    made = processor(settings, own, Publisher(settings.kafka_bootstrap, "/frs/t"))
    assert made.route.consumer_options["fetch_max_wait_ms"] == 100


def test_defaults_are_the_clients_own() -> None:
    settings = ServiceSettings()
    assert (settings.fetch_min_bytes, settings.fetch_max_wait_ms, settings.linger_ms) == (
        1, 500, 2)

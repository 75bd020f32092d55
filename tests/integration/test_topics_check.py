"""Retention as written (issue 19 item 7): the broker's topics carry the catalog's
segment.ms, and `frs topics check` says when they do not."""

from __future__ import annotations

import json
import subprocess
import sys

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from schemas.catalog import PROBE_REQUESTS
from services.kit.topics import ensure_topics


def frs(bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True,
                          text=True, timeout=120, env={"FRS_KAFKA_BOOTSTRAP": bootstrap,
                                                       "PATH": "/usr/bin:/bin"})


async def test_short_retention_topics_roll_and_check_reports_drift(kafka_bootstrap: str) -> None:
    await ensure_topics(kafka_bootstrap)  # what `frs topics create` does: fixes drift too
    ok = frs(kafka_bootstrap, "topics", "check", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert {t["action"] for t in json.loads(ok.stdout)} == {"ok"}
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, PROBE_REQUESTS.name)])
        entries = {e[0]: e[1] for e in response.resources[0][4]}
        assert entries["segment.ms"] == PROBE_REQUESTS.config()["segment.ms"] == "360000"
        # Drift: someone sets a week-long segment again; check finds it, create fixes it.
        await admin.alter_configs([ConfigResource(
            ConfigResourceType.TOPIC, PROBE_REQUESTS.name,
            {**PROBE_REQUESTS.config(), "segment.ms": str(7 * 24 * 3600 * 1000)})])
    finally:
        await admin.close()
    drift = frs(kafka_bootstrap, "topics", "check")
    assert drift.returncode == 1 and "segment.ms" in drift.stdout, drift.stdout
    assert frs(kafka_bootstrap, "topics", "create").returncode == 0
    assert frs(kafka_bootstrap, "topics", "check").returncode == 0

"""Leader kill on the three-node cluster: a kit Publisher (acks=all, idempotent) feeds a
kit Processor relay while the leader of the input partition is SIGKILLed mid-stream and
restarted later. No acknowledged message may be lost; after dedup by causation, every
input has exactly one output."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from schemas.catalog import Topic
from schemas.envelope import Envelope, encode
from schemas.events import DispatchFailed, DispatchFailure, ProbeRejected
from schemas.types import utcnow
from services.kit.publisher import Publisher
from services.kit.reader import read_topic
from services.kit.topics import ensure_topics
from tests.chaos.conftest import Cluster
from tests.chaos.history import check_relay
from tests.conftest import ROOT
from tests.helpers import wait_log
from tests.integration.relay_service import RELAY_DLQ, RELAY_TOPIC

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

MESSAGES = int(os.environ.get("FRS_CHAOS_CLUSTER_MESSAGES", "3000"))
RATE = 300.0  # messages/s: the kill lands well inside the stream

def start_relay(bootstrap: str, state: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FRS_KAFKA_BOOTSTRAP": bootstrap, "FRS_STATE_DIR": str(state),
           "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tests.integration.relay_service"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

async def test_partition_leader_sigkill_mid_stream_loses_nothing_acknowledged(
    kafka_cluster: Cluster, tmp_path: Path
) -> None:
    bootstrap = kafka_cluster.bootstrap
    await ensure_topics(bootstrap, replication=3, topics=(
        Topic(RELAY_TOPIC, "probe_id", 1, 3_600_000, "delete", (), "chaos relay input"),
        Topic(RELAY_DLQ, "key", 1, 3_600_000, "delete", (), "chaos relay dlq"),
    ))
    run = uuid.uuid4().hex[:8]
    log = tmp_path / "relay.log"
    relay = start_relay(bootstrap, tmp_path / "state", log)
    try:
        await wait_log(log, '"consumer started"', interval=0.1)
        leader = await kafka_cluster.leader(RELAY_TOPIC, 0)
        acked: set[str] = set()
        failed = 0
        futures: list[tuple[str, asyncio.Future[Any]]] = []
        async with Publisher(bootstrap, "/chaos/producer", request_timeout_ms=30000) as pub:
            for i in range(MESSAGES):
                event = DispatchFailed(probe_id=f"prb-{run}-{i:06d}", provider_id="prov-1",
                                       reason=DispatchFailure.RETRIES_EXHAUSTED, detail="chaos",
                                       failed_at=utcnow())

                record = encode(event, "/chaos/producer")
                fut = await pub.send_raw(RELAY_TOPIC, record.key, record.value, record.headers)
                ce_id = dict(record.headers)["ce_id"].decode()
                futures.append((ce_id, fut))
                if i == MESSAGES // 3:
                    kafka_cluster.kill(leader)  # SIGKILL, mid-stream
                if i == 2 * MESSAGES // 3:
                    # The fault really hit: another node leads the partition now.
                    assert await kafka_cluster.leader(RELAY_TOPIC, 0) != leader
                    kafka_cluster.start_node(leader)
                await asyncio.sleep(1 / RATE)
            for ce_id, fut in futures:
                try:
                    await fut
                    acked.add(ce_id)
                except Exception:
                    failed += 1
        kafka_cluster.wait_all()
        assert await kafka_cluster.leader(RELAY_TOPIC, 0) in (1, 2, 3)
        # Wait for the relay to catch up with every input on the log.
        outputs: list[Envelope] = []
        inputs: list[Envelope] = []
        for _ in range(120):
            inputs = [d for r, d in await read_topic(bootstrap, [RELAY_TOPIC])
                      if isinstance(d, Envelope) and (d.subject or "").startswith(f"prb-{run}-")]
            outputs = [d for r, d in await read_topic(bootstrap, ["frs.probe.events"])
                       if isinstance(d, Envelope) and isinstance(d.event, ProbeRejected)
                       and d.event.probe_id.startswith(f"prb-{run}-")]
            if len({o.causation_id for o in outputs}) >= len({i.id for i in inputs}):
                break
            await asyncio.sleep(1)
        report = check_relay(inputs, outputs, acked)
        print(f"leader kill: node {leader}, {MESSAGES} sent, {len(acked)} acknowledged, "
              f"{failed} failed sends, stats {dict(report.stats)}")
        assert report.ok, report.summary()
        assert len(acked) >= MESSAGES * 0.9
    finally:
        relay.terminate()
        relay.wait(timeout=60)

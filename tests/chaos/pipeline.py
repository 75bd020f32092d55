"""The harness for fault scenarios on the real pipeline: a broker of the module's own
(so it can be stopped), the four services as processes, a load of probes in flight, and
a final history check (bus, audit store).

Scale: ``FRS_CHAOS_PROBES`` probes per scenario (default 60, the reduced CI form;
deploy/chaos.sh runs 1,000+)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from schemas.catalog import TOPICS
from schemas.envelope import Envelope
from schemas.events import (
    AgentRecord,
    CaseRecord,
    Event,
    PolicyDenied,
    ProbeRejected,
    ProbeSettled,
    ProviderRecord,
)
from schemas.types import ImageSource, Purpose, probe_id_for
from services.cli.client import build_request
from services.kit.bus import Publisher, read_topic
from tests.chaos.history import Record, Report, check
from tests.conftest import BROKER, ROOT, ServiceProcess, free_port_pair

PROBES = int(os.environ.get("FRS_CHAOS_PROBES", "60"))
SERVICES = ("intake", "dispatch", "results", "audit")
TERMINAL_TYPES = {c.TYPE for c in (ProbeRejected, PolicyDenied, ProbeSettled)}
# Every consumer group of the pipeline, and the topics each reads.
GROUPS: dict[str, tuple[str, ...]] = {
    "frs-intake": ("frs.probe.requests",),
    "frs-policy": ("frs.probe.events",),
    "frs-dispatch": ("frs.policy.decisions",),
    "frs-results": ("frs.provider.responses",),
    "frs-results-tracker": ("frs.probe.events", "frs.policy.decisions", "frs.dispatch.events",
                            "frs.results.events"),
    "frs-audit": tuple(t.name for t in TOPICS),
}
INPUT_TOPICS = ("frs.probe.requests", "frs.probe.events", "frs.policy.decisions",
                "frs.dispatch.events", "frs.provider.responses", "frs.results.events")


@dataclass
class OwnBroker:
    """A single-node broker this module starts and may stop and start again."""

    port: int
    state: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "FRS_KAFKA_PORT": str(self.port),
                "FRS_KAFKA_STATE": str(self.state)}

    def start(self) -> None:
        subprocess.run([str(BROKER), "start"], env=self.env, check=True, timeout=300)

    def stop(self) -> None:
        subprocess.run([str(BROKER), "stop"], env=self.env, check=False, timeout=120)

    def pid(self) -> int:
        return int((self.state / "broker.pid").read_text())

    def restart(self, sig: int = signal.SIGKILL) -> None:
        """Kill the broker and start it again on the same data (no re-format)."""
        os.kill(self.pid(), sig)
        for _ in range(400):
            try:
                os.kill(self.pid(), 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        subprocess.run([str(BROKER), "resume"], env=self.env, check=True, timeout=300)


def start_own_broker(state: Path) -> OwnBroker:
    broker = OwnBroker(free_port_pair(), state)
    broker.start()
    from services.kit.topics import ensure_topics

    asyncio.run(ensure_topics(broker.bootstrap))
    asyncio.run(seed_registry(broker.bootstrap))
    return broker


async def seed_registry(bootstrap: str) -> None:
    """One open case, a trained agent, one active provider (as `frs registry demo`)."""
    now = datetime.now(UTC)
    year = now + timedelta(days=365)
    records: list[Event] = [
        CaseRecord(case_id="CASE-1", status="open", offense_category=Purpose.HUMAN_TRAFFICKING,
                   roi_refs=["ROI-1"], updated_at=now),
        AgentRecord(agent_id="agent-7", role="agent", training_valid_until=year,
                    supervisor_id="sup-1", updated_at=now),
        AgentRecord(agent_id="sup-1", role="supervisor", training_valid_until=year,
                    updated_at=now),
        ProviderRecord(provider_id="fed-ngi", name="Federal 1:N gallery (simulated)",
                       kind="federal", transport="https",
                       endpoint="https://127.0.0.1:8443/search",
                       attestation_valid_until=year, updated_at=now),
    ]
    async with Publisher(bootstrap, source="/chaos/seed") as publisher:
        await publisher.publish(records)


def service_env(bootstrap: str, tmp: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FRS_KAFKA_BOOTSTRAP": bootstrap,
        "FRS_STATE_DIR": str(tmp / "state"),
        "FRS_INTAKE_PRIVATE_KEY_FILE": str(tmp / "keys" / "intake.key.pem"),
        "FRS_AUDIT_STORE_DIR": str(tmp / "audit"),
        "FRS_INTAKE_METRICS_PORT": "0",
        "FRS_DISPATCH_METRICS_PORT": "0",
        "FRS_RESULTS_METRICS_PORT": "0",
        "FRS_AUDIT_METRICS_PORT": "0",
        "FRS_LOG_LEVEL": "INFO",
        "PYTHONPATH": str(ROOT),
    }


@dataclass
class Pipeline:
    bootstrap: str
    tmp: Path
    image: bytes
    procs: dict[str, ServiceProcess] = field(default_factory=dict)
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    acked: list[str] = field(default_factory=list)
    poison_keys: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        env = service_env(self.bootstrap, self.tmp)
        self.procs = {n: ServiceProcess(n, env, self.tmp / f"{n}.log") for n in SERVICES}

    def start(self, *names: str) -> None:
        """Start services (default all) and wait until each one's consumers run."""
        chosen = names or SERVICES
        before = {n: self._count(n, '"consumer started"') for n in chosen}
        for n in chosen:
            self.procs[n].start()
        for n in chosen:
            self.procs[n].wait_log('"consumer started"', timeout=90, count=before[n] + 1)

    def _count(self, name: str, text: str) -> int:
        path = self.procs[name].log_path
        return path.read_text(errors="replace").count(text) if path.exists() else 0

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` and wait for the exit."""
        self.procs[name].kill(sig)

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` without waiting (SIGSTOP, SIGCONT)."""
        proc = self.procs[name].proc
        assert proc is not None and proc.poll() is None, f"{name} is not running"
        proc.send_signal(sig)

    def restart(self, name: str) -> None:
        self.start(name)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.proc is not None and p.proc.poll() is None:
                p.stop()

    def alive(self) -> dict[str, bool]:
        return {n: p.proc is not None and p.proc.poll() is None for n, p in self.procs.items()}

    @property
    def public_key(self) -> Path:
        return self.tmp / "keys" / "intake.key.pub.pem"

    @property
    def probes(self) -> set[str]:
        return {probe_id_for(r) for r in self.acked}

    async def submit(self, n: int = PROBES, rate: float = 50.0,
                     during: Callable[[int], Any] | None = None) -> None:
        """Publish n probes at about ``rate``/s; ``during(i)`` runs before probe i (the
        fault schedule). Only acknowledged submissions count as requests."""
        for _ in range(100):
            if self.public_key.exists():
                break
            await asyncio.sleep(0.1)
        futures: list[tuple[str, asyncio.Future[Any]]] = []
        async with Publisher(self.bootstrap, "/chaos/upstream",
                             request_timeout_ms=60000) as pub:
            for i in range(n):
                if during is not None:
                    result = during(i)
                    if asyncio.iscoroutine(result):
                        await result
                request = build_request(
                    self.image, self.public_key, case_id="CASE-1", agent_id="agent-7",
                    purpose=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"],
                    image_source=ImageSource.SURVEILLANCE, nexus=["VA"],
                    request_id=f"req-{self.run}-{i:05d}")
                futures.append((request.request_id, await pub.send(request)))
                await asyncio.sleep(1 / rate)
            for request_id, fut in futures:
                try:
                    await fut
                    self.acked.append(request_id)
                except Exception:  # an unacknowledged send is not a request
                    pass

    async def wait_terminal(self, timeout: float = 180) -> list[Record]:  # noqa: ASYNC109
        """Until every acknowledged request has a terminal outcome (or the timeout)."""
        deadline = time.monotonic() + timeout
        wanted = self.probes
        while True:
            records = await read_topic(self.bootstrap, ["frs.probe.events",
                                                        "frs.policy.decisions",
                                                        "frs.results.events"])
            done = {d.subject for _r, d in records
                    if isinstance(d, Envelope) and d.type in TERMINAL_TYPES}
            if wanted <= done or time.monotonic() > deadline:
                return records
            await asyncio.sleep(1.0)

    async def check(self, **kwargs: Any) -> Report:
        """Stop audit (its store is read after a clean drain), read every topic, check."""
        await self.wait_terminal()
        # Give audit time to record the tail of the run before it drains.
        await asyncio.sleep(3)
        self.procs["audit"].stop()
        from services.audit.store import AuditStore

        store = AuditStore(self.tmp / "audit")
        rows = [(r.topic, r.partition, r.offset, r.ce_id) for r in store.rows()]
        store.close()
        records = await read_topic(self.bootstrap, [t.name for t in TOPICS], max_s=120)
        mine = self.probes
        keys = {k.encode() for k in self.poison_keys} | {r.encode() for r in self.acked}
        audit_records = [(r, d) for r, d in records
                         if (isinstance(d, Envelope) and d.subject in mine) or r.key in keys]
        report = check(records, probes=mine, expected_requests=self.acked,
                       audit_positions=rows, audit_records=audit_records, **kwargs)
        report.stats["acknowledged"] = len(self.acked)
        return report


async def rewind_groups(bootstrap: str, to: dict[TopicPartition, int],
                        groups: Iterable[str] = GROUPS) -> None:
    """Commit older offsets for each (stopped) group: it processes that stretch again."""
    for group in groups:
        topics = set(GROUPS[group])
        offsets = {tp: OffsetAndMetadata(o, "") for tp, o in to.items() if tp.topic in topics}
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign(list(offsets))
            for tp, om in offsets.items():
                consumer.seek(tp, om.offset)
            await consumer.commit(offsets)
        finally:
            await consumer.stop()


async def end_offsets(bootstrap: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        from services.kit.bus import all_partitions

        parts = await all_partitions(consumer, topics)
        return dict(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


def random_points(n: int, k: int, seed: int) -> list[int]:
    """k distinct fault points among n probes, away from the very start and end."""
    rng = random.Random(seed)
    return sorted(rng.sample(range(max(1, n // 10), max(2, n - n // 10)), k))

"""The harness for fault scenarios on the real pipeline: a broker of the module's own
(so it can be stopped), the four services as processes, a load of probes in flight, and
a final history check (bus, audit store).

Scale: ``FRS_CHAOS_PROBES`` probes per scenario (default 60, the reduced CI form;
deploy/chaos.sh runs 1,000+)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from schemas.catalog import AUDITED_TOPICS
from schemas.envelope import Envelope
from schemas.events import (
    PolicyDenied,
    ProbeRejected,
    ProbeSettled,
    ProbeSubmitted,
    ProviderDispatched,
    ReviewCompleted,
    ReviewRequested,
)
from schemas.types import utcnow
from services.cli.pipeline_rig import PipelineRig, Service
from services.kit.publisher import Publisher
from services.kit.reader import all_partitions, read_topic
from tests.chaos.history import Report, check
from tests.conftest import BROKER
from tests.helpers import free_port_pair, wait_committed
from tests.pg import PgServer

PROBES = int(os.environ.get("FRS_CHAOS_PROBES", "60"))
TERMINAL_TYPES = {c.TYPE for c in (ProbeRejected, PolicyDenied, ProbeSettled)}
# Every consumer group of the pipeline, and the topics each reads.
GROUPS: dict[str, tuple[str, ...]] = {
    "frs-intake": ("frs.probe.requests",),
    "frs-policy": ("frs.probe.events",),
    "frs-dispatch": ("frs.policy.decisions",),
    "frs-results-tracker": ("frs.policy.decisions", "frs.dispatch.events", "frs.results.events",
                            "frs.provider.responses"),
    "frs-audit": tuple(t.name for t in AUDITED_TOPICS),
}
# Images live IMAGE_TTL_S in the chaos runs and the purger sweeps every second: purges
# happen under the faults, and an image still held PURGE_GRACE after expiry is a violation.
# Longer than the SIGSTOP and SIGKILL outages: a send racing a purge is a known finding
# with its own scenario (test_vendor_hangs_while_the_image_expires_no_send_after_purge).
IMAGE_TTL_S = 20
PURGE_GRACE = timedelta(seconds=10)
CHAOS_ENV = {"FRS_INTAKE_IMAGE_TTL_HOURS": str(IMAGE_TTL_S / 3600),
             "FRS_INTAKE_PURGE_INTERVAL_S": "1"}
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
    return broker


@dataclass(eq=False)
class ChaosRun(PipelineRig):
    """The rig plus what a fault scenario needs: poison keys and the final history check.
    With ``pg`` the services keep their state in that PostgreSQL server: the check reads
    the audit log and the vault index there."""

    poison_keys: list[str] = field(default_factory=list)
    pg: PgServer | None = None

    async def start(self) -> ChaosRun:
        self.poison_keys = []
        await super().start()
        return self

    def alive(self) -> dict[str, bool]:
        return {n: p.alive for n, p in self.procs.items()}

    async def revive(self) -> dict[str, int]:
        """Restart every service that exited, as its supervisor would; say which."""
        crashed = {n: 1 for n, up in self.alive().items() if not up}
        for n in crashed:
            await self.restart(n)
        return crashed

    def vault_objects(self) -> dict[str, datetime]:
        """Vault objects still holding an image, with their expiry (read-only)."""
        if self.pg is not None:
            return {ref: at for ref, at in pg_rows(
                self.pg, "SELECT ref, expires_at FROM vault_objects"
                " WHERE state IN ('stored', 'purging')")}
        db = self.workdir / "state" / "vault" / "intake.db"
        if not db.exists():
            return {}
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            # 'purged' and 'announced' hold neither bytes nor key any more.
            rows = conn.execute("SELECT ref, expires_at FROM vault_objects "
                                "WHERE state IN ('stored', 'purging')").fetchall()
        finally:
            conn.close()
        return {ref: datetime.fromtimestamp(ts, UTC) for ref, ts in rows}

    async def wait_terminal(self, timeout: float = max(240.0, PROBES / 4)  # noqa: ASYNC109
                            ) -> float:
        """Until every acknowledged request has a terminal outcome (or the timeout); returns
        the latest image expiry stamped so far (Unix time)."""
        deadline = time.monotonic() + timeout
        wanted = self.probes
        last_expiry = time.time()
        while time.monotonic() < deadline:
            records = await read_topic(self.bootstrap, ["frs.probe.events",
                                                        "frs.policy.decisions",
                                                        "frs.results.events"])
            done = {d.subject for _r, d in records
                    if isinstance(d, Envelope) and d.type in TERMINAL_TYPES}
            last_expiry = max([last_expiry] + [
                d.event.expires_at.timestamp() for _r, d in records
                if isinstance(d, Envelope) and isinstance(d.event, ProbeSubmitted)
                and d.subject in wanted])
            if wanted <= done:
                break
            await asyncio.sleep(1.0)
        return last_expiry

    async def check(self, **kwargs: Any) -> Report:
        """Wait for the outcomes, stop audit (its store is read after a clean drain), read
        every topic and the simulator's counts, and check the history."""
        last_expiry = await self.wait_terminal()
        # Past this run's last image expiry (as intake stamped it, not submission + TTL:
        # intake may lag) plus grace, so every image's purge is checked; and audit records
        # the tail of the run before it drains. A run on the normal image lifetime (days)
        # has nothing due: it waits only for that tail.
        wait = last_expiry + PURGE_GRACE.total_seconds() + 2 - time.time()
        await asyncio.sleep(3.0 if wait > 10 * IMAGE_TTL_S else max(3.0, wait))
        audits = [p for p in self.procs.values() if p.name == "audit"]
        rows: list[tuple[str, int, int, str | None]] | None = None
        if audits:
            # Stop every producer first (the purger, deadline timers keep publishing),
            # then let audit catch up with the whole log: after that, every record on the
            # bus must be in its store exactly once.
            for proc in self.procs.values():
                if proc.name != "audit":
                    proc.signal(signal.SIGTERM)
            for proc in self.procs.values():
                if proc.name != "audit":
                    await proc.wait_exit()
            # Not caught up in time: the history check says which records audit missed.
            with contextlib.suppress(AssertionError):
                await wait_committed(self.bootstrap, "frs-audit",
                                     [t.name for t in AUDITED_TOPICS], timeout=120)
            if self.pg is not None:  # and the sequencer has taken in all it ingested
                await self.wait_sequenced()
            for audit in audits:
                audit.signal(signal.SIGTERM)
            for audit in audits:
                await audit.wait_exit()
            rows = self.audit_rows()
        records = await read_topic(self.bootstrap, [t.name for t in AUDITED_TOPICS], max_s=180)
        mine = self.probes
        refs = {d.event.request_ref: (d.event.probe_id, d.event.provider_id)
                for _r, d in records
                if isinstance(d, Envelope) and isinstance(d.event, ProviderDispatched)
                and d.event.probe_id in mine}
        keys = {k.encode() for k in self.poison_keys} | {r.encode() for r in self.acked}
        audit_records = [(r, d) for r, d in records
                         if (isinstance(d, Envelope) and d.subject in mine) or r.key in keys]
        options: dict[str, Any] = {"now": utcnow(), "vault_objects": self.vault_objects(),
                                   "purge_grace": PURGE_GRACE, **kwargs}
        report = check(records, probes=mine, expected_requests=self.acked,
                       sends=self.sends(refs), audit_positions=rows,
                       audit_records=audit_records, **options)
        report.stats["acknowledged"] = len(self.acked)
        return report


    def audit_rows(self) -> list[tuple[str, int, int, str | None]]:
        """The audit log's (topic, partition, offset, id) per leaf, in index order."""
        if self.pg is not None:
            return [(t, int(p), int(o), i) for t, p, o, i in pg_rows(
                self.pg, 'SELECT topic, partition, "offset", ce_id FROM audit_leaves'
                " ORDER BY idx")]
        from services.audit.store import AuditStore

        store = AuditStore(self.workdir / "audit")
        try:
            return [(r.topic, r.partition, r.offset, r.ce_id) for r in store.rows()]
        finally:
            store.close()

    async def wait_sequenced(self, timeout: float = 120) -> None:  # noqa: ASYNC109
        """Until no ingested entry waits in audit_queue for the sequencer."""
        assert self.pg is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not pg_rows(self.pg, "SELECT COUNT(*) FROM audit_queue")[0][0]:
                return
            await asyncio.sleep(0.5)


def pg_rows(pg: PgServer, query: str) -> list[tuple[Any, ...]]:
    """A read as the schema's owner (every table, whichever role writes it)."""
    import psycopg

    with psycopg.connect(pg.url("owner"), password=pg.password("owner"),
                         connect_timeout=10) as conn:
        return list(conn.execute(query).fetchall())


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


def random_points(n: int, k: int, seed: int) -> list[int]:
    """k distinct fault points among n probes, away from the very start and end."""
    rng = random.Random(seed)
    return sorted(rng.sample(range(max(1, n // 10), max(2, n - n // 10)), k))


class Examiner:
    """Completes every review the results tracker requests for the run's probes, as an
    examiner would, from the current end of frs.results.events on."""

    def __init__(self, bootstrap: str, probes: Callable[[], set[str]]) -> None:
        self.bootstrap = bootstrap
        self.probes = probes
        self.completed: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Examiner:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        parts = await all_partitions(consumer, ["frs.results.events"])
        consumer.assign(parts)
        await consumer.seek_to_end(*parts)
        for tp in parts:
            await consumer.position(tp)
        self._task = asyncio.create_task(self._run(consumer))
        return self

    async def _run(self, consumer: AIOKafkaConsumer) -> None:
        try:
            async with Publisher(self.bootstrap, "/chaos/examiner") as pub:
                while True:
                    batch = await consumer.getmany(timeout_ms=200)
                    asked = [(r.key or b"").decode() for rs in batch.values() for r in rs
                             if dict(r.headers or ()).get("ce_type")
                             == ReviewRequested.TYPE.encode()]
                    done = [ReviewCompleted(probe_id=p, examiner_id="examiner-1",
                                            conclusions=[], completed_at=utcnow())
                            for p in asked if p in self.probes()]
                    if done:
                        await pub.publish(done)  # a request seen twice is answered twice
                        self.completed |= {d.probe_id for d in done}
        finally:
            await consumer.stop()

    async def __aexit__(self, *_exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def freeze(proc: Service, seconds: float) -> asyncio.Task[None]:
    """SIGSTOP a service now and SIGCONT it after ``seconds`` (a task to await): frozen
    past its session timeout (10 s in aiokafka), it wakes as a zombie."""
    proc.signal(signal.SIGSTOP)

    async def thaw() -> None:
        await asyncio.sleep(seconds)
        proc.signal(signal.SIGCONT)

    return asyncio.create_task(thaw())

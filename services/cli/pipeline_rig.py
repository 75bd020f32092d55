"""The whole pipeline on one broker, for benchmarks and fault tests: the services as
processes (started and stopped by pid), an HTTPS vendor simulator that answers on the
results webhook, a registry seeded for it, and a load of real probes.

Used by ``frs bench pipeline`` and by tests/chaos. Nothing here is a service: it plays
the operator and the upstream system around them."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from schemas.decisions import trusted_key
from schemas.events import TrustedKey
from schemas.types import ImageSource, Purpose, probe_id_for
from services.cli.client import build_request, demo_registry
from services.intake.policy.signing import load_or_create_signing_key
from services.kit.private_files import write_private
from services.kit.publisher import Publisher
from services.simulators.tls import SimulatorCA
from services.simulators.vendor import VendorBehaviour, VendorSimulator

ROOT = Path(__file__).resolve().parent.parent.parent
SERVICES = ("intake", "dispatch", "results", "audit")
PROVIDER = "fed-sim"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """One ``python -m services.<name>`` process, by pid."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", f"services.{self.name}"],
                                         cwd=ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def count(self, text: str) -> int:
        return self.log_path.read_text(errors="replace").count(text) \
            if self.log_path.exists() else 0

    async def wait_log(self, text: str, count: int, timeout: float = 90) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while self.count(text) < count:
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} did not log {text!r}:\n{tail}")
            await asyncio.sleep(0.1)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 60) -> int | None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
            await asyncio.sleep(0.05)
        return None if self.proc is None else self.proc.returncode

    def rss_mb(self) -> dict[str, float]:
        """Current and peak resident memory (VmRSS, VmHWM) from /proc."""
        if not self.alive:
            return {}
        assert self.proc is not None
        out: dict[str, float] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = \
                    round(int(value.split()[0]) / 1024, 1)
        return out

    def cpu_s(self) -> float:
        if not self.alive:
            return 0.0
        assert self.proc is not None
        return process_cpu_s(self.proc.pid)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class PipelineRig:
    bootstrap: str
    workdir: Path
    image: bytes
    services: tuple[str, ...] = SERVICES
    behaviour: VendorBehaviour = field(default_factory=VendorBehaviour)
    extra_env: dict[str, str] = field(default_factory=dict)
    # Per service on top of extra_env: e.g. its own role's FRS_STATE_URL on PostgreSQL.
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # How long results waits for the vendor's answer before NoResponse settles the probe.
    response_deadline_s: int = 120
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    procs: dict[str, Service] = field(default_factory=dict)
    vendor: VendorSimulator | None = None
    acked: list[str] = field(default_factory=list)
    submitted_at: dict[str, float] = field(default_factory=dict)  # request id -> wall time

    async def start(self) -> PipelineRig:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ca = SimulatorCA("frs pipeline rig CA")
        pki = self.workdir / "pki"
        cert, key = ca.server().write(pki, "webhook")
        secret = secrets.token_hex(24)
        secrets_file = pki / "webhook-secrets.json"
        write_private(secrets_file, json.dumps({PROVIDER: secret}).encode())
        webhook_port = free_port()
        self.vendor = VendorSimulator(
            dataclass_replace(self.behaviour, webhook_url=f"https://127.0.0.1:{webhook_port}",
                              webhook_provider_id=PROVIDER, webhook_secret=secret,
                              webhook_ca_file=str(ca_file(pki, ca))),
            ca=ca, pki_dir=pki / "vendor")
        await self.vendor.start()
        await self.seed_registry()
        env = {
            **os.environ,
            "FRS_KAFKA_BOOTSTRAP": self.bootstrap,
            "FRS_STATE_DIR": str(self.workdir / "state"),
            "FRS_INTAKE_PRIVATE_KEY_FILE": str(self.workdir / "keys" / "intake.key.pem"),
            "FRS_POLICY_SIGNING_KEY_FILE": str(self.policy_key_file),
            "FRS_AUDIT_STORE_DIR": str(self.workdir / "audit"),
            "FRS_INTAKE_METRICS_PORT": "0", "FRS_DISPATCH_METRICS_PORT": "0",
            "FRS_RESULTS_METRICS_PORT": "0", "FRS_AUDIT_METRICS_PORT": "0",
            "FRS_DISPATCH_CA_FILE": str(self.vendor.ca_file),
            "FRS_DISPATCH_RETRY_BASE_DELAY_S": "0.05",
            "FRS_DISPATCH_RETRY_MAX_DELAY_S": "1.0",
            "FRS_DISPATCH_HTTPS_TIMEOUT_S": "5",
            "FRS_RESULTS_WEBHOOK_PORT": str(webhook_port),
            "FRS_RESULTS_WEBHOOK_CERT_FILE": str(cert),
            "FRS_RESULTS_WEBHOOK_KEY_FILE": str(key),
            "FRS_RESULTS_WEBHOOK_SECRETS_FILE": str(secrets_file),
            "FRS_RESULTS_SMTP_PORT": "0",
            "FRS_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
            **self.extra_env,
        }
        self.procs = {n: Service(n, {**env, **self.service_env.get(n, {})},
                                 self.workdir / f"{n}.log") for n in self.services}
        await self.start_services(*self.services)
        return self

    @property
    def policy_key_file(self) -> Path:
        return self.workdir / "keys" / "policy-decisions.pem"

    async def seed_registry(self) -> None:
        """The demo registry, and the operator's enrollment of the policy gate's key (made
        here, before the intake starts and signs with it): dispatch acts only on
        decisions signed by an enrolled key."""
        assert self.vendor is not None
        records = demo_registry(PROVIDER, "Federal 1:N gallery (simulator)", self.vendor.url,
                                self.response_deadline_s)
        key = load_or_create_signing_key(self.policy_key_file).public_key()
        records.append(TrustedKey.model_validate({**trusted_key(key),
                                                  "updated_at": datetime.now(UTC)}))
        async with Publisher(self.bootstrap, source="/frs/rig") as publisher:
            await publisher.publish(records)

    async def start_services(self, *names: str) -> None:
        chosen = names or self.services
        before = {n: self.procs[n].count('"consumer started"') for n in chosen}
        for n in chosen:
            self.procs[n].start()
        for n in chosen:
            await self.procs[n].wait_log('"consumer started"', before[n] + 1)

    async def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].signal(sig)
        await self.procs[name].wait_exit()

    async def restart(self, name: str) -> None:
        await self.start_services(name)

    async def stop(self) -> None:
        for p in self.procs.values():
            p.signal(signal.SIGTERM)
        for p in self.procs.values():
            await p.wait_exit()
        if self.vendor is not None:
            await self.vendor.stop()

    @property
    def public_key(self) -> Path:
        return self.workdir / "keys" / "intake.key.pub.pem"

    @property
    def probes(self) -> set[str]:
        return {probe_id_for(r) for r in self.acked}

    def sends(self, refs: dict[str, tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Accepted sends per (probe, provider), counted at the vendor simulator;
        ``refs`` maps request_ref to (probe, provider) from ProviderDispatched events."""
        assert self.vendor is not None
        out: dict[tuple[str, str], int] = {}
        for r in self.vendor.state.received:
            if r.accepted and r.request_ref in refs:
                pair = refs[r.request_ref]
                out[pair] = out.get(pair, 0) + 1
        return out

    async def submit(self, n: int, rate: float | None,
                     during: Callable[[int], Awaitable[None] | None] | None = None,
                     tag: str = "") -> float:
        """Publish n probes at ``rate``/s (None: as fast as possible); returns seconds
        spent. ``during(i)`` runs before probe i (a fault schedule)."""
        for _ in range(300):
            if self.public_key.exists():
                break
            await asyncio.sleep(0.1)
        requests = [build_request(
            self.image, self.public_key, case_id="CASE-1", agent_id="agent-7",
            purpose=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"],
            image_source=ImageSource.SURVEILLANCE, nexus=["VA"],
            request_id=f"req-{self.run}{tag}-{i:06d}") for i in range(n)]
        futures: list[tuple[str, asyncio.Future[Any]]] = []
        started = time.monotonic()
        async with Publisher(self.bootstrap, "/frs/upstream", request_timeout_ms=60000) as pub:
            for i, request in enumerate(requests):
                if during is not None:
                    result = during(i)
                    if result is not None:
                        await result
                if rate is not None:
                    delay = started + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                self.submitted_at[request.request_id] = time.time()
                futures.append((request.request_id, await pub.send(request)))
            for request_id, fut in futures:
                try:
                    await fut
                    self.acked.append(request_id)
                except Exception:  # an unacknowledged send is not a request
                    pass
        return time.monotonic() - started


def ca_file(directory: Path, ca: SimulatorCA) -> Path:
    path = directory / "rig-ca.crt"
    path.write_bytes(ca.cert_pem)
    return path


def dataclass_replace(obj: VendorBehaviour, **changes: Any) -> VendorBehaviour:
    import dataclasses

    return dataclasses.replace(obj, **changes)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["mem_gb"] = round(int(mem) / 1024 / 1024, 1)
        info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    return info


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[k], 4)

"""The whole pipeline on one broker, for benchmarks and fault tests: the services as
processes (started and stopped by pid), an HTTPS vendor simulator that answers on the
results webhook, a registry seeded for it, and a load of real probes.

Used by ``frs bench pipeline`` and by tests/chaos. Nothing here is a service: it plays
the operator and the upstream system around them."""

from __future__ import annotations

import asyncio
import json
import logging
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
    # Processes per service (one number for all, or by service): with more than one, each
    # instance has a state dir of its own, as on a host of its own (see instance_env).
    instances: int | dict[str, int] = 1
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    procs: dict[str, Service] = field(default_factory=dict)
    webhook_ports: dict[str, int] = field(default_factory=dict)  # results instance -> port
    vendor: VendorSimulator | None = None
    acked: list[str] = field(default_factory=list)
    submitted_at: dict[str, float] = field(default_factory=dict)  # request id -> wall time

    async def start(self) -> PipelineRig:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.check_shared()
        ca = SimulatorCA("frs pipeline rig CA")
        pki = self.workdir / "pki"
        cert, key = ca.server().write(pki, "webhook")
        secret = secrets.token_hex(24)
        secrets_file = pki / "webhook-secrets.json"
        write_private(secrets_file, json.dumps({PROVIDER: secret}).encode())
        # Each results instance listens on its own port; the vendor spreads its answers
        # over all of them, as a load balancer in front of them would.
        self.webhook_ports = {k: free_port() for k in self.instance_keys("results")}
        urls = [f"https://127.0.0.1:{port}" for port in self.webhook_ports.values()]
        self.vendor = VendorSimulator(
            dataclass_replace(self.behaviour, webhook_url=urls[0], webhook_urls=tuple(urls[1:]),
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
            "FRS_RESULTS_WEBHOOK_PORT": str(self.webhook_ports["results"]),
            "FRS_RESULTS_WEBHOOK_CERT_FILE": str(cert),
            "FRS_RESULTS_WEBHOOK_KEY_FILE": str(key),
            "FRS_RESULTS_WEBHOOK_SECRETS_FILE": str(secrets_file),
            "FRS_RESULTS_SMTP_PORT": "0",
            "FRS_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(ROOT),
            **self.extra_env,
        }
        if self.many():
            env |= self.deployment_secrets()
        self.procs = {k: Service(n, self.instance_env(n, k, env), self.workdir / f"{k}.log")
                      for n in self.services for k in self.instance_keys(n)}
        await self.start_services(*self.services)
        return self

    def count(self, name: str) -> int:
        return self.instances if isinstance(self.instances, int) \
            else self.instances.get(name, 1)

    def instance_keys(self, name: str) -> list[str]:
        """The procs keys of a service's instances: its name, then name-2, name-3, ..."""
        return [name] + [f"{name}-{i}" for i in range(2, self.count(name) + 1)]

    def many(self) -> bool:
        return any(self.count(n) > 1 for n in self.services)

    def check_shared(self) -> None:
        """Instances on separate hosts share only what a deployment shares: a service with
        many needs its state in PostgreSQL, and the vault's objects in S3 under KMS-wrapped
        keys (the epoch keys are files on one host: another host's dispatch could not
        unwrap a data key, and its purger would not destroy them)."""
        for name in self.services:
            if self.count(name) < 2:
                continue
            if "FRS_STATE_URL" not in {**self.extra_env, **self.service_env.get(name, {})}:
                raise ValueError(f"{self.count(name)} {name} instances need FRS_STATE_URL "
                                 "(PostgreSQL) in service_env: a state dir is one host's")
            if name in ("intake", "dispatch") and (
                    self.extra_env.get("FRS_VAULT_BACKEND") != "s3"
                    or self.extra_env.get("FRS_VAULT_KEK_BACKEND") != "kms"):
                raise ValueError(f"{self.count(name)} {name} instances need the vault in S3 "
                                 "with FRS_VAULT_KEK_BACKEND=kms in extra_env")

    def deployment_secrets(self) -> dict[str, str]:
        """Keys every instance of a service shares, as deployed to each host: made here
        once, so no two instances race to create them. The webhook's TLS pair and HMAC
        secrets and the policy key are shared already."""
        from services.audit.checkpoint import load_or_create_key as audit_key
        from services.intake.crypto import load_or_create_private_key

        load_or_create_private_key(self.workdir / "keys" / "intake.key.pem")
        audit_key(self.workdir / "keys" / "audit-checkpoint.pem")
        return {"FRS_AUDIT_SIGNING_KEY_FILE": str(self.workdir / "keys" / "audit-checkpoint.pem")}

    def instance_env(self, name: str, key: str, env: dict[str, str]) -> dict[str, str]:
        out = {**env, **self.service_env.get(name, {})}
        if self.count(name) > 1:
            home = self.workdir / "hosts" / key
            out |= {"FRS_STATE_DIR": str(home / "state"),
                    "FRS_AUDIT_STORE_DIR": str(home / "audit")}
        if name == "results":  # each instance its own port
            out["FRS_RESULTS_WEBHOOK_PORT"] = str(self.webhook_ports[key])
        return out

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
        """Start services, every instance of each."""
        await self.start_instances(*[k for n in names or self.services
                                     for k in (self.instance_keys(n) if n in self.services
                                               else [n])])

    async def start_instances(self, *chosen: str) -> None:
        """Start processes by procs key (a service's first instance has its name)."""
        before = {n: self.procs[n].count('"consumer started"') for n in chosen}
        for n in chosen:
            self.procs[n].start()
        for n in chosen:
            await self.procs[n].wait_log('"consumer started"', before[n] + 1)

    async def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs[name].signal(sig)
        await self.procs[name].wait_exit()

    async def restart(self, key: str) -> None:
        """One instance, by procs key (not all of the service: "audit" is both)."""
        await self.start_instances(key)

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
                     tag: str = "", review: Callable[[int], bool] | None = None) -> float:
        """Publish n probes at ``rate``/s (None: as fast as possible); returns seconds
        spent. ``during(i)`` runs before probe i (a fault schedule); probe i asks for
        examiner review when ``review(i)``."""
        for _ in range(300):
            if self.public_key.exists():
                break
            await asyncio.sleep(0.1)
        requests = [build_request(
            self.image, self.public_key, case_id="CASE-1", agent_id="agent-7",
            purpose=Purpose.HUMAN_TRAFFICKING, roi_refs=["ROI-1"],
            image_source=ImageSource.SURVEILLANCE, nexus=["VA"],
            request_id=f"req-{self.run}{tag}-{i:06d}",
            review_required=review is not None and review(i)) for i in range(n)]
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


class VaultServers:
    """What the vault shares across hosts, for a rig with many instances: an S3-compatible
    server with one bucket (deploy/s3proxy/s3proxy.sh, from a checkout) and a KMS with one
    key (moto's server, a dev dependency, in this process). ``start`` returns the services'
    FRS_VAULT_* and AWS settings."""

    ACCESS = {"AWS_ACCESS_KEY_ID": "frs-local", "AWS_SECRET_ACCESS_KEY": "frs-local-secret",
              "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self, state: Path) -> None:
        self.state = state
        self.script = ROOT / "deploy" / "s3proxy" / "s3proxy.sh"
        self.script_env: dict[str, str] | None = None
        self.kms: Any = None

    def start(self) -> dict[str, str]:
        import boto3
        from moto.server import ThreadedMotoServer

        s3_port, kms_port = free_port(), free_port()
        self.script_env = {**os.environ, "FRS_S3PROXY_PORT": str(s3_port),
                           "FRS_S3PROXY_STATE": str(self.state / "s3proxy"),
                           "FRS_S3PROXY_IDENTITY": self.ACCESS["AWS_ACCESS_KEY_ID"],
                           "FRS_S3PROXY_CREDENTIAL": self.ACCESS["AWS_SECRET_ACCESS_KEY"]}
        subprocess.run([str(self.script), "start"], env=self.script_env, check=True,
                       capture_output=True, timeout=600)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per KMS call
        self.kms = ThreadedMotoServer(ip_address="127.0.0.1", port=kms_port, verbose=False)
        self.kms.start()
        s3_url, kms_url = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{kms_port}"
        session = boto3.session.Session(
            region_name="us-east-1", aws_access_key_id=self.ACCESS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.ACCESS["AWS_SECRET_ACCESS_KEY"])
        bucket = f"frs-rig-{uuid.uuid4().hex[:12]}"
        session.client("s3", endpoint_url=s3_url).create_bucket(Bucket=bucket)
        key = session.client("kms", endpoint_url=kms_url).create_key(
            Description="frs vault KEK (rig)")["KeyMetadata"]["KeyId"]
        return {**self.ACCESS, "FRS_VAULT_BACKEND": "s3", "FRS_VAULT_S3_BUCKET": bucket,
                "FRS_VAULT_S3_ENDPOINT_URL": s3_url, "FRS_VAULT_KEK_BACKEND": "kms",
                "FRS_VAULT_KMS_KEY_ID": str(key), "FRS_VAULT_KMS_ENDPOINT_URL": kms_url}

    def stop(self) -> None:
        if self.kms is not None:
            self.kms.stop()
        if self.script_env is not None:
            subprocess.run([str(self.script), "stop"], env=self.script_env, check=False,
                           capture_output=True, timeout=120)

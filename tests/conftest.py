"""Shared fixtures: a real Kafka broker for the session, service processes, test data.

The broker is started with deploy/kafka/broker.sh on a free port unless
FRS_KAFKA_BOOTSTRAP names one already running; either way every catalog topic exists."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The port helpers stay importable from here too: tests/users and deploy/test.sh use them.
from tests.factories import write_policy_key
from tests.helpers import free_port_block, free_port_pair, log_text, wait_for  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
BROKER = ROOT / "deploy" / "kafka" / "broker.sh"


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get("FRS_KAFKA_BOOTSTRAP")
    if existing:
        bootstrap = existing
        env = None
    else:
        port = free_port_pair()
        state = tmp_path_factory.mktemp("kafka")
        env = {**os.environ, "FRS_KAFKA_PORT": str(port), "FRS_KAFKA_STATE": str(state)}
        subprocess.run([str(BROKER), "start"], env=env, check=True, timeout=300)
        bootstrap = f"127.0.0.1:{port}"
    from services.kit.topics import ensure_topics

    asyncio.run(ensure_topics(bootstrap))
    # The operator's one enrollment for the session: every test's policy gate signs with
    # this key (service_env), so dispatch and the audit accept its decisions.
    asyncio.run(enroll_policy_key(bootstrap))
    os.environ["FRS_KAFKA_BOOTSTRAP"] = bootstrap
    try:
        yield bootstrap
    finally:
        if env is not None:
            subprocess.run([str(BROKER), "stop"], env=env, check=False, timeout=60)


async def enroll_policy_key(bootstrap: str) -> None:
    from services.kit.kafka import KafkaSettings
    from services.kit.publisher import Publisher
    from tests.factories import trusted

    async with Publisher(bootstrap, "/test/operator",
                         kafka=KafkaSettings(kafka_bootstrap=bootstrap)) as publisher:
        await publisher.publish([trusted()])


class ServiceProcess:
    """One `python -m services.<name>` process, started and stopped by its pid."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path,
                 module: str | None = None) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.module = module or f"services.{name}"  # a test's wrapper with a fault in it
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **extra_env: str) -> ServiceProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module], cwd=ROOT,
            env={**self.env, **extra_env}, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def wait_log(self, text: str, timeout: float = 30.0, count: int = 1) -> None:
        """Until ``text`` is logged ``count`` times; fails at once if the process exits."""
        def logged() -> bool:
            if log_text(self.log_path).count(text) >= count:
                return True
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited before logging {text!r}; log:\n"
                                     + log_text(self.log_path)[-3000:])
            return False

        wait_for(logged, timeout=timeout, interval=0.1,
                 what=lambda: f"{self.name} to log {text!r}; log:\n"
                 + log_text(self.log_path)[-3000:])

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def stop(self) -> int:
        return self.kill(signal.SIGTERM)


@pytest.fixture
def service_env(kafka_bootstrap: str, tmp_path: Path) -> dict[str, str]:
    keys = tmp_path / "keys"
    return {
        **os.environ,
        "FRS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "FRS_STATE_DIR": str(tmp_path / "state"),
        "FRS_INTAKE_PRIVATE_KEY_FILE": str(keys / "intake.key.pem"),
        # The session's policy key, enrolled by kafka_bootstrap.
        "FRS_POLICY_SIGNING_KEY_FILE": str(write_policy_key(keys / "policy-decisions.pem")),
        "FRS_AUDIT_STORE_DIR": str(tmp_path / "audit"),
        "FRS_INTAKE_METRICS_PORT": "0",
        "FRS_DISPATCH_METRICS_PORT": "0",
        "FRS_RESULTS_METRICS_PORT": "0",
        "FRS_AUDIT_METRICS_PORT": "0",
        "FRS_LOG_LEVEL": "INFO",
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture
def services(service_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, ServiceProcess]]:
    """Service processes by name; not started. Every one left running is killed after."""
    procs = {n: ServiceProcess(n, service_env, tmp_path / f"{n}.log")
             for n in ("intake", "dispatch", "results", "audit")}
    yield procs
    for p in procs.values():
        if p.proc is not None and p.proc.poll() is None:
            p.kill()


@pytest.fixture(scope="session")
def face_jpeg(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real photo of a face (scikit-image's astronaut), as JPEG."""
    import io

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="JPEG", quality=90)  # type: ignore[no-untyped-call]
    return buf.getvalue()


def secured_bus(directory: Path) -> dict[str, object]:
    """Settings for a secured bus (required outside local mode), with placeholder files."""
    for name in ("ca.crt", "password"):
        (directory / name).write_text("x")
    return {"kafka_bootstrap": "kafka.internal:9092", "kafka_security_protocol": "SASL_SSL",
            "kafka_ca_file": directory / "ca.crt", "kafka_sasl_username": "svc",
            "kafka_sasl_password_file": directory / "password"}

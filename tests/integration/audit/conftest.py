"""Fixtures for the audit service's integration tests: a real broker, a real audit
process with its own consumer group and store, and helpers to read what it wrote."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.envelope import Envelope
from schemas.events import ComplianceViolation
from services.audit.store import AuditStore
from services.kit.reader import read_topic
from tests.conftest import ServiceProcess


def audit_env(service_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**service_env, "FRS_AUDIT_GROUP_ID": f"frs-audit-{uuid.uuid4().hex[:8]}",
            "FRS_AUDIT_TICK_S": "0.3", **extra}


def store_size(directory: Path) -> int:
    try:
        store = AuditStore(directory, readonly=True)
    except FileNotFoundError:
        return 0  # not created yet
    try:
        return store.size
    finally:
        store.close()


def violations(bootstrap: str) -> list[ComplianceViolation]:
    records = asyncio.run(read_topic(bootstrap, ["frs.audit.violations"]))
    return [d.event for _, d in records
            if isinstance(d, Envelope) and isinstance(d.event, ComplianceViolation)]


def now() -> datetime:
    return datetime.now(UTC)


def later(seconds: float) -> datetime:
    return now() + timedelta(seconds=seconds)


@pytest.fixture(scope="module")
def audit_service(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[ServiceProcess, Path]]:
    """One audit process for a module's invariant tests, with short grace periods."""
    import os

    from tests.conftest import ROOT

    tmp = tmp_path_factory.mktemp("audit-inv")
    env = audit_env({**os.environ, "FRS_KAFKA_BOOTSTRAP": kafka_bootstrap,
                     "FRS_STATE_DIR": str(tmp / "state"), "FRS_AUDIT_STORE_DIR": str(tmp / "audit"),
                     "FRS_AUDIT_METRICS_PORT": "0", "PYTHONPATH": str(ROOT)},
                    FRS_AUDIT_CLEARANCE_GRACE_S="4", FRS_AUDIT_EXPIRY_GRACE_S="1",
                    FRS_AUDIT_EXIGENT_REVIEW_S="2", FRS_AUDIT_LIVENESS_GRACE_S="3")
    proc = ServiceProcess("audit", env, tmp / "audit.log").start()
    proc.wait_log("consumer started")
    try:
        yield proc, tmp / "audit"
    finally:
        proc.stop()

"""The whole system for end-to-end tests: every service plus a simulated HTTPS vendor that
answers on the results webhook, wired by services/simulators/demo.py as deploy/up.sh does.

``FRS_TEST_STORE`` chooses where the services keep their state: ``sqlite`` (the default:
files in the state dir) or ``postgresql`` (deploy/test.sh runs this tier once each way).
On PostgreSQL each service logs in as its own role and the vault keeps its ciphertexts in
an S3-compatible server, as on many hosts, and after each test nothing but keys may be
left in the state dir."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.audit.store import AuditLog, PgLocation, open_store
from services.simulators.demo import setup
from tests.conftest import ROOT, ServiceProcess
from tests.helpers import free_port_pair, wait_for
from tests.integration.aws_servers import (  # noqa: F401 - fixtures
    AwsEndpoint,
    aws_env,
    new_bucket,
    s3_server,
)
from tests.integration.stores.conftest import (  # noqa: F401 - fixtures
    empty_tables,
    pg_migrated,
    pg_server,
)
from tests.pg import PgServer

SERVICES = ("intake", "dispatch", "results", "audit", "oversight")
# What each logs once it consumes: the kit's services, and the faust worker (oversight).
READY = {name: '"consumer started"' for name in SERVICES} | {"oversight": "Ready"}
# The services with state of their own (oversight keeps its tables in changelog topics).
STATEFUL = ("intake", "dispatch", "results", "audit")
STORE = os.environ.get("FRS_TEST_STORE", "sqlite")
if STORE not in ("sqlite", "postgresql"):
    raise ValueError(f"FRS_TEST_STORE is sqlite or postgresql, not {STORE!r}")


@dataclass
class System:
    env: dict[str, str]
    services: dict[str, ServiceProcess]
    vendor_url: str
    store: str = "sqlite"
    pg: PgServer | None = field(default=None, repr=False)

    def audit_log(self) -> AuditLog:
        """The audit service's log, read as an auditor reads it, on either store."""
        if self.pg is None:
            return open_store(Path(self.env["FRS_AUDIT_STORE_DIR"]), readonly=True)
        role = auditor_role(self.pg)
        return open_store(PgLocation(self.pg.url(role), self.pg.password(role)), readonly=True)

    def wait_recorded(self, ids: set[str], timeout: float = 90) -> None:
        """Until every CloudEvents id in ``ids`` is a leaf of the audit log. The flow can
        settle before audit is even assigned its partitions (its group's join waits out
        the last test's member), and on PostgreSQL a consumed record is a leaf only once
        the sequencer has taken it from the queue."""
        missing: set[str] = set(ids)

        def recorded() -> bool:
            nonlocal missing
            store = self.audit_log()
            try:
                missing = ids - {r.ce_id for r in store.rows()}
            finally:
                store.close()
            return not missing

        wait_for(recorded, timeout=timeout, interval=0.5,
                 what=lambda: f"audit to record {sorted(missing)}")

    def frs(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=180)


def on_postgres(server: PgServer, role: str) -> dict[str, str]:
    """A service's (or a reader's) FRS_STATE_URL and password file on the test server."""
    return {"FRS_STATE_URL": server.url(role),
            "FRS_STATE_PASSWORD_FILE": server.settings(role)["FRS_STATE_PASSWORD_FILE"]}


def auditor_role(server: PgServer) -> str:
    """Who reads the audit log: the read-only auditor role where pg.sh makes one."""
    return "auditor" if (server.state / "env" / "auditor.env").exists() else "audit"


def left_in_state_dir(state_dir: Path, audit_dir: Path) -> list[str]:
    """Files a service left outside ``keys/``: on PostgreSQL there must be none."""
    found = [p for p in state_dir.rglob("*") if p.is_file()
             and p.relative_to(state_dir).parts[0] != "keys"]
    found += [p for p in audit_dir.rglob("*") if p.is_file()] if audit_dir.exists() else []
    return sorted(str(p) for p in found)


@pytest.fixture
def oversight_env() -> dict[str, str]:
    """Settings of the oversight worker alone (a test module overrides this fixture to
    give it low thresholds or an app of its own)."""
    return {}


@pytest.fixture
def system(service_env: dict[str, str], tmp_path: Path, oversight_env: dict[str, str],
           request: pytest.FixtureRequest) -> Iterator[System]:
    demo = setup(tmp_path / "demo", webhook_port=free_port_pair())
    env = {**service_env, **demo.service_env, "FRS_OVERSIGHT_METRICS_PORT": "0"}
    pg: PgServer | None = None
    per_service: dict[str, dict[str, str]] = {name: {} for name in SERVICES}
    per_service["oversight"] = dict(oversight_env)
    if STORE == "postgresql":
        pg = request.getfixturevalue("pg_migrated")
        # Each test starts from empty tables: rows other tests left (sends, deadlines,
        # vault entries) would otherwise be swept by these services.
        with ThreadPoolExecutor(1) as thread:
            thread.submit(asyncio.run, empty_tables(pg)).result()
        s3: AwsEndpoint = request.getfixturevalue("s3_server")
        bucket = new_bucket(s3, f"e2e-{uuid.uuid4().hex[:12]}")
        env |= {**aws_env(), "FRS_VAULT_BACKEND": "s3", "FRS_VAULT_S3_BUCKET": bucket,
                "FRS_VAULT_S3_ENDPOINT_URL": s3.url}
        per_service |= {name: on_postgres(pg, name) for name in STATEFUL}
        # The CLI (the tests' auditor and operator) reads the audit log in the database.
        env |= on_postgres(pg, auditor_role(pg))
    vendor = subprocess.Popen(demo.vendor_args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=open(tmp_path / "vendor.log", "wb"))  # noqa: SIM115
    procs: dict[str, ServiceProcess] = {}
    try:
        assert vendor.stdout is not None
        url = json.loads(vendor.stdout.readline())["url"]
        procs = {n: ServiceProcess(n, {**env, **per_service[n]}, tmp_path / f"{n}.log")
                 for n in SERVICES}
        for p in procs.values():
            p.start()
        for name, p in procs.items():
            p.wait_log(READY[name], timeout=90)
        yield System(env, procs, url, STORE, pg)
    finally:
        for p in procs.values():
            if p.proc is not None and p.proc.poll() is None:
                p.kill()
        vendor.terminate()
        vendor.wait(timeout=30)
    if STORE == "postgresql":
        left = left_in_state_dir(Path(env["FRS_STATE_DIR"]), Path(env["FRS_AUDIT_STORE_DIR"]))
        assert not left, f"state files on the PostgreSQL store: {left}"

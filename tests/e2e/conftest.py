"""The whole system for end-to-end tests: every service plus a simulated HTTPS vendor that
answers on the results webhook, wired by services/simulators/demo.py as deploy/up.sh does."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.simulators.demo import setup
from tests.conftest import ROOT, ServiceProcess
from tests.helpers import free_port_pair

SERVICES = ("intake", "dispatch", "results", "audit")


@dataclass
class System:
    env: dict[str, str]
    services: dict[str, ServiceProcess]
    vendor_url: str

    def frs(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=180)


@pytest.fixture
def system(service_env: dict[str, str], tmp_path: Path) -> Iterator[System]:
    demo = setup(tmp_path / "demo", webhook_port=free_port_pair())
    env = {**service_env, **demo.service_env}
    vendor = subprocess.Popen(demo.vendor_args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=open(tmp_path / "vendor.log", "wb"))  # noqa: SIM115
    procs: dict[str, ServiceProcess] = {}
    try:
        assert vendor.stdout is not None
        url = json.loads(vendor.stdout.readline())["url"]
        procs = {n: ServiceProcess(n, env, tmp_path / f"{n}.log") for n in SERVICES}
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.wait_log('"consumer started"', timeout=90)
        yield System(env, procs, url)
    finally:
        for p in procs.values():
            if p.proc is not None and p.proc.poll() is None:
                p.kill()
        vendor.terminate()
        vendor.wait(timeout=30)

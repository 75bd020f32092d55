"""``frs bench dispatch`` on the real broker: one dispatch process keeps >= 200 sends in
flight against a vendor with 1 s latency, next to a raw-aiohttp baseline from the same run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_bench_dispatch_keeps_200_sends_in_flight(kafka_bootstrap: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "bench", "dispatch", "--json",
         "--latency", "1", "--probes", "400"],
        cwd=ROOT, env={**os.environ, "FRS_KAFKA_BOOTSTRAP": kafka_bootstrap,
                       "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=300, check=False)
    result = json.loads(out.stdout)
    print(json.dumps(result))
    assert out.returncode == 0, out.stderr[-2000:]
    assert result["ok"] is True
    assert result["dispatch"]["sends"] == 400
    assert result["dispatch"]["peak_in_flight"] >= 200
    assert result["baseline_raw_aiohttp"]["sends"] == 400
    assert result["ratio_sends_per_s"] > 0

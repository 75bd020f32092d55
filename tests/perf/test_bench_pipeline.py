"""`frs bench pipeline --json` in a small form on the session broker: it runs both the raw
relay and the pipeline, and prints the ratio and the figures the targets are judged on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from services.cli.pipeline_rig import percentile
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_percentile_picks_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 or percentile(values, 50) == 51.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 99) is None


def test_bench_pipeline_prints_the_ratio(kafka_bootstrap: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "bench", "pipeline", "--json", "--probes", "60",
         "--low-probes", "30", "--low-rate", "20", "--warmup", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "FRS_KAFKA_BOOTSTRAP": kafka_bootstrap,
             "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["baseline_raw_relay"]["messages_per_s"] > 0
    high, low = result["pipeline_max_rate"], result["pipeline_low_rate"]
    assert high["complete"] and low["complete"]
    assert high["settled"] == 60 and low["settled"] == 30
    assert result["ratio_pipeline_to_raw"] == pytest.approx(
        high["probes_per_s"] / result["baseline_raw_relay"]["messages_per_s"], rel=0.01)
    assert set(result["rss_mb"]) == {"intake", "dispatch", "results"}
    assert all(r["max_load"] and r["max_load"] > 10 for r in result["rss_mb"].values())
    assert low["stages_ms"]["settled"]["n"] == 30
    assert result["warmup_probes"] == 20 and result["store"] == "sqlite"
    assert "by_store" not in result  # one store: one run
    # On the session broker (not started by the bench) only this process is measured.
    assert set(high["cpu_ms_per_probe_outside_services"]) == {"bench_process"}
    assert high["cpu_ms_per_probe_outside_services"]["bench_process"] > 0
    assert set(result["met"]) == {"ratio", "probes_per_s", "p99_at_low_rate", "rss"}
    assert set(result["met_cost"]) == {"all_in_max_rate", "all_in_low_rate", "ratio"}
    # The relay's floor at both rates: the low one sent at the low phase's rate.
    low_relay = result["baseline_raw_relay_low_rate"]
    assert low_relay["messages"] == 30 and low_relay["rate_offered"] == 20
    assert low_relay["seconds"] >= 29 / 20  # paced, not a burst
    for relay in (result["baseline_raw_relay"], low_relay):
        assert relay["cpu_ms_per_message"]["relays"] > 0
        assert relay["all_in_cpu_ms_per_message"] >= relay["cpu_ms_per_message"]["relays"]
    assert result["relay_floor_ms_per_item"] == {
        "max_rate": result["baseline_raw_relay"]["all_in_cpu_ms_per_message"],
        "low_rate": low_relay["all_in_cpu_ms_per_message"]}
    # Where the CPU goes: per service and step, scraped from the services' own counters.
    for phase in (high, low):
        intake = phase["cost"]["by_service"]["intake"]
        assert {"decrypt", "decode", "detect", "reencode", "vault", "policy", "envelope",
                "produce"} <= {s for s, ms in intake["steps_ms_per_probe"].items() if ms > 0}
        assert intake["cpu_ms_per_probe"] > sum(intake["steps_ms_per_probe"].values()) * 0.9
        assert set(phase["cost"]["by_service"]) == {"intake", "dispatch", "results"}
        assert phase["cost"]["all_in_cpu_ms_per_probe"] >= \
            phase["cost"]["services_cpu_ms_per_probe"]


def test_bench_pipeline_scales_instances_on_postgres(kafka_bootstrap: str) -> None:
    """N=1 and N=2 in one invocation on PostgreSQL (its own server from pg.sh, the vault
    in s3proxy under a moto KMS key): figures per N, the scaling efficiency, and N=2 ran
    two processes of each service."""
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "bench", "pipeline", "--json", "--probes", "40",
         "--low-probes", "20", "--low-rate", "20", "--warmup", "10", "--store", "postgres",
         "--instances", "1,2"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "FRS_KAFKA_BOOTSTRAP": kafka_bootstrap,
             "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["store"] == "postgres" and result["machine"]["nproc"] >= 1
    runs = result["by_instances"]
    assert set(runs) == {"1", "2"}
    for n, run in runs.items():
        assert run["instances"] == int(n)
        assert run["processes"] == {s: int(n) for s in ("intake", "dispatch", "results")}
        assert run["pipeline_max_rate"]["complete"] and run["pipeline_max_rate"]["settled"] == 40
        assert run["probes_per_s"] > 0 and run["p99_ms_at_max_rate"] > 0
        assert run["p99_ms_at_low_rate"] > 0
    assert result["scaling_efficiency"] == pytest.approx(
        runs["2"]["probes_per_s"] / (2 * runs["1"]["probes_per_s"]), abs=0.002)


def test_bench_pipeline_refuses_instances_without_postgres() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "bench", "pipeline", "--instances", "1,2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "--store postgres" in out.stderr

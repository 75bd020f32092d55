"""Operations end to end: a real Prometheus scrapes every service while probes flow, the
flow and latency metrics move, no alert fires on a healthy system, and every metric the
dashboard and the alert rules name is one the running services export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.e2e.conftest import System
from tests.helpers import free_port_pair, log_text, metrics_port, wait_for
from tests.unit.test_operations import alert_exprs, dashboard_exprs, referenced

pytestmark = pytest.mark.integration
PROM = ROOT / "deploy" / "prometheus"


def query(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def value(base: str, expr: str) -> float:
    result = query(base, "/api/v1/query", query=expr)["result"]
    return float(result[0]["value"][1]) if result else 0.0


def exported_families(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    names = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    # Counters are declared without their _total suffix in the TYPE line; histograms are
    # queried by their _bucket, _sum and _count series.
    return names | {f"{n}_{s}" for n in names for s in ("total", "bucket", "sum", "count")}


@pytest.fixture
def prometheus(system: System, tmp_path: Path) -> Any:
    binary = shutil.which("prometheus")
    assert binary, "prometheus missing: deploy/test.sh installs Debian's prometheus package"
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    # The rules as shipped, but with no waiting period, so the test can make one fire
    # without waiting ten minutes (the durations have their own promtool unit tests).
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    config["rule_files"] = [str(tmp_path / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{metrics_port(p.log_path)}"], "labels": {"service": name}}
        for name, p in system.services.items()
    ]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port_pair()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        def all_up() -> bool:
            try:
                targets = query(base, "/api/v1/targets")["activeTargets"]
            except OSError:
                return False
            return len(targets) == len(system.services) \
                and all(t["health"] == "up" for t in targets)

        wait_for(all_up, timeout=60, interval=0.5,
                 what=lambda: f"{len(system.services)} healthy targets; prometheus log:\n"
                 + log_text(tmp_path / "prometheus.log")[-2000:])
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def submit(system: System, tmp_path: Path, face_jpeg: bytes, request_id: str) -> None:
    """`frs submit` of the face photo, as an agent does; it must be accepted."""
    image = tmp_path / "face.jpg"
    image.write_bytes(face_jpeg)
    key = Path(system.env["FRS_INTAKE_PRIVATE_KEY_FILE"]).with_suffix(".pub.pem")
    submitted = system.frs("submit", "--image", str(image), "--case", "CASE-1", "--agent",
                           "agent-7", "--purpose", "financial_fraud", "--roi", "ROI-1",
                           "--source", "mug_shot", "--request-id", request_id,
                           "--intake-public-key", str(key))
    assert submitted.returncode == 0, submitted.stderr


def test_prometheus_sees_the_flow_and_no_alert_fires(
    system: System, prometheus: str, tmp_path: Path, face_jpeg: bytes
) -> None:
    assert system.frs("registry", "demo", "--endpoint", system.vendor_url).returncode == 0
    time.sleep(1.5)
    requests = [f"req-{uuid.uuid4()}" for _ in range(3)]
    for request_id in requests:
        submit(system, tmp_path, face_jpeg, request_id)
    for request_id in requests:
        done = system.frs("timeline", request_id, "--until", "frs.probe.settled.v1",
                          "--wait", "90")
        assert done.returncode == 0, done.stdout + done.stderr

    checks = {
        "intake consumed the requests":
            'sum(frs_intake_events_in_total{type="frs.probe.requested.v1"})',
        "policy cleared them": 'sum(frs_policy_events_out_total{type="frs.policy.cleared.v1"})',
        "dispatch sent them": 'sum(frs_dispatch_outcomes_total{outcome="dispatched"})',
        "results normalized answers":
            'sum(frs_results_events_out_total{type="frs.candidates.received.v1"})',
        "audit recorded events": "max(frs_audit_tree_size)",
        "handler latency was observed": "sum(frs_intake_handler_seconds_count)",
        "end-to-end latency was observed": "sum(frs_audit_end_to_end_seconds_count)",
    }
    seen: dict[str, float] = {}

    def counted() -> bool:
        nonlocal seen
        seen = {name: value(prometheus, expr) for name, expr in checks.items()}
        return all(v >= 3 for v in seen.values())

    wait_for(counted, timeout=30, interval=1, what=lambda: f"every count at 3; saw {seen}")
    # Over the buckets' totals, not their rate: a rate needs two scrapes of a series, and
    # the histogram's series may be born with all three observations in it (seen in CI).
    p99 = value(prometheus, "histogram_quantile(0.99, sum by (le) "
                            "(frs_audit_end_to_end_seconds_bucket))")
    assert 0 < p99 < 60

    # Healthy: rules evaluated, nothing firing or pending.
    groups = query(prometheus, "/api/v1/rules")["groups"]
    assert sum(len(g["rules"]) for g in groups) >= 9
    assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
    alerts = query(prometheus, "/api/v1/alerts")["alerts"]
    assert alerts == [], alerts

    # Every metric the dashboard and the rules name is exported by a running service.
    exported: set[str] = set()
    for proc in system.services.values():
        exported |= exported_families(metrics_port(proc.log_path))
    for source, exprs in (("dashboard", dashboard_exprs()), ("alerts", alert_exprs())):
        names, patterns = referenced(exprs)
        assert names <= exported, f"{source}: not exported: {sorted(names - exported)}"
        for pattern in patterns:
            assert any(re.fullmatch(pattern, n) for n in exported), (source, pattern)


def firing(base: str) -> set[str]:
    return {a["labels"]["alertname"] for a in query(base, "/api/v1/alerts")["alerts"]
            if a["state"] == "firing"}


def test_an_image_forced_past_expiry_fires_its_alert(
    system: System, prometheus: str, tmp_path: Path, face_jpeg: bytes
) -> None:
    assert system.frs("registry", "demo", "--endpoint", system.vendor_url).returncode == 0
    time.sleep(3)  # a few evaluations of a healthy system first
    assert firing(prometheus) == set()
    # The intake again, on the same /metrics port, now keeping images about a second and
    # sweeping once an hour: the next probe's image outlives its expiry.
    intake = system.services["intake"]
    port = metrics_port(intake.log_path)
    routes = intake.log_path.read_text().count('"consumer started"')
    assert intake.stop() == 0
    intake.start(FRS_INTAKE_METRICS_PORT=str(port), FRS_INTAKE_IMAGE_TTL_HOURS="0.0003",
                 FRS_INTAKE_PURGE_INTERVAL_S="3600")
    intake.wait_log('"consumer started"', timeout=90, count=2 * routes)
    request_id = f"req-{uuid.uuid4()}"
    submit(system, tmp_path, face_jpeg, request_id)
    assert system.frs("timeline", request_id, "--until", "frs.probe.submitted.v1",
                      "--wait", "60").returncode == 0
    wait_for(lambda: "FrsImagePastExpiry" in firing(prometheus), timeout=60, interval=1,
             what=lambda: f"FrsImagePastExpiry; alerts: {query(prometheus, '/api/v1/alerts')}")
    assert value(prometheus, "max(frs_intake_vault_objects_past_expiry)") >= 1

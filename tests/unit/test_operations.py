"""Operations artefacts: alert rules with promtool tests, a dashboard whose every query
names a metric the services declare. (The e2e test checks them against live scrapes.)"""

from __future__ import annotations

import re
import shutil
import subprocess

import yaml

from tests.conftest import ROOT

PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
# The kit gives every consumer group's service these families (services/kit/metrics.py).
KIT_FAMILIES = ("events_in_total", "events_out_total", "handler_failures_total",
                "prerequisite_waits_total", "dlq_total",
                "handler_seconds", "consumer_lag_messages")
NAME = re.compile(r"\bfrs_[a-z_]+\b")
PATTERN = re.compile(r'__name__=~"([^"]+)"')


def declared_metrics() -> set[str]:
    """Metric names the code declares: literals, plus the kit's families per Route."""
    names: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        text = path.read_text()
        names |= {m for m in re.findall(r'"(frs_[a-z_]+)"', text)
                  if not m.startswith(("frs_error", "frs_source"))}
        for service in re.findall(r'Route\(\s*"([a-z_-]+)"', text):
            names |= {f"frs_{service}_{f}" for f in KIT_FAMILIES}
    return names


def referenced(exprs: list[str]) -> tuple[set[str], set[str]]:
    names, patterns = set(), set()
    for expr in exprs:
        patterns |= set(PATTERN.findall(expr))
        plain = PATTERN.sub("", expr)
        names |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in NAME.findall(plain)}
    return names, patterns


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    import json

    board = json.loads((GRAFANA / "dashboards" / "frs-broker.json").read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def test_promtool_checks_config_and_unit_tests_every_alert() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: deploy/test.sh installs Debian's prometheus package"
    for args in (["check", "config", "prometheus.yml"], ["test", "rules", "alerts.test.yml"]):
        result = subprocess.run([promtool, *args], cwd=PROM, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROM / "alerts.test.yml").read_text()))
    defined = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
               for r in g["rules"]}
    assert defined == tested, f"alerts without a unit test: {defined - tested}"


def test_dashboard_is_generated_from_its_source() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboard", GRAFANA / "dashboard.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (GRAFANA / "dashboards" / "frs-broker.json").read_text() == module.render(), \
        "run `python deploy/grafana/dashboard.py` and commit"


def test_every_query_names_a_declared_metric() -> None:
    declared = declared_metrics()
    for source, exprs in (("dashboard", dashboard_exprs()), ("alerts", alert_exprs())):
        names, patterns = referenced(exprs)
        assert names - {"frs_"} <= declared, f"{source} names unknown metrics: " \
            f"{sorted(names - declared)}"
        series = declared | {f"{d}_{s}" for d in declared for s in ("bucket", "sum", "count")}
        for pattern in patterns:
            assert any(re.fullmatch(pattern, d) for d in series), \
                f"{source}: {pattern} matches no declared metric"


def test_compose_file_is_valid_and_runs_every_service() -> None:
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose missing: deploy/test.sh installs Debian's docker-compose"
    result = subprocess.run([compose, "-f", "deploy/compose.yaml", "config"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    for name in ("kafka", "topics", "intake", "dispatch", "results", "audit", "prometheus"):
        assert name in services, name
    for name in ("intake", "dispatch", "results", "audit"):
        assert services[name]["command"] == ["python", "-m", f"services.{name}"]
        assert services[name]["environment"]["FRS_KAFKA_BOOTSTRAP"] == "kafka:9092"
    # Everything the image copies exists, and its scrape config is a valid one.
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (ROOT / source).exists(), source
    check = subprocess.run([shutil.which("promtool") or "promtool", "check", "config",
                            "compose.prometheus.yml"], cwd=PROM, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr

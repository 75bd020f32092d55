"""`frs status` on a real broker: two instances of one service (each with its own state
directory) share a consumer group's partitions, each owned exactly once; when one is
killed the other owns them all after the rebalance. On the secured bus the operator
principal sees the same with nothing but its own grants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.catalog import POLICY_DECISIONS
from tests.conftest import ROOT, ServiceProcess
from tests.helpers import wait_for
from tests.integration.test_acl_bus import SecureBroker, secure  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

TOPIC = POLICY_DECISIONS.name


def dispatch_env(tmp_path: Path, name: str, group: str, image: Path) -> dict[str, str]:
    return {"FRS_STATE_DIR": str(tmp_path / name / "state"),
            "FRS_DISPATCH_GROUP_ID": group, "FRS_DISPATCH_INSTANCE_ID": name,
            "FRS_DISPATCH_METRICS_PORT": "0", "FRS_DISPATCH_IMAGE_SOURCE": "test-file",
            "FRS_DISPATCH_TEST_IMAGE_FILE": str(image), "PYTHONPATH": str(ROOT)}


def owners(status: dict[str, Any], group: str) -> tuple[dict[str, Any], Counter[int]]:
    """The group's entry and how many members own each partition of the topic."""
    (found,) = [g for g in status["groups"] if g["group"] == group]
    counts: Counter[int] = Counter(p for m in found["members"]
                                   for p in m["owns"].get(TOPIC, []))
    return found, counts


def status_until(run: Callable[[], subprocess.CompletedProcess[str]], group: str,
                 members: set[str]) -> dict[str, Any]:
    """`frs status --json` once the group is stable with exactly ``members`` and every
    partition owned once (a rebalance takes a few seconds)."""
    seen: dict[str, Any] = {}

    def settled() -> bool:
        done = run()
        assert done.returncode in (0, 1), done.stderr
        seen.update(json.loads(done.stdout))
        found, counts = owners(seen, group)
        return (found["state"] == "Stable"
                and {m["client_id"] for m in found["members"]} == members
                and counts == Counter(range(POLICY_DECISIONS.partitions)))

    wait_for(settled, timeout=90, interval=1.0,
             what=lambda: f"{group} with members {members}; last status {seen}")
    return seen


@pytest.fixture
def image(tmp_path: Path, face_jpeg: bytes) -> Path:
    path = tmp_path / "probe.jpg"
    path.write_bytes(face_jpeg)
    return path


@pytest.fixture
def instances() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.kill()


def test_status_shows_both_instances_then_the_survivor_owning_all(
        service_env: dict[str, str], tmp_path: Path, image: Path,
        instances: list[ServiceProcess]) -> None:
    group = f"frs-dispatch-status-{uuid.uuid4().hex[:8]}"
    for name in ("dispatch-a", "dispatch-b"):
        env = {**service_env, **dispatch_env(tmp_path, name, group, image)}
        instances.append(ServiceProcess("dispatch", env, tmp_path / f"{name}.log").start())
    for p in instances:
        p.wait_log('"consumer started"', timeout=90)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "services.cli", "status", "--json",
                               "--group", group], cwd=ROOT, env=service_env,
                              capture_output=True, text=True, timeout=120, check=False)

    both = status_until(run, group, {"frs-dispatch-dispatch-a", "frs-dispatch-dispatch-b"})
    found, _ = owners(both, group)
    assert found["service"] == "dispatch" and found["unowned"] == []
    assert all(m["owns"].get(TOPIC) for m in found["members"]), "each member owns some"
    assert {p["partition"] for p in found["partitions"]} == set(range(
        POLICY_DECISIONS.partitions))
    assert all(p["lag"] is not None for p in found["partitions"])
    # The human form names the members and the audit leader's place.
    human = subprocess.run([sys.executable, "-m", "services.cli", "status", "--group", group],
                           cwd=ROOT, env=service_env, capture_output=True, text=True,
                           timeout=120, check=False)
    assert "frs-dispatch-dispatch-a" in human.stdout and "audit leader:" in human.stdout

    instances[1].kill()
    alone = status_until(run, group, {"frs-dispatch-dispatch-a"})
    found, counts = owners(alone, group)
    assert found["unowned"] == [] and set(counts.values()) == {1}
    assert run().returncode == 0


def test_operator_sees_the_instances_on_the_secured_bus(
        secure: SecureBroker, tmp_path: Path, image: Path,  # noqa: F811
        instances: list[ServiceProcess]) -> None:
    group = f"frs-dispatch-status-{uuid.uuid4().hex[:8]}"
    base = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("dispatch-a", "dispatch-b"):
        env = {**base, **dispatch_env(tmp_path, name, group, image), **secure.env("dispatch")}
        instances.append(ServiceProcess("dispatch", env, tmp_path / f"{name}.log").start())
    for p in instances:
        p.wait_log('"consumer started"', timeout=90)

    def run() -> subprocess.CompletedProcess[str]:
        return secure.cli("operator", "status", "--json", "--service", "dispatch")

    seen = status_until(run, group, {"frs-dispatch-dispatch-a", "frs-dispatch-dispatch-b"})
    assert owners(seen, group)[0]["unowned"] == []
    # Describing is all the operator may do with the group: it cannot join it.
    upstream = secure.cli("upstream", "status", "--json")
    assert upstream.returncode in (0, 1), upstream.stderr
    assert json.loads(upstream.stdout)["groups"] == []

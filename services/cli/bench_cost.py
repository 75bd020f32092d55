"""Where a probe's CPU goes, for ``frs bench pipeline``: each service's
``frs_step_cpu_seconds_total`` (services/kit/cost.py) scraped before and after a phase,
and the CPU of its whole process tree (the intake's image workers are processes of its
own forkserver, not threads: ``/proc/<pid>/stat`` of the service alone misses them).

Per service: CPU ms per probe of the tree, of each step, and "other" (the tree's CPU no
step covers: event loop, Kafka client, logging, the image workers' pipe and pickling)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

from services.kit.cost import STEPS

STEP_METRIC = "frs_step_cpu_seconds_total"


class Process(Protocol):
    """What the bench knows of a running service instance (pipeline_rig.Service)."""

    name: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None

    @property
    def alive(self) -> bool: ...


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and every live descendant, plus what each of
    them reaped of its dead children (a retired image worker's CPU is in its parent's
    cutime/cstime once reaped)."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (ppid, cpu s)
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        cpu = sum(int(f) for f in fields[11:15]) / tick
        stats[int(entry)] = (int(fields[1]), cpu)
    children: dict[int, list[int]] = {}
    for child, (parent, _cpu) in stats.items():
        children.setdefault(parent, []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            total += stats[current][1]
            todo.extend(children.get(current, ()))
    return total


def metrics_port(log_path: Path) -> int | None:
    """The /metrics port the service logged when it started (the last start)."""
    port = None
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if '"service started"' in line:
            try:
                port = int(json.loads(line)["metrics_port"])
            except (ValueError, KeyError, TypeError):
                continue
    return port


def parse_steps(text: str) -> dict[str, float]:
    out = dict.fromkeys(STEPS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == STEP_METRIC:
                step = sample.labels.get("step", "")
                out[step] = out.get(step, 0.0) + sample.value
    return out


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


async def snapshot(procs: Mapping[str, Process]) -> dict[str, dict[str, Any]]:
    """Per service (instances summed): tree CPU seconds and step CPU seconds, now."""
    out: dict[str, dict[str, Any]] = {}
    for proc in procs.values():
        if not proc.alive or proc.proc is None:
            continue
        pid = proc.proc.pid
        port = metrics_port(proc.log_path)
        steps = parse_steps(await asyncio.to_thread(_scrape, port)) if port else {}
        mine = out.setdefault(proc.name, {"cpu_s": 0.0, "steps": {}})
        mine["cpu_s"] += tree_cpu_s(pid)
        for step, seconds in steps.items():
            mine["steps"][step] = mine["steps"].get(step, 0.0) + seconds
    return out


def breakdown(before: Mapping[str, Mapping[str, Any]], after: Mapping[str, Mapping[str, Any]],
              probes: int) -> dict[str, Any]:
    """CPU ms per probe between two snapshots: by service (tree, steps, other) and by
    step over all services."""
    per = 1000 / max(1, probes)
    by_service: dict[str, Any] = {}
    by_step: dict[str, float] = {}
    for name, end in after.items():
        start = before.get(name, {"cpu_s": 0.0, "steps": {}})
        steps = {s: max(0.0, v - start["steps"].get(s, 0.0)) * per
                 for s, v in end["steps"].items()}
        total = max(0.0, end["cpu_s"] - start["cpu_s"]) * per
        counted = sum(steps.values())
        by_service[name] = {
            "cpu_ms_per_probe": round(total, 2),
            "steps_ms_per_probe": {s: round(v, 3) for s, v in steps.items() if v > 0},
            # Can be slightly negative: /proc counts in clock ticks (10 ms).
            "other_ms_per_probe": round(total - counted, 2),
        }
        for s, v in steps.items():
            by_step[s] = by_step.get(s, 0.0) + v
        by_step["other"] = by_step.get("other", 0.0) + total - counted
    return {"by_service": by_service,
            "by_step": {s: round(v, 3) for s, v in sorted(by_step.items(),
                                                           key=lambda kv: -kv[1]) if v},
            "services_cpu_ms_per_probe": round(sum(s["cpu_ms_per_probe"]
                                                   for s in by_service.values()), 2)}


def table(phases: Mapping[str, Mapping[str, Any]]) -> str:
    """A short human table: step CPU ms per probe, one column per phase."""
    names = list(phases)
    steps: list[str] = []
    for cost in phases.values():
        steps += [s for s in cost["by_step"] if s not in steps]
    lines = ["step ms/probe  " + "  ".join(f"{n:>10}" for n in names)]
    for step in steps:
        lines.append(f"{step:<14} " + "  ".join(
            f"{phases[n]['by_step'].get(step, 0.0):>10.2f}" for n in names))
    lines.append(f"{'services':<14} " + "  ".join(
        f"{phases[n]['services_cpu_ms_per_probe']:>10.2f}" for n in names))
    return "\n".join(lines) + "\n"

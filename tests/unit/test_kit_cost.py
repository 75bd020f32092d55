"""Per-step CPU accounting (services/kit/cost.py) and the bench's breakdown of it."""

from __future__ import annotations

import time

import pytest

from services.cli.bench_cost import breakdown, parse_steps
from services.kit import cost


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _value(step: str) -> float:
    return float(cost.step_cpu().labels(step)._value.get())


def test_every_step_is_exported_and_names_are_fixed() -> None:
    with cost.step("policy"):
        pass
    samples = {s.labels["step"] for m in cost.step_cpu().collect() for s in m.samples
               if s.name.endswith("_total")}
    assert samples == set(cost.STEPS)
    with pytest.raises(ValueError, match="unknown step"), cost.step("probe-123"):
        pass


def test_a_nested_step_is_counted_once_in_its_own_name() -> None:
    outer0, inner0 = _value("decode"), _value("reencode")
    with cost.step("decode"):
        _burn(0.02)
        with cost.step("reencode"):
            _burn(0.03)
    outer, inner = _value("decode") - outer0, _value("reencode") - inner0
    assert inner == pytest.approx(0.03, abs=0.01)
    assert outer == pytest.approx(0.02, abs=0.01)  # exclusive of the nested step


def test_sleeping_is_not_cpu() -> None:
    before = _value("vault")
    with cost.step("vault"):
        time.sleep(0.05)
    assert _value("vault") - before < 0.01


def test_collected_cpu_goes_to_the_tally_and_is_added_later() -> None:
    before = _value("detect")
    with cost.collect() as spent, cost.step("detect"):
        _burn(0.01)
    assert _value("detect") == before  # not counted here: another process's work
    assert spent["detect"] == pytest.approx(0.01, abs=0.01)
    cost.add_all({**spent, "not-a-step": 5.0})
    assert _value("detect") - before == pytest.approx(spent["detect"])


def test_breakdown_is_per_probe_with_other_the_rest() -> None:
    before = {"intake": {"cpu_s": 10.0, "steps": {"detect": 1.0, "vault": 0.5}}}
    after = {"intake": {"cpu_s": 12.0, "steps": {"detect": 2.0, "vault": 0.7}},
             "results": {"cpu_s": 0.5, "steps": {"state": 0.1}}}
    out = breakdown(before, after, probes=100)
    intake = out["by_service"]["intake"]
    assert intake["cpu_ms_per_probe"] == 20.0
    assert intake["steps_ms_per_probe"] == {"detect": 10.0, "vault": 2.0}
    assert intake["other_ms_per_probe"] == 8.0
    assert out["by_service"]["results"]["other_ms_per_probe"] == 4.0
    assert out["by_step"] == {"detect": 10.0, "other": 12.0, "vault": 2.0, "state": 1.0}
    assert out["services_cpu_ms_per_probe"] == 25.0


def test_parse_steps_reads_the_exposition() -> None:
    text = ('# TYPE frs_step_cpu_seconds_total counter\n'
            'frs_step_cpu_seconds_total{step="detect"} 1.5\n'
            'frs_step_cpu_seconds_total{step="vault"} 0.25\n'
            'frs_intake_events_in_total{type="x"} 3.0\n')
    steps = parse_steps(text)
    assert steps["detect"] == 1.5 and steps["vault"] == 0.25 and steps["decrypt"] == 0.0

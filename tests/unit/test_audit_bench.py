"""`frs bench audit --json` runs end to end at a small size and reports ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli.entry import main as frs


def test_bench_audit_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert frs(["bench", "audit", "--json", "--append-leaves", "700", "--verify-leaves", "900",
                "--batch", "100", "--workdir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["appends"]
    assert row["batch"] == 100 and row["repeats"] == 3
    for key in ("store_appends_per_s", "service_appends_per_s", "raw_append_fsync_per_s"):
        assert row[key] > 0
    assert 0 < row["store_ratio_vs_raw"] == pytest.approx(
        row["store_appends_per_s"] / row["raw_append_fsync_per_s"], rel=0.01)
    assert out["verify"]["leaves"] == 900 and out["verify"]["ok"] is True
    assert list(tmp_path.iterdir()) == []  # scratch stores removed

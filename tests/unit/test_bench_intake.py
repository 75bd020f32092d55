"""`frs bench intake`: JSON with both rates from the same run, their ratio and the machine."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from services.cli.entry import build_parser, main


def test_bench_intake_json(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its scratch vault and images
    assert main(["bench", "intake", "--json", "--images", "2", "--rounds", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    full, base = out["full_path"]["images_per_s"], out["baseline"]["images_per_s"]
    assert full > 0 and base > 0
    assert out["ratio_full_to_baseline"] == pytest.approx(full / base, rel=0.02)
    assert out["machine"]["nproc"] >= 1 and out["machine"]["python"].startswith("3.")
    assert out["images"] == 2


def test_bench_intake_misuse_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "intake", "--images", "0"]) == 2
    help_text = build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    assert "intake" in help_text

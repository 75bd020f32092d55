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


def test_detector_comparison_on_part_of_the_labelled_set() -> None:
    from services.cli import bench_faces, face_set

    rows = face_set.manifest()
    items = [face_set.render(r) for r in rows[:3] + rows[-3:]]
    out = bench_faces.compare(items)
    assert set(out["detectors"]) == {"haar", "blazeface"}
    for d in out["detectors"].values():
        assert 0 <= d["found"] <= 3 and d["recall"] == round(d["found"] / 3, 3)
        assert 0 <= d["false_images"] <= d["false_boxes"] and d["ms_per_image_mean"] > 0
    for row in out["gate_disagreements"]:
        assert row["haar"] != row["blazeface"] and row["right"]

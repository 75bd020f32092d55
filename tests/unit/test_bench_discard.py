"""A bench run's directory (keys beside the encrypted images they open) does not outlive
the run; after a failure only its logs stay."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.bench_pipeline import discard


def _run_dir(root: Path) -> Path:
    run = root / "frs-bench-pipeline-x"
    (run / "keys").mkdir(parents=True)
    (run / "keys" / "intake.key").write_bytes(b"private")
    (run / "state" / "vault").mkdir(parents=True)
    (run / "state" / "vault" / "obj.bin").write_bytes(b"ciphertext")
    (run / "intake.log").write_text("log\n")
    (run / "keys" / "link.log").symlink_to(run / "keys" / "intake.key")
    return run


def test_a_finished_run_leaves_nothing(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    discard(run, failed=False)
    assert not run.exists()


def test_a_failed_run_keeps_its_logs_only(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path)
    discard(run, failed=True)
    kept = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert kept == ["intake.log"]  # a symlink named .log is not a log
    assert str(run) in capsys.readouterr().err

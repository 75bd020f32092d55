"""The README's settings table is the one the code generates, and every setting has one."""

from __future__ import annotations

import re

from services.cli.settings_doc import markdown, rows
from tests.conftest import ROOT


def test_readme_settings_table_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- settings-table:start -->\n(.*?)<!-- settings-table:end -->",
                      readme, re.S)
    assert found, "README lost its settings-table markers"
    assert found.group(1) == markdown(), "run `frs settings` and paste it into README.md"


def test_every_setting_is_named_and_explained() -> None:
    names = [r["variable"] for r in rows()]
    assert len(names) == len(set(names))
    assert "FRS_KAFKA_BOOTSTRAP" in names and "FRS_INTAKE_IMAGE_TTL_HOURS" in names
    for r in rows():
        assert r["variable"].startswith("FRS_"), r
        assert r["meaning"], f"{r['variable']} has no description"

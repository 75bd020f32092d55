"""What the package needs lives in the package: nothing under services/ or schemas/
imports the repository's deploy/ (the installed `frs` would die on it), and the facts the
CLI carries about deploy/ agree with it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from services.cli.acl import ACLS_TOOL, KAFKA_VERSION
from services.kit.acls import ACL_FILE

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_package_module_imports_deploy() -> None:
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for top in ("services", "schemas") for path in (ROOT / top).rglob("*.py")
                 for name in _imports(path) if name == "deploy" or name.startswith("deploy.")]
    assert not offenders, offenders


def test_the_cli_knows_the_kafka_release_the_scripts_fetch() -> None:
    pom = (ROOT / "deploy" / "kafka" / "pom.xml").read_text()
    found = re.search(r"<kafka.version>(.*)</kafka.version>", pom)
    assert found is not None and found.group(1) == KAFKA_VERSION


def test_acl_file_and_tool_ship_inside_the_package() -> None:
    for path in (ACL_FILE, ACLS_TOOL):
        assert path.is_file() and path.is_relative_to(ROOT / "services"), path

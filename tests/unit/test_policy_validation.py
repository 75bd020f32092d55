"""The shipped policies type-check against the schema; drift does not (CI gate)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.intake.policy.engine import (
    POLICY_DIR,
    POLICY_FILE,
    SCHEMA_FILE,
    PolicyEngine,
    PolicyLoadError,
    policy_digest,
    validate,
)

SHIPPED_POLICIES = (POLICY_DIR / POLICY_FILE).read_text()
SHIPPED_SCHEMA = (POLICY_DIR / SCHEMA_FILE).read_text()


def test_shipped_policies_validate_against_schema() -> None:
    assert validate(SHIPPED_POLICIES, SHIPPED_SCHEMA) == []


@pytest.mark.parametrize("bad_rule", [
    # an attribute the schema does not declare
    'forbid (principal, action == Action::"search", resource) '
    'when { resource.country == "US" };',
    # a type error: comparing a String attribute with a Long
    'forbid (principal, action == Action::"search", resource) when { resource.kind > 3 };',
    # an optional attribute read without `has`
    'forbid (principal, action == Action::"search", resource) '
    'when { context.now < principal.training_valid_until };',
    # an action the schema does not know
    'forbid (principal, action == Action::"delete", resource);',
])
def test_ill_typed_policy_fails_validation(bad_rule: str) -> None:
    policies = SHIPPED_POLICIES + '\n@id("REQ-DRIFT")\n' + bad_rule + "\n"
    errors = validate(policies, SHIPPED_SCHEMA)
    assert errors, "an ill-typed policy must not validate"
    assert any(e.startswith("REQ-DRIFT") for e in errors)
    with pytest.raises(PolicyLoadError):
        PolicyEngine(policies, SHIPPED_SCHEMA, "0" * 64)


def test_schema_drift_fails_validation() -> None:
    # Renaming an attribute in the schema breaks the rules that read it.
    schema = SHIPPED_SCHEMA.replace("jurisdictions: Set<String>", "regions: Set<String>")
    assert schema != SHIPPED_SCHEMA
    errors = validate(SHIPPED_POLICIES, schema)
    assert any(e.startswith("REQ-NEXUS") for e in errors)


def test_unparsable_policy_is_an_error() -> None:
    assert validate("permit (principal, action, resource", SHIPPED_SCHEMA)


def test_every_rule_needs_an_id() -> None:
    policies = SHIPPED_POLICIES + '\nforbid (principal, action == Action::"search", resource);\n'
    with pytest.raises(PolicyLoadError, match="no @id"):
        PolicyEngine(policies, SHIPPED_SCHEMA, "0" * 64)


def test_every_rule_has_a_privacy_officer_comment() -> None:
    # Each @id("REQ-...") is preceded by a comment quoting its requirement.
    lines = SHIPPED_POLICIES.splitlines()
    for i, line in enumerate(lines):
        if line.startswith('@id("REQ-'):
            rule = line.split('"')[1]
            above = "\n".join(lines[max(0, i - 4):i])
            assert f"// {rule}:" in above, f"{rule} lacks its requirement comment"


def test_digest_is_stable_and_changes_with_either_file(tmp_path: Path) -> None:
    copy = tmp_path / "policy"
    copy.mkdir()
    for name in (POLICY_FILE, SCHEMA_FILE):
        shutil.copy(POLICY_DIR / name, copy / name)
    shipped = policy_digest(POLICY_DIR)
    assert policy_digest(copy) == shipped
    assert PolicyEngine.load(copy).digest == shipped

    (copy / POLICY_FILE).write_text(SHIPPED_POLICIES + "\n// a comment is a change too\n")
    changed_policy = policy_digest(copy)
    assert changed_policy != shipped

    shutil.copy(POLICY_DIR / POLICY_FILE, copy / POLICY_FILE)
    (copy / SCHEMA_FILE).write_text(SHIPPED_SCHEMA + "\n")
    assert policy_digest(copy) not in {shipped, changed_policy}


def test_missing_policy_files_refuse_to_load(tmp_path: Path) -> None:
    with pytest.raises(PolicyLoadError, match="cannot read"):
        PolicyEngine.load(tmp_path)

"""The ACL file states least privilege; the README table is generated from it."""

from __future__ import annotations

import re

import pytest

from schemas.catalog import (
    AUDIT_CHECKPOINTS,
    AUDIT_VIOLATIONS,
    BROKER_CLOCK,
    EXIGENT_REVIEWS,
    POLICY_DECISIONS,
    PROBE_EVENTS,
    PROBE_REQUESTS,
    REGISTRY_PROVIDERS,
    REGISTRY_SUSPENSIONS,
    REGISTRY_TRUSTED_KEYS,
    TOPICS,
)
from services.kit.acls import AclFile, Binding, allows, bindings, load, markdown_table
from tests.conftest import ROOT

DOC = load()
TOPIC_NAMES = [t.name for t in TOPICS]


def test_readme_table_is_generated_from_the_acl_file() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- acl-table:start -->\n(.*?)\n<!-- acl-table:end -->", readme, re.S)
    assert match, "README lacks the acl-table markers"
    assert match.group(1) == markdown_table(DOC), "README table drifted: run `frs acl table`"


def test_every_service_and_outside_role_has_its_own_principal() -> None:
    assert set(DOC.principals) == {"intake", "policy", "dispatch", "results", "audit",
                                   "oversight", "upstream", "operator", "supervisor", "auditor"}
    assert set(DOC.super_users) == {"broker", "admin"}


def test_only_upstream_writes_probe_requests_and_only_intake_acts_on_them() -> None:
    writers = {p for p in DOC.principals if allows(DOC, p, "WRITE", PROBE_REQUESTS.name)}
    assert writers == {"upstream"}
    readers = {p for p in DOC.principals if allows(DOC, p, "READ", PROBE_REQUESTS.name)}
    # audit records every event (ciphertext digest only), auditors read everything.
    assert readers == {"intake", "audit", "auditor"}
    groups = [b for b in bindings(DOC) if b.resource_type == "GROUP"]
    assert {b.principal for b in groups if b.name.startswith("frs-intake")} == {"User:intake"}


def test_upstream_reads_the_outcomes_of_its_requests_and_nothing_else() -> None:
    # `frs submit` waits for ProbeSubmitted/ProbeRejected on frs.probe.events with assigned
    # partitions (services/cli/client.py OutcomeWatch): no consumer group to grant.
    read = {t for t in TOPIC_NAMES if allows(DOC, "upstream", "READ", t)}
    assert read == {PROBE_EVENTS.name}
    assert not DOC.principals["upstream"].groups
    assert Binding("TOPIC", "LITERAL", PROBE_EVENTS.name, "User:upstream", "READ") in bindings(DOC)


def test_nobody_but_audit_writes_the_audit_topics() -> None:
    for topic in (AUDIT_CHECKPOINTS.name, AUDIT_VIOLATIONS.name):
        assert {p for p in DOC.principals if allows(DOC, p, "WRITE", topic)} == {"audit"}


def test_only_intake_writes_the_clock_topic_and_nobody_needs_to_read_it() -> None:
    assert {p for p in DOC.principals if allows(DOC, p, "WRITE", BROKER_CLOCK.name)} == {"intake"}
    # The intake reads the broker's time from the produce response: no READ is granted
    # for it (audit and auditors read it through their frs.* prefix like everything else).
    assert not allows(DOC, "intake", "READ", BROKER_CLOCK.name)


def test_auditors_read_everything_and_write_nothing() -> None:
    assert all(allows(DOC, "auditor", "READ", t) for t in TOPIC_NAMES)
    assert not any(allows(DOC, "auditor", "WRITE", t) for t in TOPIC_NAMES)
    assert not DOC.principals["auditor"].groups


def test_dispatch_cannot_write_policy_topics() -> None:
    assert not any(allows(DOC, "dispatch", "WRITE", t) for t in TOPIC_NAMES
                   if t.startswith("frs.policy."))


def test_only_the_policy_gate_writes_decisions() -> None:
    # Issue 19: supervisor (exigent reviews) and intake (the gate's host process) lost it.
    writers = {p for p in DOC.principals if allows(DOC, p, "WRITE", POLICY_DECISIONS.name)}
    assert writers == {"policy"}
    assert {b.principal for b in bindings(DOC) if b.resource_type == "GROUP"
            and b.name.startswith("frs-policy")} == {"User:policy"}


def test_only_supervisors_write_exigent_reviews_and_the_gate_reads_them() -> None:
    writers = {p for p in DOC.principals if allows(DOC, p, "WRITE", EXIGENT_REVIEWS.name)}
    assert writers == {"supervisor"}
    assert allows(DOC, "policy", "READ", EXIGENT_REVIEWS.name)


def test_results_may_request_a_suspension_but_not_write_provider_entries() -> None:
    assert not allows(DOC, "results", "WRITE", REGISTRY_PROVIDERS.name)
    assert allows(DOC, "results", "WRITE", REGISTRY_SUSPENSIONS.name)
    registry_writes = {t for t in TOPIC_NAMES if t.startswith("frs.registry.")
                       and allows(DOC, "results", "WRITE", t)}
    assert registry_writes == {REGISTRY_SUSPENSIONS.name}


def test_only_the_operator_enrolls_trusted_keys() -> None:
    writers = {p for p in DOC.principals
               if allows(DOC, p, "WRITE", REGISTRY_TRUSTED_KEYS.name)}
    assert writers == {"operator"}


@pytest.mark.parametrize("service", ["intake", "policy", "dispatch", "results", "audit"])
def test_each_service_writes_its_own_dlq_and_no_other(service: str) -> None:
    dlqs = {t for t in TOPIC_NAMES if t.startswith("frs.dlq.")
            and allows(DOC, service, "WRITE", t)}
    assert dlqs == {f"frs.dlq.{service}"}


def test_bindings_are_literal_or_prefixed_allow_rules() -> None:
    found = bindings(DOC)
    assert Binding("TOPIC", "LITERAL", "frs.probe.requests", "User:upstream", "WRITE") in found
    assert Binding("TOPIC", "PREFIXED", "frs.", "User:auditor", "READ") in found
    assert Binding("GROUP", "PREFIXED", "frs-policy", "User:policy", "READ") in found
    assert not [b for b in found if b.operation == "WRITE" and b.principal == "User:auditor"]


def test_a_topic_missing_from_the_catalog_is_refused() -> None:
    raw = DOC.model_dump()
    raw["principals"]["dispatch"]["write"] = ["frs.dispatch.evnts"]
    with pytest.raises(ValueError, match=r"not in schemas/catalog\.py"):
        AclFile.model_validate(raw)

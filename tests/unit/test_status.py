"""What operators see of many instances: `frs status`'s view of a group (owners, lag,
partitions without an owner, the audit leader), the fleet metrics and the operator's
grant to describe groups."""

from __future__ import annotations

from prometheus_client import REGISTRY

from schemas.catalog import POLICY_DECISIONS
from services.cli.status import (
    AuditLeader,
    GroupStatus,
    Member,
    audit_leader,
    group_status,
    group_topics,
    render,
    service_of,
)
from services.kit.acls import Binding, bindings, load
from services.kit.metrics import audit_leader as export_audit_leader
from services.kit.metrics import identify, owned_partitions

TOPIC = "frs.policy.decisions"


def member(name: str, *partitions: int) -> Member:
    return Member(f"{name}-uuid", name, "10.0.0.1", {TOPIC: list(partitions)} if partitions
                  else {})


def test_every_partition_has_its_owner_lag_and_the_rest_are_unowned() -> None:
    found = group_status("frs-dispatch", "dispatch", "Stable",
                         [member("frs-dispatch-b", 2), member("frs-dispatch-a", 0)],
                         {TOPIC: 3}, {(TOPIC, 0): 5, (TOPIC, 1): -1}, {(TOPIC, 0): 9,
                                                                      (TOPIC, 1): 4,
                                                                      (TOPIC, 2): 0})
    assert [m.client_id for m in found.members] == ["frs-dispatch-a", "frs-dispatch-b"]
    rows = {p.partition: p for p in found.partitions}
    assert (rows[0].owner, rows[0].committed, rows[0].lag) == ("frs-dispatch-a", 5, 4)
    # Nothing committed (-1 from the broker): everything up to the end is behind.
    assert (rows[1].owner, rows[1].committed, rows[1].lag) == (None, None, 4)
    assert rows[2].owner == "frs-dispatch-b"
    assert [(p.topic, p.partition) for p in found.unowned] == [(TOPIC, 1)]
    assert found.as_json()["unowned"] == [{"topic": TOPIC, "partition": 1}]
    text = render([found], audit_leader([found]))
    assert "frs-dispatch-a  host 10.0.0.1" in text and "0 (lag 4)" in text
    assert "no owner: frs.policy.decisions[1]" in text
    assert text.endswith("audit leader: (no audit instance)")


def test_groups_belong_to_the_service_whose_principal_may_join_them() -> None:
    patterns = {name: g.groups for name, g in load().principals.items() if g.groups}
    assert service_of("frs-dispatch-t1234", patterns) == "dispatch"
    assert service_of("frs-results-tracker", patterns) == "results"
    assert service_of("frs-policy-reviews", patterns) == "policy"
    assert service_of("frs-oversight", patterns) == "oversight"
    assert service_of("someone-elses", patterns) is None


def audit_group(*names: str) -> GroupStatus:
    return GroupStatus("frs-audit", "audit", "Stable", [member(n, 0) for n in names], [])


def test_audit_leader_is_the_single_instance_until_a_sequencer_lease_exists() -> None:
    assert audit_leader([audit_group("frs-audit-a")]) == AuditLeader(
        "frs-audit-a", "(single audit instance)")
    two = audit_leader([audit_group("frs-audit-a", "frs-audit-b")])
    assert two.leader is None and "2 audit instances" in two.detail
    assert "audit leader: frs-audit-a (single audit instance)" in render(
        [audit_group("frs-audit-a")], audit_leader([audit_group("frs-audit-a")]))


def test_fleet_metrics_name_the_instance_and_what_it_owns() -> None:
    identify("dispatch", "host-a-1")
    identify("dispatch", "host-a-2")  # the last identity only
    assert REGISTRY.get_sample_value("frs_instance_info",
                                     {"service": "dispatch", "instance": "host-a-2"}) == 1
    assert REGISTRY.get_sample_value("frs_instance_info",
                                     {"service": "dispatch", "instance": "host-a-1"}) is None
    labels = {"service": "dispatch", "instance": "host-a-2", "topic": TOPIC}
    owned_partitions(TOPIC, 2)
    assert REGISTRY.get_sample_value("frs_partitions_owned", labels) == 2
    assert REGISTRY.get_sample_value("frs_topic_partitions", labels) == \
        POLICY_DECISIONS.partitions
    owned_partitions(TOPIC, 0)  # all revoked
    assert REGISTRY.get_sample_value("frs_partitions_owned", labels) == 0
    export_audit_leader(True)
    assert REGISTRY.get_sample_value("frs_audit_leader", {
        "service": "dispatch", "instance": "host-a-2"}) == 1


def test_the_operator_may_describe_every_service_group_and_join_none() -> None:
    doc = load()
    assert Binding("GROUP", "PREFIXED", "frs-", "User:operator", "DESCRIBE") in bindings(doc)
    assert not [b for b in bindings(doc) if b.principal == "User:operator"
                and b.resource_type == "GROUP" and b.operation == "READ"]


def test_a_live_group_owes_owners_for_what_its_members_read_only() -> None:
    """After the tracker stopped reading frs.probe.events, its old offsets there are not
    partitions without an owner; a group with no member is judged by what it committed."""
    committed = {"frs.probe.events", "frs.policy.decisions"}
    assert group_topics([{"frs.policy.decisions", "frs.provider.responses"},
                         {"frs.policy.decisions", "frs.provider.responses"}],
                        committed) == {"frs.policy.decisions", "frs.provider.responses"}
    assert group_topics([], committed) == committed


def test_a_retired_group_owes_no_owners_but_a_member_in_it_is_a_fault() -> None:
    """The results normalizer's group after the upgrade that folded it into the tracker:
    its offsets stay for a week; until then status must not report it as partitions
    without an owner, and must report an old instance still running in it."""
    from services.results.app import FORMER_NORMALIZER

    assert FORMER_NORMALIZER == "frs-results"
    ends = {(TOPIC, 0): 9, (TOPIC, 1): 4}
    left = group_status(FORMER_NORMALIZER, "results", "Empty", [], {TOPIC: 2},
                        {(TOPIC, 0): 9, (TOPIC, 1): 4}, ends)
    assert left.retired_for == "frs-results-tracker"
    assert left.unowned == [] and not left.faulty and left.as_json()["unowned"] == []
    assert "retired: frs-results-tracker took its work over; its offsets stay" in render(
        [left], audit_leader([left]))
    running = group_status(FORMER_NORMALIZER, "results", "Stable",
                           [member("frs-results-old", 0, 1)], {TOPIC: 2}, {}, ends)
    assert running.faulty
    assert "stop these instances of the former version" in render(
        [running], audit_leader([running]))
    # A live group with a partition unowned is a fault as before; a whole one is not.
    live = group_status("frs-results-tracker", "results", "Stable",
                        [member("frs-results-a", 0)], {TOPIC: 2}, {}, ends)
    assert live.retired_for is None and live.faulty
    assert not group_status("frs-results-tracker", "results", "Stable",
                            [member("frs-results-a", 0, 1)], {TOPIC: 2}, {}, ends).faulty

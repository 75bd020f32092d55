"""The co-partitioned sticky assignor (services/kit/assignor.py), without a broker."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from services.kit.assignor import CopartitionedAssignor, share
from services.kit.processor import copartition_fault

TOPICS = ("frs.probe.events", "frs.policy.decisions", "frs.dispatch.events")


def cluster(partitions: dict[str, int]) -> ClusterMetadata:
    return cast(ClusterMetadata, SimpleNamespace(
        partitions_for_topic=lambda t: set(range(partitions[t])) if t in partitions else None))


def member(held: list[int], topics: tuple[str, ...] = TOPICS) -> Any:
    return ConsumerProtocolMemberMetadata(0, list(topics), json.dumps({"held": held}).encode())


def assign(members: dict[str, Any], partitions: int = 3) -> dict[str, dict[str, list[int]]]:
    out = CopartitionedAssignor().assign(cluster(dict.fromkeys(TOPICS, partitions)), members)
    return {m: {t: list(ps) for t, ps in a.assignment} for m, a in out.items()}


def test_each_member_gets_the_same_numbers_of_every_topic() -> None:
    for n in range(1, 6):
        got = assign({f"m{i}": member([]) for i in range(n)}, partitions=12)
        numbers = []
        for topics in got.values():
            assert len({tuple(ps) for ps in topics.values()}) <= 1, topics
            numbers += next(iter(topics.values()), [])
        assert sorted(numbers) == list(range(12)), "every number to exactly one member"
        sizes = [len(next(iter(t.values()), [])) for t in got.values()]
        assert max(sizes) - min(sizes) <= 1, "balanced"


def test_members_keep_what_they_held_when_one_joins_or_leaves() -> None:
    two = assign({"a": member([]), "b": member([])}, partitions=6)
    held = {m: t[TOPICS[0]] for m, t in two.items()}
    three = assign({m: member(ps) for m, ps in held.items()} | {"0-new": member([])},
                   partitions=6)
    for m, before in held.items():
        assert set(three[m][TOPICS[0]]) <= set(before), "nothing moves between the old two"
    assert len(three["0-new"][TOPICS[0]]) == 2
    # One leaves: the survivor keeps its own and takes the other's.
    alone = assign({"a": member(three["a"][TOPICS[0]])}, partitions=6)
    assert alone["a"][TOPICS[0]] == list(range(6))


def test_two_claims_on_one_number_give_it_once() -> None:
    got = share(range(4), {"a": [0, 1], "b": [1, 2]})
    assert sorted(got["a"] + got["b"]) == [0, 1, 2, 3]
    assert got == {"a": [0, 1], "b": [2, 3]}


def test_a_member_without_readable_history_still_gets_its_share() -> None:
    garbled = ConsumerProtocolMemberMetadata(0, list(TOPICS), b"not json")
    got = assign({"a": garbled, "b": member([0, 1, 2])})
    assert sorted(got["a"][TOPICS[0]] + got["b"][TOPICS[0]]) == [0, 1, 2]
    assert got["b"][TOPICS[0]] == [0, 1]


def test_on_assignment_remembers_the_numbers_for_the_next_join() -> None:
    assignor = CopartitionedAssignor()
    out = assignor.assign(cluster(dict.fromkeys(TOPICS, 3)), {"a": member([])})
    assignor.on_assignment(out["a"])
    assert json.loads(assignor.metadata(TOPICS).user_data) == {"held": [0, 1, 2]}


def test_topics_with_different_partition_counts_are_named_in_one_line() -> None:
    assert copartition_fault("g", {"a": 3, "b": 3}) is None
    fault = copartition_fault("frs-results-tracker", {"x.events": 3, "y.events": 6,
                                                      "z.events": None})
    assert fault == ("consumer group frs-results-tracker: its input topics must have as many "
                     "partitions each (co-partitioned by key), found x.events=3, y.events=6, "
                     "z.events=missing")
    assert "\n" not in fault

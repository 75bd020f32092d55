"""The consumer groups' partition assignor: co-partitioned and sticky.

A route's input topics are keyed alike (the probe id) and have as many partitions each, so
one key is on partition ``p`` of every one of them. The assignor hands out partition
*numbers*: the member that gets ``p`` gets ``p`` of every topic, so one instance holds all
of a key's records (and the lease of ``p``, services/kit/fencing.py). aiokafka's range
assignor also does that, but moves most numbers whenever a member joins or leaves (it
deals ranges over the sorted member ids); its sticky assignor keeps partitions in place
but balances topic-partitions one by one, so ``p`` of two topics can land on two members.
Neither does both, hence this one: each member keeps the numbers it held (sent along in
its join metadata) up to its fair share, and only the rest move.

An instance is used per consumer (not the class, as aiokafka's own do): it remembers its
member's last assignment, which is per consumer, never per process."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)


def share(numbers: Iterable[int], members: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    """Partition numbers per member: each keeps what it held (``members``) up to its fair
    share, the rest go to the members below theirs. Deterministic: members in id order."""
    free = sorted(set(numbers))
    order = sorted(members)
    if not order:
        return {}
    base, extra = divmod(len(free), len(order))
    # Members that already hold more get the extra places first: fewer numbers move.
    by_holding = sorted(order, key=lambda m: (-len(set(members[m]) & set(free)), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_holding)}
    out: dict[str, list[int]] = {m: [] for m in order}
    taken: set[int] = set()
    for m in order:
        for p in sorted(set(members[m])):
            if p in free and p not in taken and len(out[m]) < quota[m]:
                out[m].append(p)
                taken.add(p)
    rest = [p for p in free if p not in taken]
    for m in order:
        while len(out[m]) < quota[m] and rest:
            out[m].append(rest.pop(0))
    return {m: sorted(ps) for m, ps in out.items()}


class CopartitionedAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """Partition number ``p`` of every subscribed topic to one member; sticky."""

    name = "frs-copartitioned"
    version = 0

    def __init__(self) -> None:
        self.held: list[int] = []  # this member's partition numbers, last assignment

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics),
                                              json.dumps({"held": self.held}).encode())

    def assign(self, cluster: ClusterMetadata,
               members: Mapping[str, ConsumerProtocolMemberMetadata]
               ) -> dict[str, ConsumerProtocolMemberAssignment]:
        held: dict[str, list[int]] = {}
        for member, meta in members.items():
            try:
                held[member] = [int(p) for p in json.loads(meta.user_data or b"{}")["held"]]
            except (ValueError, KeyError, TypeError):
                held[member] = []  # a member without (readable) history keeps nothing
        topics = sorted({t for meta in members.values() for t in meta.subscription})
        numbers = {p for t in topics for p in cluster.partitions_for_topic(t) or ()}
        shares = share(numbers, held)
        out = {}
        for member, meta in members.items():
            mine = [(t, [p for p in shares[member] if p in (cluster.partitions_for_topic(t)
                                                             or ())])
                    for t in sorted(meta.subscription)]
            out[member] = ConsumerProtocolMemberAssignment(
                self.version, [(t, ps) for t, ps in mine if ps], b"")
        return out

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.held = sorted({p for _t, ps in assignment.assignment for p in ps})

"""``frs status``: what operators see of many instances. Each service's consumer groups,
their live members (host and client id, ``frs-<service>-<instance>``), the partitions each
member owns per topic, the lag of every partition (log end minus the group's committed
offset) and the partitions no member owns; then the audit leader.

Read with the Kafka admin API (list and describe consumer groups, fetch the groups'
committed offsets) and the log end offsets; the operator principal may describe every
``frs-*`` group and ``frs.*`` topic for it (services/kit/acls.json). A group a former
version ran (``RETIRED_GROUPS``) is shown as retired: it owes no owners. Exit codes: 0
every partition of every group shown has an owner and no retired group has a member, 1
otherwise, 2 misuse."""

from __future__ import annotations

import argparse
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from services.cli.common import CliSettings, subcommand
from services.kit.acls import load
from services.kit.routing import RETIRED_GROUPS

if TYPE_CHECKING:
    from services.audit.sequencer import LeaseHolder

EXAMPLE = "frs --as operator status --service dispatch --json"


@dataclass(frozen=True)
class Member:
    member_id: str
    client_id: str
    host: str
    owns: dict[str, list[int]]  # topic → partitions, sorted


@dataclass(frozen=True)
class PartitionStatus:
    topic: str
    partition: int
    owner: str | None  # the owning member's client id
    committed: int | None  # None: the group has committed nothing there yet
    end: int | None
    lag: int | None


@dataclass(frozen=True)
class GroupStatus:
    group: str
    service: str
    state: str  # Stable, PreparingRebalance, CompletingRebalance, Empty, Dead
    members: list[Member]
    partitions: list[PartitionStatus]
    # The group that took this one's work over, when a former version ran this one
    # (RETIRED_GROUPS): its partitions are owed no owner, and any member is a fault.
    retired_for: str | None = None

    @property
    def unowned(self) -> list[PartitionStatus]:
        if self.retired_for is not None:
            return []
        return [p for p in self.partitions if p.owner is None]

    @property
    def faulty(self) -> bool:
        """Partitions without an owner, or an instance of a former version still running
        (it would handle what the group that replaced it handles too)."""
        return bool(self.unowned) or (self.retired_for is not None and bool(self.members))

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "unowned": [{"topic": p.topic, "partition": p.partition}
                                            for p in self.unowned]}


@dataclass(frozen=True)
class AuditLeader:
    leader: str | None  # the client id holding the sequencer lease
    detail: str


def service_of(group: str, patterns: Mapping[str, Sequence[str]]) -> str | None:
    """The service whose principal may join ``group`` (the ACL file says whose it is)."""
    for principal, names in patterns.items():
        if any(fnmatch.fnmatchcase(group, n) if n.endswith("*") else n == group
               for n in names):
            return principal
    return None


def group_status(group: str, service: str, state: str, members: Sequence[Member],
                 partition_counts: Mapping[str, int], committed: Mapping[tuple[str, int], int],
                 ends: Mapping[tuple[str, int], int]) -> GroupStatus:
    """Every partition of the group's topics with its owner, committed offset and lag."""
    owners = {(topic, p): m.client_id for m in members for topic, ps in m.owns.items()
              for p in ps}
    rows = []
    for topic in sorted(partition_counts):
        for p in range(partition_counts[topic]):
            done, end = committed.get((topic, p)), ends.get((topic, p))
            if done is not None and done < 0:
                done = None  # -1: no offset committed
            lag = None if end is None else max(0, end - (done or 0))
            rows.append(PartitionStatus(topic, p, owners.get((topic, p)), done, end, lag))
    return GroupStatus(group, service, state, sorted(members, key=lambda m: m.client_id),
                       rows, RETIRED_GROUPS.get(group))


def audit_leader(groups: Sequence[GroupStatus], lease: LeaseHolder | None = None
                 ) -> AuditLeader:
    """Who sequences the audit log: the holder of the sequencer lease and its epoch when
    the log is in PostgreSQL (``lease``, read by ``read_lease``); on SQLite (no lease)
    the single instance, the only one that may run."""
    if lease is not None:
        if lease.live:
            return AuditLeader(lease.holder, f"(epoch {lease.epoch}, lease until "
                                             f"{lease.expires_at})")
        return AuditLeader(None, f"(none: the lease of {lease.holder}, epoch {lease.epoch},"
                                 f" expired at {lease.expires_at})")
    members = [m for g in groups if g.service == "audit" for m in g.members]
    if not members:
        return AuditLeader(None, "(no audit instance)")
    if len(members) == 1:
        return AuditLeader(members[0].client_id, "(single audit instance)")
    return AuditLeader(None, f"(none: {len(members)} audit instances and no sequencer lease:"
                             " several need the log in PostgreSQL)")


def read_lease(settings: CliSettings) -> LeaseHolder | None:
    """The sequencer lease, when FRS_STATE_URL names PostgreSQL (as the auditor or the
    audit role); None on SQLite or before any instance took it."""
    url = settings.state()
    if not url.postgres:
        return None
    import psycopg

    from services.audit.sequencer import read_lease as lease_row
    from services.kit.state import read_password

    with psycopg.connect(url.conninfo, password=read_password(settings.state_password_file),
                         connect_timeout=10, autocommit=True) as conn:
        return lease_row(conn)


# --- reading the bus ------------------------------------------------------------------


def _decode_member(member: tuple[Any, ...]) -> tuple[Member, list[str]]:
    from aiokafka.coordinator.protocol import (
        ConsumerProtocolMemberAssignment,
        ConsumerProtocolMemberMetadata,
    )

    member_id, client_id, host, metadata, assignment = member[:5]
    owns: dict[str, list[int]] = {}
    subscribed: list[str] = []
    if assignment:
        for topic, partitions in ConsumerProtocolMemberAssignment.decode(assignment).assignment:
            owns[topic] = sorted(partitions)
    if metadata:
        subscribed = list(ConsumerProtocolMemberMetadata.decode(metadata).subscription)
    return Member(member_id, client_id, host.lstrip("/"), owns), subscribed


async def read_status(settings: CliSettings, services: Sequence[str] = (),
                      groups: Sequence[str] = ()) -> list[GroupStatus]:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    from services.kit.kafka import client_options

    patterns = {name: g.groups for name, g in load().principals.items() if g.groups}
    admin = AIOKafkaAdminClient(**client_options(settings))
    ends_reader = AIOKafkaConsumer(**client_options(settings), group_id=None,
                                   enable_auto_commit=False)
    await admin.start()
    await ends_reader.start()
    try:
        listed = sorted({str(g[0]) for g in await admin.list_consumer_groups()})
        chosen = [(g, s) for g in listed if (s := service_of(g, patterns)) is not None
                  and (not services or s in services) and (not groups or g in groups)]
        found = []
        for group, service in chosen:
            described = await admin.describe_consumer_groups([group])
            _error, _name, state, _ptype, _protocol, raw_members = \
                described[0].groups[0][:6]
            members, read = [], []
            for raw in raw_members:
                member, subscribed = _decode_member(raw)
                members.append(member)
                read.append({*subscribed, *member.owns})
            committed = await admin.list_consumer_group_offsets(group)
            topics = group_topics(read, {tp.topic for tp in committed})
            counts = {t["topic"]: len(t["partitions"])
                      for t in await admin.describe_topics(sorted(topics))
                      if not t["error_code"]}
            tps = [TopicPartition(t, p) for t, n in counts.items() for p in range(n)]
            ends = await ends_reader.end_offsets(tps) if tps else {}
            found.append(group_status(
                group, service, state, members, counts,
                {(tp.topic, tp.partition): meta.offset for tp, meta in committed.items()},
                {(tp.topic, tp.partition): end for tp, end in ends.items()}))
        return found
    finally:
        await ends_reader.stop()
        await admin.close()


# --- the command ----------------------------------------------------------------------


def group_topics(members_read: Sequence[set[str]], committed: set[str]) -> set[str]:
    """The topics whose partitions a group must own: what its members read; with no
    member, what it last committed. A live group's offsets on a topic it no longer reads
    (an upgrade took it out of the route) are history, not a partition without an owner."""
    return set().union(*members_read) if members_read else set(committed)


def render(found: Sequence[GroupStatus], leader: AuditLeader) -> str:
    lines: list[str] = []
    for g in found:
        lines.append(f"{g.service}  group {g.group}  {g.state}  "
                     f"{len(g.members)} member(s)")
        if g.retired_for is not None:
            lines.append(f"  retired: {g.retired_for} took its work over"
                         + ("; stop these instances of the former version" if g.members
                            else "; its offsets stay until the broker expires them"))
        lag = {(p.topic, p.partition): p.lag for p in g.partitions}
        for m in g.members:
            lines.append(f"  {m.client_id}  host {m.host}")
            for topic, ps in sorted(m.owns.items()):
                owned = ", ".join(f"{p} (lag {lag.get((topic, p))})" for p in ps)
                lines.append(f"    {topic}: {owned}")
        unowned = g.unowned
        if unowned:
            lines.append("  no owner: " + ", ".join(f"{p.topic}[{p.partition}]"
                                                     for p in unowned))
    if not found:
        lines.append("no consumer group of a service found")
    text = leader.detail if leader.leader is None else f"{leader.leader} {leader.detail}"
    lines.append(f"audit leader: {text}")
    return "\n".join(lines)


async def cmd_status(args: argparse.Namespace, settings: CliSettings) -> int:
    import json
    import sys

    found = await read_status(settings, args.service or (), args.group or ())
    leader = audit_leader(found, read_lease(settings))
    if args.json:
        sys.stdout.write(json.dumps({"groups": [g.as_json() for g in found],
                                     "audit_leader": asdict(leader)}) + "\n")
    else:
        sys.stdout.write(render(found, leader) + "\n")
    return 1 if any(g.faulty for g in found) else 0


def register(commands: Any) -> None:
    parser = subcommand(
        commands, "status", "instances of each service: consumer group members, the "
        "partitions each owns, lag, partitions without an owner, the audit leader",
        EXAMPLE, cmd_status)
    parser.add_argument("--service", action="append", metavar="NAME",
                        help="only this service's groups (repeatable): intake, policy, "
                             "dispatch, results, audit, oversight")
    parser.add_argument("--group", action="append", metavar="GROUP",
                        help="only this consumer group (repeatable)")

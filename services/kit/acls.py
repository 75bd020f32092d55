"""Least privilege on the bus: the ACL file (services/kit/acls.json) as a typed model.

One principal per service and outside role; per principal the topics it may read, write
or describe, the consumer groups it may use and those it may only describe (see members,
assignments and offsets: `frs status`). A name ending in ``*`` is a prefix.
``bindings`` turns the file into Kafka ACL bindings (``frs acl apply`` installs exactly
those), ``markdown_table`` renders the README table, and ``allows`` answers "may X do Y
on topic T" from the file alone (tests compare it with what the broker enforces)."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from schemas.catalog import TOPIC_BY_NAME

ACL_FILE = Path(__file__).resolve().parent / "acls.json"
Operation = Literal["READ", "WRITE", "DESCRIBE"]


class Grants(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    role: str
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    describe: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    describe_groups: tuple[str, ...] = ()


class AclFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    about: str = ""
    super_users: tuple[str, ...]
    principals: dict[str, Grants]

    @model_validator(mode="after")
    def _known_topics(self) -> AclFile:
        # A literal name that is not in the catalog is a typo that would grant nothing.
        for name, grants in self.principals.items():
            for topic in (*grants.read, *grants.write, *grants.describe):
                if not topic.endswith("*") and topic not in TOPIC_BY_NAME:
                    raise ValueError(f"{name}: topic {topic!r} is not in schemas/catalog.py")
            if name in self.super_users:
                raise ValueError(f"{name} is a super user: it needs no grants")
        return self


@dataclass(frozen=True, order=True)
class Binding:
    resource_type: Literal["TOPIC", "GROUP"]
    pattern_type: Literal["LITERAL", "PREFIXED"]
    name: str
    principal: str  # "User:<name>"
    operation: Operation

    def tsv(self) -> str:
        return "\t".join((self.resource_type, self.pattern_type, self.name, self.principal,
                          self.operation))


def load(path: Path = ACL_FILE) -> AclFile:
    return AclFile.model_validate(json.loads(path.read_text()))


def _pattern(name: str) -> tuple[Literal["LITERAL", "PREFIXED"], str]:
    return ("PREFIXED", name[:-1]) if name.endswith("*") else ("LITERAL", name)


def bindings(doc: AclFile) -> list[Binding]:
    out: set[Binding] = set()
    for name, grants in doc.principals.items():
        principal = f"User:{name}"
        for op, topics in (("READ", grants.read), ("WRITE", grants.write),
                           ("DESCRIBE", grants.describe)):
            for topic in topics:
                kind, resource = _pattern(topic)
                out.add(Binding("TOPIC", kind, resource, principal, op))  # type: ignore[arg-type]
        for group in grants.groups:
            kind, resource = _pattern(group)
            out.add(Binding("GROUP", kind, resource, principal, "READ"))
        for group in grants.describe_groups:
            kind, resource = _pattern(group)
            out.add(Binding("GROUP", kind, resource, principal, "DESCRIBE"))
    return sorted(out)


def _matches(patterns: tuple[str, ...], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) if p.endswith("*") else p == name
               for p in patterns)


def allows(doc: AclFile, principal: str, operation: Operation, topic: str) -> bool:
    """What the file grants (READ and WRITE imply DESCRIBE, as in Kafka)."""
    if principal in doc.super_users:
        return True
    grants = doc.principals.get(principal)
    if grants is None:
        return False
    if operation == "READ":
        return _matches(grants.read, topic)
    if operation == "WRITE":
        return _matches(grants.write, topic)
    return _matches((*grants.read, *grants.write, *grants.describe), topic)


def markdown_table(doc: AclFile) -> str:
    def cell(items: tuple[str, ...]) -> str:
        return ", ".join(f"`{i}`" for i in items) or "-"

    lines = ["| principal | role | reads | writes | describes | consumer groups |",
             "|---|---|---|---|---|---|"]
    for name, g in doc.principals.items():
        groups = [*(f"`{i}`" for i in g.groups),
                  *(f"`{i}` (describe)" for i in g.describe_groups)]
        lines.append(f"| `{name}` | {g.role} | {cell(g.read)} | {cell(g.write)} | "
                     f"{cell(g.describe)} | {', '.join(groups) or '-'} |")
    supers = ", ".join(f"`{s}`" for s in doc.super_users)
    lines.append(f"| {supers} | super users: certificate only, internal listener "
                 "(inter-broker, topic and ACL admin) | all | all | all | all |")
    return "\n".join(lines)

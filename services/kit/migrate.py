"""Schema migrations of the shared PostgreSQL database: the ``NNNN_<name>.sql`` files of
services/kit/migrations, applied in order by ``frs db migrate`` as the owner role, each
recorded in ``schema_migrations`` with its checksum. Everything pending is applied in one
transaction under an advisory lock, so two migrators at once apply each file once and a
failed file leaves the schema where it was. A build knows one version, ``latest()``: a
service refuses any other (services/kit/state.py)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Any

from psycopg import AsyncConnection

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Serializes migrators across hosts: pg_advisory_xact_lock(key), released at commit.
_LOCK_KEY = 0x667273  # "frs"
_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
  version integer PRIMARY KEY,
  name text NOT NULL,
  checksum text NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
)"""


class MigrationError(RuntimeError):
    """The schema cannot be brought to this build's version; the message says why."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@dataclass(frozen=True)
class Applied:
    version: int
    name: str
    checksum: str
    applied_at: datetime


@cache
def available() -> tuple[Migration, ...]:
    """This build's migrations, in order; versions run 1, 2, ... without a gap."""
    found = []
    for entry in resources.files("services.kit.migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise MigrationError("services/kit/migrations: versions must run 1, 2, ... "
                             f"without a gap or a repeat, found {[m.version for m in found]}")
    return tuple(found)


def latest() -> int:
    """The schema version this build was written for."""
    return len(available())


async def applied(conn: AsyncConnection[Any]) -> list[Applied]:
    cur = await conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return []
    cur = await conn.execute(
        "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version")
    return [Applied(*r) for r in await cur.fetchall()]


@dataclass(frozen=True)
class Status:
    version: int  # the highest applied
    latest: int  # this build's
    pending: list[Migration]
    changed: list[Migration]  # applied, then edited: the database did not run this text

    @property
    def current(self) -> bool:
        return self.version == self.latest and not self.pending and not self.changed


def _compare(done: list[Applied]) -> Status:
    by_version = {a.version: a for a in done}
    ours = available()
    return Status(
        version=max(by_version, default=0), latest=latest(),
        pending=[m for m in ours if m.version not in by_version],
        changed=[m for m in ours
                 if m.version in by_version and by_version[m.version].checksum != m.checksum])


async def status(conn: AsyncConnection[Any]) -> Status:
    return _compare(await applied(conn))


async def migrate(conn: AsyncConnection[Any]) -> list[Migration]:
    """Apply what is pending (nothing on a second run); return what was applied."""
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT current_user, has_schema_privilege('public', 'CREATE')")
        row = await cur.fetchone()
        if row is None or not row[1]:
            who = row[0] if row is not None else "this role"
            raise MigrationError(f"frs db migrate runs as the schema's owner, not {who}: use "
                                 "the owner's settings (deploy/postgres/pg.sh env owner)")
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        await conn.execute(_TABLE)
        found = _compare(await applied(conn))
        if found.version > found.latest:
            raise MigrationError(f"database schema is at {found.version}, newer than this "
                                 f"build's {found.latest}: run a newer frs-broker")
        if found.changed:
            raise MigrationError(
                f"migration {found.changed[0].label} was edited after it was applied: "
                "restore the file and add a new migration for the change")
        for migration in found.pending:
            await conn.execute(migration.sql.encode())
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum))
        return found.pending

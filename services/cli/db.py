"""``frs db migrate|status``: the schema of the shared PostgreSQL database
(``FRS_STATE_URL``). ``migrate`` applies this build's pending migrations as the owner role
and is idempotent; ``status`` exits 1 when the database is not at this build's version
(the services would refuse to start on it). On SQLite there is nothing to do: each store
makes its tables when it opens."""

from __future__ import annotations

import argparse
from typing import Any

from services.cli.common import CliSettings, Misuse, emit, group, subcommand

DB_HELP = "the shared PostgreSQL database: schema migrations and status"
OWNER = "frs --as .state/postgres/env/owner.env"


def register(commands: Any) -> None:
    db = group(commands, "db", DB_HELP)
    subcommand(db, "migrate", "apply the pending schema migrations, as the owner role "
               "(a second run applies nothing)", f"{OWNER} db migrate --json", cmd_migrate)
    subcommand(db, "status", "the database's schema version against this build's; exit 1 "
               "when they differ", "frs db status --json", cmd_status)


async def _connect(settings: CliSettings) -> Any:
    import psycopg

    from services.kit.state import read_password

    url = settings.state()
    try:
        return await psycopg.AsyncConnection.connect(
            url.conninfo, password=read_password(settings.state_password_file),
            application_name="frs-db", connect_timeout=10)
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise Misuse(f"cannot connect to {url.shown()}: {reason} (is FRS_STATE_PASSWORD_FILE "
                     "that role's?)") from None


def _sqlite(args: argparse.Namespace, settings: CliSettings) -> int:
    url = settings.state()
    emit(args, {"backend": "sqlite", "url": url.shown(), "applied": []},
         f"FRS_STATE_URL is SQLite ({url.shown()}): nothing to migrate, each store makes its "
         "tables when it opens")
    return 0


async def cmd_migrate(args: argparse.Namespace, settings: CliSettings) -> int:
    if not settings.state().postgres:
        return _sqlite(args, settings)
    from services.kit.migrate import MigrationError, migrate, status

    async with await _connect(settings) as conn:
        before = (await status(conn)).version
        try:
            done = await migrate(conn)
        except MigrationError as exc:
            raise Misuse(str(exc)) from None
        after = (await status(conn)).version
    labels = [m.label for m in done]
    emit(args, {"backend": "postgresql", "url": settings.state().shown(), "from": before,
                "to": after, "applied": labels},
         f"schema at {after}: applied {', '.join(labels)}" if labels
         else f"schema at {after}: nothing to apply")
    return 0


async def cmd_status(args: argparse.Namespace, settings: CliSettings) -> int:
    if not settings.state().postgres:
        return _sqlite(args, settings)
    from services.kit.migrate import status

    async with await _connect(settings) as conn:
        found = await status(conn)
    lines = [f"schema at {found.version}, this build needs {found.latest}"]
    lines += [f"pending  {m.label}" for m in found.pending]
    lines += [f"edited after it was applied  {m.label}" for m in found.changed]
    if not found.current:
        lines.append("run frs db migrate (as the owner role)")
    emit(args, {"backend": "postgresql", "url": settings.state().shown(),
                "version": found.version, "latest": found.latest, "current": found.current,
                "pending": [m.label for m in found.pending],
                "changed": [m.label for m in found.changed]}, "\n".join(lines))
    return 0 if found.current else 1

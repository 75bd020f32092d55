"""The PostgreSQL server of the store tests, one per session (tests/pg.py): deploy/test.sh's
when it started one, else started here. When pg.sh cannot start a server the PostgreSQL
tests are skipped with its reason, except under deploy/test.sh (FRS_TEST_PG_REQUIRED)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from services.kit.migrate import migrate
from tests.pg import PgServer, existing_server, must_run, start_server, stop_server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    server = existing_server()
    if server is not None:
        yield server
        return
    try:
        server = start_server()
    except (subprocess.CalledProcessError, OSError) as exc:
        reason = getattr(exc, "stderr", None) or str(exc)
        if must_run():
            pytest.fail(f"pg.sh could not start PostgreSQL: {reason.strip()}")
        pytest.skip(f"pg.sh could not start PostgreSQL: {reason.strip()}")
    try:
        yield server
    finally:
        stop_server(server)


def conninfo(server: PgServer, role: str) -> dict[str, Any]:
    """psycopg.connect keywords of ``role`` (a service, or owner) on the test server."""
    return {"conninfo": server.url(role), "password": server.password(role),
            "connect_timeout": 5}


@pytest.fixture(scope="session")
def pg_migrated(pg_server: PgServer) -> PgServer:
    """The server with this build's schema applied (as the owner, like frs db migrate)."""

    async def apply() -> None:
        async with await psycopg.AsyncConnection.connect(**conninfo(pg_server, "owner")) as conn:
            await migrate(conn)

    asyncio.run(apply())
    return pg_server
